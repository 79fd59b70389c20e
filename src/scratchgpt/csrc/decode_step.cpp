// A whole decode step of a GPT-2 model in one call: one new token for each row (sequence) of a KV
// cache, through every layer to the logits of the next token.
//
// Why: with the products and attention in fast kernels, a step of GPT-2 124M spent 4-5 ms of its
// 12-32 ms in Python, module calls and the dispatcher between them (benchmarks/README.md), work a
// C++ engine such as llama.cpp does not have. Here the step is one loop over the layers.
//
// What: what model.py's `GPTModel.forward(tokens, cache, logits_from=-1)` computes, in the same
// order, with the same kernels for the products and the attention (decode_kernels.h), and rounded
// to the model's format at the same places (for a bf16 model, after every operation, as PyTorch
// rounds each bf16 tensor it makes). The layer norms, GELU and residual adds, a few thousand values
// per row, are plain loops on the calling thread; they differ from PyTorch's by an ulp or so.
// kernels.py decides when a model is plain enough to run here (`decoder`); tests/test_decode_step.py
// holds the two against each other.

#include <torch/library.h>

#include "decode_kernels.h"

namespace {

using scratchgpt::as_float;

// The tensors of one layer in `params`, in this order (kernels.py's `_step_params` writes them):
// norm1 scale, shift; query, key, value and out_proj as (weight, int8 scales or none, bias or none);
// norm2 scale, shift; the feed-forward's two layers as (weight, scales, bias). After the last layer:
// the final norm's scale and shift, and the output head's (weight, scales, bias).
constexpr int64_t kLayerParams = 22;
constexpr int64_t kTailParams = 5;

using Params = std::vector<std::optional<at::Tensor>>;

// Rounds values to the model's format: bf16 (nearest even, as PyTorch) or, for fp32, nothing.
struct Format {
  bool bf16;
  void round(float* x, int64_t n) const {
    if (!bf16) return;
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(static_cast<at::BFloat16>(x[i]));
  }
};

// exp(x) for 16 floats, within about 1 ulp: 2^n * exp(r) with n = round(x / ln 2), |r| <= ln(2) / 2
// by its Taylor polynomial of degree 7 (error below 1e-8).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cephes)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// GPT-2's GELU (the tanh approximation), in place: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)),
// u = sqrt(2 / pi) (x + 0.044715 x^3).
void gelu(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(lanes, x + i);
    const __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), _mm512_mul_ps(v, v)), v, v);
    const __m512 e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.f * 0.7978845608028654f), inner));
    _mm512_mask_storeu_ps(x + i, lanes, _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
  }
}

bool is_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; }

// The checks, made for every parameter before the step writes anything: a layer norm's scale and
// shift at params[i], i + 1 ...
void check_norm(const Params& params, int64_t i, int64_t E) {
  for (int64_t j : {i, i + 1})
    TORCH_CHECK(params[j].has_value() && params[j]->numel() == E && params[j]->is_contiguous() && is_float(*params[j]),
                "decode_step: parameter ", j, " (a layer norm's) must be ", E, " contiguous fp32 or bf16 values");
}

// ... and a layer's weight [N, K] (fp32, bf16 or int8), its int8 scales (fp32) and bias at params[i..i+2].
void check_linear(const Params& params, int64_t i, int64_t K, int64_t N) {
  TORCH_CHECK(params[i].has_value(), "decode_step: parameter ", i, " (a weight) is missing");
  const at::Tensor& weight = *params[i];
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == N && weight.size(1) == K && weight.is_contiguous() &&
              (is_float(weight) || weight.scalar_type() == at::kChar),
              "decode_step: parameter ", i, " must be a contiguous fp32, bf16 or int8 [", N, ", ", K,
              "] weight, not ", weight.scalar_type(), " ", weight.sizes());
  const std::optional<at::Tensor>& scale = params[i + 1];
  const std::optional<at::Tensor>& bias = params[i + 2];
  TORCH_CHECK((weight.scalar_type() == at::kChar) == scale.has_value(),
              "decode_step: int8 weights, and only they, need their scales (parameter ", i, ")");
  TORCH_CHECK(!scale.has_value() || (scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                                     scale->numel() == N),
              "decode_step: the scales (parameter ", i + 1, ") must be ", N, " contiguous fp32 values");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == N && is_float(*bias)),
              "decode_step: the bias (parameter ", i + 2, ") must be ", N, " contiguous fp32 or bf16 values");
}

// out[b] = (x[b] - mean) / sqrt(var + eps) * scale + shift for each of the B rows of E values.
void layer_norm(const float* x, int64_t B, int64_t E, const at::Tensor& scale, const at::Tensor& shift,
                double eps, float* out, const Format& format) {
  std::vector<float> scale_buffer, shift_buffer;
  const float* w = as_float(scale, E, scale_buffer);
  const float* s = as_float(shift, E, shift_buffer);
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * E;
    double sum = 0, squares = 0;
    for (int64_t e = 0; e < E; ++e) sum += xb[e];
    const double mean = sum / E;
    for (int64_t e = 0; e < E; ++e) squares += (xb[e] - mean) * (xb[e] - mean);
    const float rstd = static_cast<float>(1.0 / std::sqrt(squares / E + eps));
    const float m = static_cast<float>(mean);
    for (int64_t e = 0; e < E; ++e) out[b * E + e] = (xb[e] - m) * rstd * w[e] + s[e];
  }
  format.round(out, B * E);
}

// y [B, N] = x [B, K] @ weight.T * scales + bias through params[i..i+2] (checked by check_linear),
// x in the model's format, y rounded to it unless `round_y` is false.
void linear(const Params& params, int64_t i, const float* x, int64_t B, int64_t K, int64_t N, float* y,
            const Format& format, bool round_y = true) {
  const at::Tensor& weight = *params[i];
  const std::optional<at::Tensor>& scale = params[i + 1];
  const std::optional<at::Tensor>& bias = params[i + 2];
  std::vector<float> bias_buffer;
  scratchgpt::matmul(x, B, K, weight, scale.has_value() ? scale->const_data_ptr<float>() : nullptr,
                     bias.has_value() ? as_float(*bias, N, bias_buffer) : nullptr, y, format.bf16);
  if (round_y) format.round(y, B * N);
}

// x = x + y, rounded to the model's format.
void add(float* x, const float* y, int64_t n, const Format& format) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
  format.round(x, n);
}

// Writes each row's new key and value (k, v [B, H * D]) at position lengths[b] of the layer's cache
// (keys, values [B, H, max_len, D]), then attends: out [B, H * D], one query per row and head over
// positions 0..lengths[b] of its own row.
template <typename T>
void attention(const float* q, const float* k, const float* v, const at::Tensor& keys, const at::Tensor& values,
               at::IntArrayRef lengths, int64_t H, int64_t D, float* out, const Format& format) {
  const int64_t B = lengths.size(), E = H * D;
  T* kp = keys.data_ptr<T>();
  T* vp = values.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      T* kd = kp + b * keys.stride(0) + h * keys.stride(1) + lengths[b] * keys.stride(2);
      T* vd = vp + b * values.stride(0) + h * values.stride(1) + lengths[b] * values.stride(2);
      for (int64_t d = 0; d < D; ++d) {
        kd[d] = static_cast<T>(k[b * E + h * D + d]);
        vd[d] = static_cast<T>(v[b * E + h * D + d]);
      }
    }
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end()) + 1;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> query(D), prob(longest);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      for (int64_t d = 0; d < D; ++d) query[d] = q[b * E + h * D + d] * scale;
      scratchgpt::attend(query.data(), kp + b * keys.stride(0) + h * keys.stride(1), keys.stride(2),
                         vp + b * values.stride(0) + h * values.stride(1), values.stride(2), lengths[b] + 1, D,
                         nullptr, prob.data(), out + b * E + h * D);
    }
  });
  format.round(out, B * E);
}

// One token per row: tokens [B] (int64) at positions lengths[b] (what each row has cached), the
// token and position tables [*, E], the parameters (see kLayerParams), and each layer's cache
// keys[i], values[i] [B, H, max_len, D] in the model's format, which get the new positions.
// Returns the logits [B, 1, V] in the model's format.
at::Tensor decode_step(const at::Tensor& tokens, at::IntArrayRef lengths, const at::Tensor& tok_emb,
                       const at::Tensor& pos_emb, const c10::List<std::optional<at::Tensor>>& param_list,
                       at::TensorList keys, at::TensorList values, int64_t heads, double eps) {
  const Params params = param_list.vec();
  const int64_t B = tokens.numel(), layers = keys.size(), E = tok_emb.size(1), D = heads > 0 ? E / heads : 0;
  TORCH_CHECK(B >= 1 && B <= scratchgpt::kMaxRows && lengths.size() == static_cast<size_t>(B),
              "decode_step: 1 to ", scratchgpt::kMaxRows, " rows, each with its cached length");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous(), "decode_step: tokens must be int64");
  TORCH_CHECK(tok_emb.scalar_type() == at::kFloat || tok_emb.scalar_type() == at::kBFloat16,
              "decode_step: an fp32 or bf16 model, not ", tok_emb.scalar_type());
  TORCH_CHECK(tok_emb.dim() == 2 && pos_emb.dim() == 2 && pos_emb.size(1) == E && tok_emb.is_contiguous() &&
              pos_emb.is_contiguous() && pos_emb.scalar_type() == tok_emb.scalar_type(),
              "decode_step: the token and position tables must be contiguous [*, E] tensors of one format");
  TORCH_CHECK(E > 0 && heads > 0 && D * heads == E, "decode_step: ", heads, " heads do not divide a width of ", E);
  TORCH_CHECK(values.size() == keys.size() &&
              static_cast<int64_t>(params.size()) == layers * kLayerParams + kTailParams,
              "decode_step: ", kLayerParams, " parameters per layer and ", kTailParams, " after them");
  const Format format{tok_emb.scalar_type() == at::kBFloat16};
  const int64_t* token = tokens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(token[b] >= 0 && token[b] < tok_emb.size(0), "decode_step: token id ", token[b],
                " is outside the model's vocabulary of ", tok_emb.size(0));
    TORCH_CHECK(lengths[b] >= 0 && lengths[b] < pos_emb.size(0), "decode_step: row ", b, " has ", lengths[b],
                " cached positions: no room for one more in a context of ", pos_emb.size(0));
  }
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  for (int64_t i = 0; i < layers; ++i)
    for (const at::Tensor& cache : {keys[i], values[i]})
      TORCH_CHECK(cache.dim() == 4 && cache.size(0) == B && cache.size(1) == heads && cache.size(2) > longest &&
                  cache.size(3) == D && cache.stride(3) == 1 && cache.scalar_type() == tok_emb.scalar_type(),
                  "decode_step: layer ", i, "'s cache must be [", B, ", ", heads, ", more than ", longest, ", ", D,
                  "] in the model's format");

  // Every parameter checked before anything is written (a bad one leaves the cache as it was).
  TORCH_CHECK(layers == 0 || params[16].has_value(), "decode_step: layer 0's feed-forward weight is missing");
  const int64_t F = layers ? params[16]->size(0) : 0, tail = layers * kLayerParams;
  TORCH_CHECK(layers == 0 || F > 0, "decode_step: a feed-forward layer of no width");
  for (int64_t i = 0; i < layers; ++i) {
    const int64_t base = i * kLayerParams;
    check_norm(params, base, E);
    for (int64_t j : {2, 5, 8, 11}) check_linear(params, base + j, E, E);  // query, key, value, out_proj
    check_norm(params, base + 14, E);
    check_linear(params, base + 16, E, F);
    check_linear(params, base + 19, F, E);
  }
  check_norm(params, tail, E);
  TORCH_CHECK(params[tail + 2].has_value() && params[tail + 2]->dim() == 2, "decode_step: the output head is missing");
  const int64_t V = params[tail + 2]->size(0);
  check_linear(params, tail + 2, E, V);

  // x: the residual stream [B, E]; h: its normalised copy; q, k, v, a: attention; f: the feed-forward
  std::vector<float> x(B * E), h(B * E), q(B * E), k(B * E), v(B * E), a(B * E), f(B * F);
  std::vector<float> tok_buffer, pos_buffer;
  for (int64_t b = 0; b < B; ++b) {  // x = tok_emb[token] + pos_emb[position]
    const float* t = as_float(tok_emb[token[b]], E, tok_buffer);
    const float* p = as_float(pos_emb[lengths[b]], E, pos_buffer);
    for (int64_t e = 0; e < E; ++e) x[b * E + e] = t[e] + p[e];
  }
  format.round(x.data(), B * E);

  for (int64_t i = 0; i < layers; ++i) {
    const int64_t base = i * kLayerParams;
    auto param = [&](int64_t j) -> const at::Tensor& { return *params[base + j]; };
    // x = x + out_proj(attention(norm1(x)))
    layer_norm(x.data(), B, E, param(0), param(1), eps, h.data(), format);
    linear(params, base + 2, h.data(), B, E, E, q.data(), format);
    linear(params, base + 5, h.data(), B, E, E, k.data(), format);
    linear(params, base + 8, h.data(), B, E, E, v.data(), format);
    if (format.bf16)
      attention<at::BFloat16>(q.data(), k.data(), v.data(), keys[i], values[i], lengths, heads, D, a.data(), format);
    else
      attention<float>(q.data(), k.data(), v.data(), keys[i], values[i], lengths, heads, D, a.data(), format);
    linear(params, base + 11, a.data(), B, E, E, h.data(), format);
    add(x.data(), h.data(), B * E, format);
    // x = x + fc2(gelu(fc1(norm2(x))))
    layer_norm(x.data(), B, E, param(14), param(15), eps, h.data(), format);
    linear(params, base + 16, h.data(), B, E, F, f.data(), format);
    gelu(f.data(), B * F);
    format.round(f.data(), B * F);
    linear(params, base + 19, f.data(), B, F, E, h.data(), format);
    add(x.data(), h.data(), B * E, format);
  }

  layer_norm(x.data(), B, E, *params[tail], *params[tail + 1], eps, h.data(), format);
  at::Tensor logits = at::empty({B, 1, V}, tok_emb.options());
  if (format.bf16) {
    std::vector<float> y(B * V);
    linear(params, tail + 2, h.data(), B, E, V, y.data(), format, false);  // rounded below, as stored
    at::BFloat16* out = logits.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < B * V; ++i) out[i] = static_cast<at::BFloat16>(y[i]);
  } else {
    linear(params, tail + 2, h.data(), B, E, V, logits.data_ptr<float>(), format);
  }
  return logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(scratchgpt_cpu, CPU, m) { m.impl("decode_step", &decode_step); }
