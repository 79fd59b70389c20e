// Decoding's two kernels for x86 CPUs with AVX-512: matrix products of a few rows, and
// attention of one new token per sequence to its KV cache.
//
// decode_matmul: y[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n] + bias[n]  for M <= 8 rows of x,
// with the weight w stored as fp32, bf16 or int8 (then with one fp32 scale per row n).
// Decoding one token reads every weight once, so its speed is how fast the weights stream
// from memory. PyTorch's kernels stream fp32 near that speed (oneDNN), bf16 at about half of
// it, and int8 (`_weight_int8pack_mm`) at a quarter (benchmarks/README.md). Here every format
// is read straight from the tensor the model holds: 16 weights at a time are loaded, widened
// to fp32 in registers (bf16: a shift; int8: two conversions) and multiplied into fp32
// accumulators for every row of x, so a weight is read from memory once however many rows
// (sequences) there are. The threads split the output features.
//
// decode_attention: see below.
//
// Built on first use by torch.utils.cpp_extension (kernels.py) with -mavx512f -mavx512bw
// -mavx512vl; used only where PyTorch reports AVX-512, and tested against F.linear and
// F.scaled_dot_product_attention (tests/test_decode_kernels.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kMaxRows = 8;      // rows of x per call (8 rows x 2 weight rows = 16 accumulators)
constexpr int kPrefetch = 4096;  // bytes ahead of the weight stream to ask the memory for

// 16 weights from w, widened to fp32; lanes outside `mask` read nothing and are zero.
inline __m512 load16(const float* w, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, w); }

inline __m512 load16(const at::BFloat16* w, __mmask16 mask) {  // bf16 is the top half of an fp32
  __m256i half = _mm256_maskz_loadu_epi16(mask, w);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

inline __m512 load16(const int8_t* w, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w)));
}

// acc[m][j][u] += x[m, k:k+16] * w[j, k:k+16] for m < M, j < N (lanes outside `mask`: nothing).
template <int M, int N, int U, typename W>
__attribute__((always_inline)) inline void step(__m512 (&acc)[M][N][U], int u, const float* x, int64_t K,
                                                const W* w, int64_t k, __mmask16 mask) {
  __m512 wv[N];
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) {
    _mm_prefetch((const char*)(w + j * K + k) + kPrefetch, _MM_HINT_T0);  // the stream, a few KB ahead
    wv[j] = load16(w + j * K + k, mask);
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) acc[m][j][u] = _mm512_fmadd_ps(xv, wv[j], acc[m][j][u]);
  }
}

// y[0:M, n:n+N] for weight rows n..n+N-1 (N of them) and M rows of x, U accumulators per pair.
template <int M, int N, int U, typename W>
inline void tile(const float* x, int64_t K, const W* w, int64_t n, float* y, int64_t ldy,
                 const float* scale, const float* bias) {
  __m512 acc[M][N][U];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j)
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) acc[m][j][u] = _mm512_setzero_ps();
  const W* wn = w + n * K;
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) step<M, N, U>(acc, u, x, K, wn, k + 16 * u, (__mmask16)0xFFFF);
  for (; k + 16 <= K; k += 16) step<M, N, U>(acc, 0, x, K, wn, k, (__mmask16)0xFFFF);
  if (k < K) step<M, N, U>(acc, 0, x, K, wn, k, (__mmask16)((1u << (K - k)) - 1));
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      __m512 sum = acc[m][j][0];
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[m][j][u]);
      float v = _mm512_reduce_add_ps(sum);
      if (scale) v *= scale[n + j];
      if (bias) v += bias[n + j];
      y[m * ldy + n + j] = v;
    }
}

// Weight rows [n0, n1) against all M rows of x: blocks of N weight rows, the last rows one by one.
template <int M, typename W>
void rows(const float* x, int64_t K, const W* w, int64_t n0, int64_t n1, float* y, int64_t ldy,
          const float* scale, const float* bias) {
  // One or two rows of x: one weight row at a time with 4 accumulators, so that the weights
  // are read as one forward stream (the fastest for the prefetchers: 1.3-2x interleaving 4 rows).
  // More rows: two weight rows share each load of x, the products bound by multiply-adds.
  constexpr int N = M <= 2 ? 1 : 2;
  constexpr int U = M <= 2 ? 4 : 1;
  int64_t n = n0;
  for (; n + N <= n1; n += N) tile<M, N, U>(x, K, w, n, y, ldy, scale, bias);
  for (; n < n1; ++n) tile<M, 1, U>(x, K, w, n, y, ldy, scale, bias);
}

template <typename W>
void matmul(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* y,
            const float* scale, const float* bias) {
  // enough output features per thread that a thread's share is worth waking it for
  const int64_t grain = std::max<int64_t>(16, (1 << 16) / (K * sizeof(W)));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    n0 -= n0 % 4;  // blocks of rows stay whole (the split only moves a boundary)
    if (n1 != N) n1 -= n1 % 4;
    switch (M) {
      case 1: rows<1>(x, K, w, n0, n1, y, N, scale, bias); break;
      case 2: rows<2>(x, K, w, n0, n1, y, N, scale, bias); break;
      case 3: rows<3>(x, K, w, n0, n1, y, N, scale, bias); break;
      case 4: rows<4>(x, K, w, n0, n1, y, N, scale, bias); break;
      case 5: rows<5>(x, K, w, n0, n1, y, N, scale, bias); break;
      case 6: rows<6>(x, K, w, n0, n1, y, N, scale, bias); break;
      case 7: rows<7>(x, K, w, n0, n1, y, N, scale, bias); break;
      default: rows<8>(x, K, w, n0, n1, y, N, scale, bias); break;
    }
  });
}

// `count` values as fp32: `data` itself when it is fp32, else converted into `buffer`.
const float* as_float(const at::Tensor& t, int64_t count, std::vector<float>& buffer) {
  if (t.scalar_type() == at::kFloat) return t.const_data_ptr<float>();
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "decode_matmul: fp32 or bf16 activations and bias, not ",
              t.scalar_type());
  const at::BFloat16* data = t.const_data_ptr<at::BFloat16>();
  buffer.resize(count);
  for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<float>(data[i]);
  return buffer.data();
}

// x [..., K] (fp32 or bf16) @ weight [N, K] (fp32, bf16 or int8).T, times scale [N] (fp32; int8
// only), plus bias [N]; returned in x's dtype, computed with fp32 accumulators. Conversions are
// plain loops here, not tensor ops: a decode step makes 73 of these calls.
at::Tensor decode_matmul(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& bias) {
  const int64_t K = x.size(-1), N = weight.size(0), M = K ? x.numel() / K : 0;
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "decode_matmul: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K && weight.is_contiguous(),
              "decode_matmul: weight must be a contiguous [N, ", K, "] matrix");
  TORCH_CHECK(M <= kMaxRows, "decode_matmul: at most ", kMaxRows, " rows, not ", M);
  const bool int8 = weight.scalar_type() == at::kChar;
  TORCH_CHECK(int8 == scale.has_value(), "decode_matmul: int8 weights, and only they, need their scales");
  TORCH_CHECK(!int8 || (scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == N),
              "decode_matmul: the scales must be N contiguous fp32 values");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == N),
              "decode_matmul: the bias must be N contiguous values");
  static thread_local std::vector<float> x_buffer, y_buffer, bias_buffer;
  const at::Tensor xc = x.contiguous();
  const float* xp = as_float(xc, M * K, x_buffer);
  const float* s = int8 ? scale->const_data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? as_float(*bias, N, bias_buffer) : nullptr;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const bool fp32_out = y.scalar_type() == at::kFloat;
  if (!fp32_out) y_buffer.resize(M * N);
  float* yp = fp32_out ? y.data_ptr<float>() : y_buffer.data();
  if (M > 0) {
    switch (weight.scalar_type()) {
      case at::kFloat: matmul(xp, M, K, weight.const_data_ptr<float>(), N, yp, s, b); break;
      case at::kBFloat16: matmul(xp, M, K, weight.const_data_ptr<at::BFloat16>(), N, yp, s, b); break;
      case at::kChar: matmul(xp, M, K, weight.const_data_ptr<int8_t>(), N, yp, s, b); break;
      default: TORCH_CHECK(false, "decode_matmul: weights must be fp32, bf16 or int8, not ", weight.scalar_type());
    }
  }
  if (!fp32_out) {  // bf16 out, rounded to nearest even as .to(torch.bfloat16) does
    at::BFloat16* out = y.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * N; ++i) out[i] = static_cast<at::BFloat16>(y_buffer[i]);
  }
  return y;
}

// One query per sequence (a decode step) attending to its cached keys and values:
// out[b, h] = softmax(q[b, h] . k[b, h, l] / sqrt(D), over the l that mask[b, l] allows) @ v[b, h].
// PyTorch's CPU attention is built for long queries; for one it costs 100-2000 us a layer,
// where this is a few dot products per position. q [B, H, 1, D]; k, v [B, H, L, D] with
// rows of D contiguous (views of the KV cache); mask [B, 1, 1, L] bool or none.
template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask,
            int64_t mask_stride, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), L = k.size(2), D = q.size(3);
  const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> query(D), acc(D), prob(L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      const T* qi = qp + b * q.stride(0) + h * q.stride(1);
      for (int64_t d = 0; d < D; ++d) query[d] = static_cast<float>(qi[d * q.stride(3)]) * scale;
      const T* kbh = kp + b * k.stride(0) + h * k.stride(1);
      const T* vbh = vp + b * v.stride(0) + h * v.stride(1);
      float top = -INFINITY;
      for (int64_t l = 0; l < L; ++l) {
        if (mask && !mask[b * mask_stride + l]) { prob[l] = -INFINITY; continue; }
        const T* kl = kbh + l * k.stride(2);
        __m512 dot = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 lanes = D - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1);
          dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, query.data() + d), load16(kl + d, lanes), dot);
        }
        prob[l] = _mm512_reduce_add_ps(dot);
        top = std::max(top, prob[l]);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float total = 0.f;
      for (int64_t l = 0; l < L; ++l) {
        if (prob[l] == -INFINITY) continue;
        const float p = std::exp(prob[l] - top);
        total += p;
        const T* vl = vbh + l * v.stride(2);
        const __m512 pv = _mm512_set1_ps(p);
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 lanes = D - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1);
          _mm512_mask_storeu_ps(acc.data() + d, lanes,
                                _mm512_fmadd_ps(pv, load16(vl + d, lanes), _mm512_maskz_loadu_ps(lanes, acc.data() + d)));
        }
      }
      T* oi = op + b * out.stride(0) + h * out.stride(1);
      for (int64_t d = 0; d < D; ++d) oi[d] = static_cast<T>(total > 0.f ? acc[d] / total : 0.f);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.dim() == 4,
              "decode_attention: q [B, H, 1, D], k and v [B, H, L, D]");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "decode_attention: k and v must be [B, H, L, D] to match q [B, H, 1, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "decode_attention: q, k, v all fp32 or all bf16");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v rows must be contiguous");
  const bool* m = nullptr;
  int64_t mask_stride = 0;
  at::Tensor mc;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->size(0) == q.size(0) &&
                mask->size(1) == 1 && mask->size(2) == 1 && mask->size(3) == k.size(2),
                "decode_attention: the mask must be bool [B, 1, 1, L]");
    mc = mask->contiguous();
    m = mc.const_data_ptr<bool>();
    mask_stride = k.size(2);
  }
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.scalar_type() == at::kFloat) attend<float>(q, k, v, m, mask_stride, out);
  else attend<at::BFloat16>(q, k, v, m, mask_stride, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(scratchgpt_cpu, m) {
  m.def("decode_matmul(Tensor x, Tensor weight, Tensor? scale, Tensor? bias) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(scratchgpt_cpu, CPU, m) { 
  m.impl("decode_matmul", &decode_matmul);
  m.impl("decode_attention", &decode_attention);
}
