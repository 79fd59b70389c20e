// The cores of decoding's kernels for x86 CPUs with AVX-512, shared by the operators in decode.cpp
// (one product, one attention) and decode_step.cpp (a whole decode step of the model in one call).
//
// matmul: y[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n] + bias[n]  for M <= 8 rows of x,
// with the weight w stored as fp32, bf16 or int8 (then with one fp32 scale per row n).
// Decoding one token reads every weight once, so its speed is how fast the weights stream
// from memory. PyTorch's kernels stream fp32 near that speed (oneDNN), bf16 at about half of
// it, and int8 (`_weight_int8pack_mm`) at a quarter (benchmarks/README.md). Here every format
// is read straight from the tensor the model holds: 16 weights at a time are loaded, widened
// to fp32 in registers (bf16: a shift; int8: two conversions) and multiplied into fp32
// accumulators for every row of x, so a weight is read from memory once however many rows
// (sequences) there are; bf16 weights with bf16 rows are instead multiplied 32 at a time in
// pairs, where the CPU has AVX-512 BF16 (DotBF16). The threads split the output features.
//
// attend: one query (a decode step's new token) attending to its cached keys and values.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace scratchgpt {


constexpr int kMaxRows = 8;      // rows of x per call (8 rows x 2 weight rows = 16 accumulators)
// How far ahead of the weight stream to ask the memory for it, and into which cache: 32 KB ahead
// into L2 (not L1, where the lines would push out the rows of x that every tile reads again). Against
// 4 KB into L1, measured in whole decode steps of GPT-2 124M: batch 1 0.81-0.86x the time, batch 8
// 0.71-0.78x, as the products of 8 rows overlap their arithmetic with the stream (benchmarks/README.md).
constexpr int kPrefetch = 32768;

// 16 weights from w, widened to fp32; lanes outside `mask` read nothing and are zero.
inline __m512 load16(const float* w, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, w); }

inline __m512 load16(const at::BFloat16* w, __mmask16 mask) {  // bf16 is the top half of an fp32
  __m256i half = _mm256_maskz_loadu_epi16(mask, w);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

inline __m512 load16(const int8_t* w, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w)));
}

// How a product reads and multiplies its operands, `Lanes` values of a row of x and of w at a time.
// Widen<W>: x in fp32, w widened to fp32 in registers, one fused multiply-add per 16 values.
template <typename W>
struct Widen {
  using X = float;
  using Mask = __mmask16;
  using Vec = __m512;
  static constexpr int Lanes = 16;
  static Vec load_w(const W* w, Mask mask) { return load16(w, mask); }
  static Vec load_x(const X* x, Mask mask) { return _mm512_maskz_loadu_ps(mask, x); }
  static __m512 madd(Vec x, Vec w, __m512 acc) { return _mm512_fmadd_ps(x, w, acc); }
};

// DotBF16: x and w both bf16, multiplied in pairs by AVX-512 BF16's vdpbf16ps, 32 values per
// instruction with nothing to widen: acc[i] += x[2i] w[2i] + x[2i+1] w[2i+1] in fp32. A product of
// two bf16 values is exact in fp32, so this rounds as the fused multiply-adds do (only the order of
// the sum differs); inputs, products and sums below 2^-126 (1.2e-38) count as zero. Written as inline
// assembly so that the file builds for every AVX-512 CPU (with binutils 2.32 or later, which know the
// instruction); it runs only where has_bf16_dot() says so.
struct DotBF16 {
  using X = at::BFloat16;
  using Mask = __mmask32;
  using Vec = __m512i;
  static constexpr int Lanes = 32;
  static Vec load_w(const at::BFloat16* w, Mask mask) { return _mm512_maskz_loadu_epi16(mask, w); }
  static Vec load_x(const X* x, Mask mask) { return _mm512_maskz_loadu_epi16(mask, x); }
  static __m512 madd(Vec x, Vec w, __m512 acc) {
    asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
    return acc;
  }
};

// Whether this CPU has AVX-512 BF16 (for DotBF16).
inline bool has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// acc[m][j][u] += x[m, k:k+Lanes] * w[j, k:k+Lanes] for m < M, j < N (lanes outside `mask`: nothing).
template <int M, int N, int U, typename P, typename W>
__attribute__((always_inline)) inline void step(__m512 (&acc)[M][N][U], int u, const typename P::X* x, int64_t K,
                                                const W* w, int64_t k, typename P::Mask mask) {
  typename P::Vec wv[N];
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) {
    // The stream, ahead (the address may lie past the tensor, so it is formed as an integer).
    _mm_prefetch((const char*)(reinterpret_cast<uintptr_t>(w + j * K + k) + kPrefetch), _MM_HINT_T1);
    wv[j] = P::load_w(w + j * K + k, mask);
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    const typename P::Vec xv = P::load_x(x + m * K + k, mask);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) acc[m][j][u] = P::madd(xv, wv[j], acc[m][j][u]);
  }
}

// y[0:M, n:n+N] for weight rows n..n+N-1 (N of them) and M rows of x, U accumulators per pair.
template <int M, int N, int U, typename P, typename W>
inline void tile(const typename P::X* x, int64_t K, const W* w, int64_t n, float* y, int64_t ldy,
                 const float* scale, const float* bias) {
  using Mask = typename P::Mask;
  constexpr int L = P::Lanes;
  __m512 acc[M][N][U];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j)
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) acc[m][j][u] = _mm512_setzero_ps();
  const W* wn = w + n * K;
  int64_t k = 0;
  for (; k + L * U <= K; k += L * U)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) step<M, N, U, P>(acc, u, x, K, wn, k + L * u, (Mask)~Mask(0));
  for (; k + L <= K; k += L) step<M, N, U, P>(acc, 0, x, K, wn, k, (Mask)~Mask(0));
  if (k < K) step<M, N, U, P>(acc, 0, x, K, wn, k, (Mask)((uint64_t(1) << (K - k)) - 1));
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
template <int M, typename P, typename W>
inline void rows(const typename P::X* x, int64_t K, const W* w, int64_t n0, int64_t n1, float* y, int64_t ldy,
                 const float* scale, const float* bias) {
  // One or two rows of x: one weight row at a time with 4 accumulators, so that the weights
  // are read as one forward stream (the fastest for the prefetchers: 1.3-2x interleaving 4 rows).
  // More rows: two weight rows share each load of x, the products bound by multiply-adds.
  constexpr int N = M <= 2 ? 1 : 2;
  constexpr int U = M <= 2 ? 4 : 1;
  int64_t n = n0;
  for (; n + N <= n1; n += N) tile<M, N, U, P>(x, K, w, n, y, ldy, scale, bias);
  for (; n < n1; ++n) tile<M, 1, U, P>(x, K, w, n, y, ldy, scale, bias);
}

template <typename P, typename W>
inline void matmul(const typename P::X* x, int64_t M, int64_t K, const W* w, int64_t N, float* y,
                   const float* scale, const float* bias) {
  // enough output features per thread that a thread's share is worth waking it for
  const int64_t grain = std::max<int64_t>(16, (1 << 16) / (K * sizeof(W)));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    n0 -= n0 % 4;  // blocks of rows stay whole (the split only moves a boundary)
    if (n1 != N) n1 -= n1 % 4;
    switch (M) {
      case 1: rows<1, P>(x, K, w, n0, n1, y, N, scale, bias); break;
      case 2: rows<2, P>(x, K, w, n0, n1, y, N, scale, bias); break;
      case 3: rows<3, P>(x, K, w, n0, n1, y, N, scale, bias); break;
      case 4: rows<4, P>(x, K, w, n0, n1, y, N, scale, bias); break;
      case 5: rows<5, P>(x, K, w, n0, n1, y, N, scale, bias); break;
      case 6: rows<6, P>(x, K, w, n0, n1, y, N, scale, bias); break;
      case 7: rows<7, P>(x, K, w, n0, n1, y, N, scale, bias); break;
      default: rows<8, P>(x, K, w, n0, n1, y, N, scale, bias); break;
    }
  });
}

// y [M, N] = x [M, K] @ weight [N, K].T * scale + bias, the weight fp32, bf16 or int8 (then with its
// fp32 scales); x, y, scale and bias are fp32 (scale and bias may be null). `x_is_bf16`: every value
// of x is a bf16 number (a bf16 model's activations), so that bf16 weights may take DotBF16.
inline void matmul(const float* x, int64_t M, int64_t K, const at::Tensor& weight, const float* scale,
                   const float* bias, float* y, bool x_is_bf16 = false) {
  if (M == 0) return;
  const int64_t N = weight.size(0);
  switch (weight.scalar_type()) {
    case at::kFloat: matmul<Widen<float>>(x, M, K, weight.const_data_ptr<float>(), N, y, scale, bias); break;
    case at::kBFloat16:
      if (x_is_bf16 && has_bf16_dot()) {
        static thread_local std::vector<at::BFloat16> x_bf16;
        x_bf16.assign(x, x + M * K);  // exact: the values are bf16 numbers
        matmul<DotBF16>(x_bf16.data(), M, K, weight.const_data_ptr<at::BFloat16>(), N, y, scale, bias);
      } else {
        matmul<Widen<at::BFloat16>>(x, M, K, weight.const_data_ptr<at::BFloat16>(), N, y, scale, bias);
      }
      break;
    case at::kChar: matmul<Widen<int8_t>>(x, M, K, weight.const_data_ptr<int8_t>(), N, y, scale, bias); break;
    default: TORCH_CHECK(false, "decode kernels: weights must be fp32, bf16 or int8, not ", weight.scalar_type());
  }
}

// `count` values as fp32: `t`'s own data when it is fp32, else converted into `buffer`.
inline const float* as_float(const at::Tensor& t, int64_t count, std::vector<float>& buffer) {
  if (t.scalar_type() == at::kFloat) return t.const_data_ptr<float>();
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "decode kernels: fp32 or bf16 activations, biases and norms, not ",
              t.scalar_type());
  const at::BFloat16* data = t.const_data_ptr<at::BFloat16>();
  buffer.resize(count);
  for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<float>(data[i]);
  return buffer.data();
}

// out[0:D] = softmax(query . k[l] over the positions l < L that mask allows (null: all)) @ v, for one
// query already scaled by 1/sqrt(D); k[l] = k + l * k_step, v[l] likewise, rows of D contiguous values.
// PyTorch's CPU attention is built for long queries; for one it costs 100-2000 us a layer, where this
// is a few dot products per position. `prob` holds L values.
template <typename T>
inline void attend(const float* query, const T* k, int64_t k_step, const T* v, int64_t v_step, int64_t L,
                   int64_t D, const bool* mask, float* prob, float* out) {
  float top = -INFINITY;
  for (int64_t l = 0; l < L; ++l) {
    if (mask && !mask[l]) { prob[l] = -INFINITY; continue; }
    const T* kl = k + l * k_step;
    __m512 dot = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 lanes = D - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1);
      dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, query + d), load16(kl + d, lanes), dot);
    }
    prob[l] = _mm512_reduce_add_ps(dot);
    top = std::max(top, prob[l]);
  }
  std::fill(out, out + D, 0.f);
  float total = 0.f;
  for (int64_t l = 0; l < L; ++l) {
    if (prob[l] == -INFINITY) continue;
    const float p = std::exp(prob[l] - top);
    total += p;
    const T* vl = v + l * v_step;
    const __m512 pv = _mm512_set1_ps(p);
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 lanes = D - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1);
      _mm512_mask_storeu_ps(out + d, lanes,
                            _mm512_fmadd_ps(pv, load16(vl + d, lanes), _mm512_maskz_loadu_ps(lanes, out + d)));
    }
  }
  for (int64_t d = 0; d < D; ++d) out[d] = total > 0.f ? out[d] / total : 0.f;
}

}  // namespace scratchgpt
