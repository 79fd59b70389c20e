// Decoding's two operators for x86 CPUs with AVX-512: matrix products of a few rows, and
// attention of one new token per sequence to its KV cache (their cores: decode_kernels.h), and the
// library's schema, which also declares decode_step (decode_step.cpp).
//
// Built on first use by torch.utils.cpp_extension (kernels.py) with -mavx512f -mavx512bw
// -mavx512vl; used only where PyTorch reports AVX-512, and tested against F.linear and
// F.scaled_dot_product_attention (tests/test_decode_kernels.py).

#include <torch/library.h>

#include "decode_kernels.h"

namespace {

using scratchgpt::as_float;
using scratchgpt::kMaxRows;

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
  scratchgpt::matmul(xp, M, K, weight, s, b, yp, xc.scalar_type() == at::kBFloat16);
  if (!fp32_out) {  // bf16 out, rounded to nearest even as .to(torch.bfloat16) does
    at::BFloat16* out = y.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * N; ++i) out[i] = static_cast<at::BFloat16>(y_buffer[i]);
  }
  return y;
}

// One query per sequence (a decode step) attending to its cached keys and values:
// out[b, h] = softmax(q[b, h] . k[b, h, l] / sqrt(D), over the l that mask[b, l] allows) @ v[b, h].
// q [B, H, 1, D]; k, v [B, H, L, D] with rows of D contiguous (views of the KV cache);
// mask [B, 1, 1, L] bool or none.
template <typename T>
void attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask,
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
      scratchgpt::attend(query.data(), kp + b * k.stride(0) + h * k.stride(1), k.stride(2),
                         vp + b * v.stride(0) + h * v.stride(1), v.stride(2), L, D,
                         mask ? mask + b * mask_stride : nullptr, prob.data(), acc.data());
      T* oi = op + b * out.stride(0) + h * out.stride(1);
      for (int64_t d = 0; d < D; ++d) oi[d] = static_cast<T>(acc[d]);
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
  if (q.scalar_type() == at::kFloat) attend_all<float>(q, k, v, m, mask_stride, out);
  else attend_all<at::BFloat16>(q, k, v, m, mask_stride, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(scratchgpt_cpu, m) {
  m.def("decode_matmul(Tensor x, Tensor weight, Tensor? scale, Tensor? bias) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor");
  m.def("decode_step(Tensor tokens, int[] lengths, Tensor tok_emb, Tensor pos_emb, Tensor?[] params, "
        "Tensor(a!)[] keys, Tensor(b!)[] values, int heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(scratchgpt_cpu, CPU, m) {
  m.impl("decode_matmul", &decode_matmul);
  m.impl("decode_attention", &decode_attention);
}
