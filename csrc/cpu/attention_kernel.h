// What the CPU attention forward (attention_forward.cpp) and backward (attention_backward.cpp)
// share besides the tile bookkeeping (attention_tiles.h) and the block product
// (attention_gemm.h): the accumulation type, the task runner, the conversion of float16 /
// bfloat16 rows, the softmax's exp, the logit soft-capping of a score tile, one key tile of the
// online softmax, and the two entry points.
//
// Semantics: python/fastattn/reference.py::attention; the mask and bias rules are those of
// common/attention_params.h (pair_bias, span_logit_grad, local_key_range, ...), evaluated by
// the tile helpers of attention_tiles.h. Nothing of size (Sq, Sk) is ever allocated.
//
// Scores are kept transposed (keys x queries: "sT", nk x kBlockQ) so that everything the
// softmax does per query (max, exp, sums, rescale) is a plain vector operation across query
// lanes, and every matrix product is a "broadcast A, vector B" product (attention_gemm.h) read
// straight through the tensors' strides: q, k and v are never copied (float16/bfloat16 tiles
// are converted to float32 scratch, the math is fp32; float64 runs in float64 throughout).
//
// Speed (a 2-core AMD EPYC VM, AVX2 executed as 128-bit halves, measured FMA peak
// 38.6 GFLOP/s per core): about 84% of the time is in the micro-kernel (perf, forward +
// backward with a bias table), the rest is the online softmax (exp, max), dS and the bias.
// B=1, H=8, S=2048, D=64 fp32, 2 threads: forward ~0.84x the time of
// F.scaled_dot_product_attention without bias, forward+backward ~0.8x; see
// benchmarks/bench_attention.py and bench_window.py for the current figures.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "common/attention_args.h"
#include "common/attention_params.h"
#include "cpu/attention_gemm.h"
#include "cpu/attention_tiles.h"

namespace fastattn {
namespace cpu {

// The op entry points (registered in attention_forward.cpp).
AttentionOutputs attention_cpu(const AttentionArgs& a);
AttentionGrads attention_backward_cpu(const AttentionBackwardArgs& args);

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Multiply-adds (roughly) below which a call's tasks run on the calling thread: starting and
// joining an OpenMP team costs microseconds, more than such a call's arithmetic (a decode step
// with a short cache, a small test case).
constexpr int64_t kMinParallelWork = int64_t(1) << 17;

// Runs body(task, scratch) for every task in [0, num_tasks) on ATen's thread pool, handing
// tasks out dynamically (atomic counter) so that uneven tasks balance; `work` estimates the
// multiply-adds of all tasks. Every task writes only what it owns, so the results never depend
// on which thread ran which task.
template <typename MakeScratch, typename Body>
void run_tasks(int64_t num_tasks, int64_t work, const MakeScratch& make_scratch, const Body& body) {
  if (num_tasks <= 0) return;
  const int64_t workers = work < kMinParallelWork
                              ? 1
                              : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tasks));
  if (workers == 1) {
    auto scratch = make_scratch();
    for (int64_t t = 0; t < num_tasks; ++t) body(t, scratch);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) body(t, scratch);
  });
}

// dst[0, n) = src[0, n) converted to float. float16 / bfloat16 go through F16C / AVX2 (the
// scalar c10::Half conversion made float16 tiles ~50% slower than float32 ones).
template <typename scalar_t>
inline void convert_row(const scalar_t* src, float* dst, int64_t n) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    for (; c + 8 <= n; c += 8) {
      _mm256_storeu_ps(dst + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c))));
    }
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    for (; c + 8 <= n; c += 8) {
      const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c)));
      _mm256_storeu_ps(dst + c, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
  }
#endif
  for (; c < n; ++c) dst[c] = static_cast<float>(src[c]);
}

// Rows [row0, row0 + n) of a (rows, dim) operand with row stride `stride`, as acc_t: the
// tensor's own memory when it already is acc_t, else converted into `buf` (n x dim).
// Returns the pointer and sets *ld to its row stride.
template <typename scalar_t, typename acc_t>
inline const acc_t* rows_as_acc(const scalar_t* src, int64_t stride, int64_t n, int64_t dim,
                                acc_t* buf, int64_t* ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    *ld = stride;
    return src;
  } else {
    for (int64_t r = 0; r < n; ++r) convert_row(src + r * stride, buf + r * dim, dim);
    *ld = dim;
    return buf;
  }
}

// exp(x[0..N)) in place, for the softmax's arguments x = s - max (<= 0 up to rounding;
// x = -inf gives 0, NaN stays NaN). float: x = n ln2 + r with one FMA against ln2 rounded to
// float (which adds a relative error of |n| * 1.9e-9: under 1 ulp for x >= -20), a degree-5
// polynomial fitted for relative error on [-ln2/2, ln2/2], and 2^n built in the exponent bits.
// Inputs are clamped at -88, where round(x / ln2) = -127 and the 2^n bits are +0.0, so anything
// below ~-87.7 gives exactly 0 with no extra mask. Max error (measured against double exp on
// [-87, 0]): 3 ulp for x >= -10, 6.5 ulp at the bottom of the range (ATen's exp_u20: ~20 ulp).
// 11 vector operations per vector, and the N vectors go through each step together: on a
// 2-core AMD EPYC VM one exp chain is latency-bound (~24 cycles per vector), four interleaved
// ones take ~15.
template <int N>
inline void softmax_exp_n(Vectorized<float>* x) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 lowest = _mm256_set1_ps(-88.0f);
  const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f);  // 1.5 * 2^23 + exponent bias
  __m256 xc[N], t[N], r[N], poly[N];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) xc[i] = _mm256_max_ps(lowest, x[i]);  // NaN passes (2nd operand)
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) t[i] = _mm256_fmadd_ps(xc[i], _mm256_set1_ps(1.44269504088896341f), magic);
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    const __m256 n = _mm256_sub_ps(t[i], magic);  // round(x / ln2)
    r[i] = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147180559945f), xc[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    poly[i] = _mm256_fmadd_ps(_mm256_set1_ps(0.008297650143504143f), r[i], _mm256_set1_ps(0.04191538318991661f));
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) poly[i] = _mm256_fmadd_ps(poly[i], r[i], _mm256_set1_ps(0.16667574644088745f));
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) poly[i] = _mm256_fmadd_ps(poly[i], r[i], _mm256_set1_ps(0.49998894333839417f));
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) poly[i] = _mm256_fmadd_ps(poly[i], r[i], _mm256_set1_ps(0.9999997019767761f));
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) poly[i] = _mm256_fmadd_ps(poly[i], r[i], _mm256_set1_ps(1.0000001192092896f));
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    // The low bits of t hold n + 127: shifted into the exponent field they make 2^n.
    const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t[i]), 23));
    x[i] = Vectorized<float>(_mm256_mul_ps(poly[i], two_n));
  }
#else
  for (int i = 0; i < N; ++i) x[i] = x[i].exp();
#endif
}
template <int N>
inline void softmax_exp_n(Vectorized<double>* x) {
  for (int i = 0; i < N; ++i) x[i] = x[i].exp();
}
template <typename acc_t>
inline Vectorized<acc_t> softmax_exp(Vectorized<acc_t> x) {
  softmax_exp_n<1>(&x);
  return x;
}

// s + bias, where a bias of -inf masks the pair: the result is then -inf whatever s is (a NaN
// or +inf score of a hidden key must not leak into the rows that cannot see it, as adding
// -inf to it would).
template <typename acc_t>
inline Vectorized<acc_t> masked_add(Vectorized<acc_t> s, Vectorized<acc_t> bias) {
  const Vectorized<acc_t> neg_inf(-std::numeric_limits<acc_t>::infinity());
  return Vectorized<acc_t>::blendv(s + bias, neg_inf, bias == neg_inf);
}
template <typename acc_t>
inline acc_t masked_add(acc_t s, acc_t bias) {
  return bias == -std::numeric_limits<acc_t>::infinity() ? bias : s + bias;
}

// Rows of a score tile whose exponentials are computed together (see softmax_exp_n).
constexpr int kExpRows = 4;

// Logit soft-capping of N score vectors in place: s = softcap * tanh(s / softcap), and, when
// grad is not null, each element's derivative d(capped)/ds = 1 - tanh^2 into grad.
// float (AVX2): tanh(x) = x * P(x^2) / Q(x^2), the degree 13/6 rational approximation of
// Eigen's fast float tanh, on x clamped to +-7.9988 (where it rounds to +-1). Its error is
// relative everywhere: measured against double tanh on a dense grid of [-12, 12] and down to
// 1e-30, at most 4.5 ulp (2.7e-7 absolute). Relative accuracy near 0 is what a large softcap
// needs: s = 50 capped at 1e4 is tanh(0.005) scaled back by 1e4, so an absolute 1e-7 in tanh
// would be 1e-3 in the logit (the form (1 - e) / (1 + e), e = exp(-2|x|), which cancels near
// 0, is off by that much). 15 vector operations (one more for the derivative), one of them a
// division, and no exp; NaN stays NaN (the clamp keeps it), +-inf gives +-softcap. Two vectors
// go through together (kCapVecs): each holds four registers through the two polynomials.
template <int N, bool kGrad>
inline void softcap_n(Vectorized<float>* s, float softcap, Vectorized<float>* grad) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 inv_cap = _mm256_set1_ps(1.0f / softcap);
  __m256 x[N], x2[N], p[N], q[N];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    // min / max return their second operand when one is NaN: the NaN passes.
    x[i] = _mm256_min_ps(_mm256_set1_ps(7.99881172180175781f), _mm256_mul_ps(s[i], inv_cap));
    x[i] = _mm256_max_ps(_mm256_set1_ps(-7.99881172180175781f), x[i]);
    x2[i] = _mm256_mul_ps(x[i], x[i]);
    p[i] = _mm256_fmadd_ps(x2[i], _mm256_set1_ps(-2.76076847742355e-16f), _mm256_set1_ps(2.00018790482477e-13f));
    q[i] = _mm256_fmadd_ps(x2[i], _mm256_set1_ps(1.19825839466702e-06f), _mm256_set1_ps(1.18534705686654e-04f));
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    p[i] = _mm256_fmadd_ps(x2[i], p[i], _mm256_set1_ps(-8.60467152213735e-11f));
    q[i] = _mm256_fmadd_ps(x2[i], q[i], _mm256_set1_ps(2.26843463243900e-03f));
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    p[i] = _mm256_fmadd_ps(x2[i], p[i], _mm256_set1_ps(5.12229709037114e-08f));
    q[i] = _mm256_fmadd_ps(x2[i], q[i], _mm256_set1_ps(4.89352518554385e-03f));
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(x2[i], p[i], _mm256_set1_ps(1.48572235717979e-05f));
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(x2[i], p[i], _mm256_set1_ps(6.37261928875436e-04f));
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(x2[i], p[i], _mm256_set1_ps(4.89352455891786e-03f));
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    const __m256 t = _mm256_div_ps(_mm256_mul_ps(x[i], p[i]), q[i]);
    if constexpr (kGrad) grad[i] = Vectorized<float>(_mm256_fnmadd_ps(t, t, _mm256_set1_ps(1.0f)));
    s[i] = Vectorized<float>(_mm256_mul_ps(t, _mm256_set1_ps(softcap)));
  }
#else
  const Vectorized<float> cap(softcap), one(1.0f);
  for (int i = 0; i < N; ++i) {
    const Vectorized<float> t = (s[i] / cap).tanh();
    if constexpr (kGrad) grad[i] = one - t * t;
    s[i] = t * cap;
  }
#endif
}

// Vectors capped together by softcap_rows (with four, their 16 live registers and the
// constants would not fit the 16 ymm registers).
constexpr int kCapVecs = 2;

// softcap_n over the rows [0, nk) x lanes [0, lanes) of a tile (row stride kBlockQ).
template <bool kGrad>
inline void softcap_rows(float* sT, int64_t nk, int64_t lanes, float softcap, float* grad) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  Vec x[kCapVecs], g[kCapVecs];
  for (int64_t jj = 0; jj < nk; ++jj) {
    float* row = sT + jj * kBlockQ;
    float* grad_row = kGrad ? grad + jj * kBlockQ : nullptr;
    int64_t v = 0;
    for (; v + kCapVecs * W <= lanes; v += kCapVecs * W) {
      for (int u = 0; u < kCapVecs; ++u) x[u] = Vec::loadu(row + v + u * W);
      softcap_n<kCapVecs, kGrad>(x, softcap, g);
      for (int u = 0; u < kCapVecs; ++u) x[u].store(row + v + u * W);
      for (int u = 0; u < kCapVecs && kGrad; ++u) g[u].store(grad_row + v + u * W);
    }
    for (; v < lanes; v += W) {
      x[0] = Vec::loadu(row + v);
      softcap_n<1, kGrad>(x, softcap, g);
      x[0].store(row + v);
      if constexpr (kGrad) g[0].store(grad_row + v);
    }
  }
}

// Caps the rows [0, nk) x lanes [0, lanes) of a score tile sT (row stride kBlockQ, lanes a
// multiple of the vector width) right after its product, before any bias or mask: see
// softcap_n. With grad (same layout) also keeps each element's derivative 1 - tanh^2 there,
// for the backward's dS. float64 takes the exact path of attention_params.h (softcap_score,
// softcap_grad), one element at a time.
template <typename acc_t>
inline void softcap_tile(acc_t* sT, int64_t nk, int64_t lanes, acc_t softcap, acc_t* grad) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (grad == nullptr) {
      softcap_rows<false>(sT, nk, lanes, softcap, nullptr);
    } else {
      softcap_rows<true>(sT, nk, lanes, softcap, grad);
    }
  } else {
    for (int64_t jj = 0; jj < nk; ++jj) {
      for (int64_t x = jj * kBlockQ; x < jj * kBlockQ + lanes; ++x) {
        sT[x] = softcap_score(sT[x], softcap);
        if (grad != nullptr) grad[x] = softcap_grad(sT[x], softcap);
      }
    }
  }
}

// One key tile of the online softmax, vectorized over the lanes [0, lanes) (a multiple of the
// vector width): adds the tile's bias (`diag`: per-diagonal vector of a task with one head, see
// tile_bias, or null; `uniform`: a term per lane, 0 where the bias is already in sT), updates
// the running max m and sum l, turns sT into probabilities exp(s + bias - m_new) and returns in
// alpha the factor exp(m_old - m_new) by which earlier output must be rescaled. Rows with no
// visible key so far (m = -inf) stay at m = -inf, l = 0, P = 0, without NaN.
template <typename acc_t>
inline void online_softmax_tile(acc_t* sT, int64_t nk, int64_t lanes, const acc_t* diag,
                                const acc_t* uniform, acc_t* m, acc_t* l, acc_t* alpha) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec neg_inf(-std::numeric_limits<acc_t>::infinity());
  const Vec zero(acc_t(0));
  for (int64_t v = 0; v < lanes; v += W) {
    const Vec lane_uniform = Vec::loadu(uniform + v);
    Vec tile_max = neg_inf;
    if (diag != nullptr) {
      for (int64_t jj = 0; jj < nk; ++jj) {
        acc_t* s = sT + jj * kBlockQ + v;
        const Vec biased = masked_add(Vec::loadu(s), Vec::loadu(diag + (nk - 1 - jj) + v));
        biased.store(s);
        tile_max = at::vec::maximum(tile_max, biased);
      }
    } else {
      for (int64_t jj = 0; jj < nk; ++jj) tile_max = at::vec::maximum(tile_max, Vec::loadu(sT + jj * kBlockQ + v));
    }
    tile_max = tile_max + lane_uniform;  // the uniform term is added inside the exp below
    const Vec m_old = Vec::loadu(m + v);
    const Vec m_new = at::vec::maximum(m_old, tile_max);  // NaN propagates
    const Vec m_safe = Vec::blendv(m_new, zero, m_new == neg_inf);
    const Vec a = softmax_exp(m_old - m_safe);
    // exp(s + uniform - m_new) = exp(s - shift)
    const Vec shift = m_safe - lane_uniform;
    Vec sum = zero;
    int64_t jj = 0;
    for (; jj + kExpRows <= nk; jj += kExpRows) {
      Vec e[kExpRows];
#pragma GCC unroll 4
      for (int u = 0; u < kExpRows; ++u) e[u] = Vec::loadu(sT + (jj + u) * kBlockQ + v) - shift;
      softmax_exp_n<kExpRows>(e);
#pragma GCC unroll 4
      for (int u = 0; u < kExpRows; ++u) {
        e[u].store(sT + (jj + u) * kBlockQ + v);
        sum = sum + e[u];
      }
    }
    for (; jj < nk; ++jj) {
      acc_t* s = sT + jj * kBlockQ + v;
      const Vec e = softmax_exp(Vec::loadu(s) - shift);
      e.store(s);
      sum = sum + e;
    }
    (Vec::loadu(l + v) * a + sum).store(l + v);
    m_new.store(m + v);
    a.store(alpha + v);
  }
}

}  // namespace cpu
}  // namespace fastattn
