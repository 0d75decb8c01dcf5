// CPU kernels of fastattn::attention and fastattn::attention_backward.
//
// Semantics: python/fastattn/reference.py::attention; the mask and bias rules are those of
// common/attention_params.h (pair_bias, span_logit_grad, local_key_range, ...), evaluated by
// the tile helpers of cpu/attention_tiles.h. Nothing of size (Sq, Sk) is ever allocated.
//
// Forward (flash / online softmax), one task per (batch, query head, query block of kBlockQ),
// or, for short queries (decode steps), per (batch, several heads of one kv group): see
// ForwardTask. The query rows of a task are its "lanes":
//   qT  = scale * Q_blockᵀ                         (Dqk x BQ, packed once per task)
//   for each visited key tile (attention_tiles.h: at most two key ranges, tiles outside the
//   window / span / causal range are skipped):
//     sT  = K_tile · qT                            (nk x BQ: keys in rows, queries in lanes)
//     sT += bias (per-diagonal vector for local tiles, per element for global tiles; -inf masks)
//     online softmax per query lane: m, l, alpha = exp(m_old - m_new), P = exp(sT - m_new)
//     oT  = alpha * oT + V_tileᵀ · P              (Dv x BQ)
//   out = oTᵀ / l, lse = m + log(l)  (an empty row: out = 0, lse = -inf)
// Scores are kept transposed (keys x queries) so that everything the softmax does per query
// (max, exp, sums, rescale) is a plain vector operation across query lanes, and every matrix
// product is a "broadcast A, vector B" product (attention_gemm.h) read straight through the
// tensors' strides: q, k and v are never copied (float16/bfloat16 tiles are converted to
// float32 scratch, the math is fp32; float64 runs in float64 throughout).
//
// Backward, one task per (batch, kv head, chunk of query blocks); the chunk count depends only
// on the shapes, never on the thread count:
//   for each query head g of the group, each query block of the chunk (fixed order):
//     D = rowsum(dO * O) - grad_lse; for each visited key tile:
//       P   = exp(K·qT + bias - lse)               (recomputed, nk x BQ)
//       dP  = V · dOᵀ,  dS = P * (dP - D)
//       dV_tile += P · dO,  dK_tile += dS · Q,  dQ_block += dSᵀ · K
//       table / span gradients: sums of dS along the tile's diagonals (they depend on d only)
//   dQ (and scale) written by the task that owns the query block; dK/dV accumulated by the
//   task that owns (b, kv head) over its chunk; chunk partials, table and span partials are
//   reduced afterwards in a fixed order. No accumulation order depends on threads, so two
//   backward passes give bitwise-equal gradients.
//
// Speed (development machine: 2-core AMD EPYC, AVX2 executed as 128-bit halves, measured FMA
// peak 38.6 GFLOP/s per core): about 84% of the time is in the micro-kernel (perf, forward +
// backward with a bias table), the rest is the online softmax (exp, max), dS and the bias.
// B=1, H=8, S=2048, D=64 fp32, 2 threads: forward ~0.94x the time of
// F.scaled_dot_product_attention without bias, forward+backward ~0.9x; see
// benchmarks/bench_attention.py and bench_window.py for the current figures.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "common/attention_args.h"
#include "common/attention_params.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/attention_gemm.h"
#include "cpu/attention_tiles.h"

namespace fastattn {
namespace cpu {
namespace {

// Tile sizes. kBlockQ: query lanes per task (a multiple of the vector width; 32 = one 4-vector
// column block of the micro-kernel); kBlockK: keys per tile. Measured (CPU time, 1 thread,
// S=2048, D=64, fp32, fwd / fwd+bwd ms): 64x64 78/267, 64x128 84/274, 128x64 81/259,
// 128x128 78/256, 32x256 80/278, 32x128 75/255. Small query blocks also keep windowed
// tasks tight (each block visits its window plus kBlockQ keys).
constexpr int64_t kBlockQ = 32;
constexpr int64_t kBlockK = 128;

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

// Packs scale * rows[0 .. nq) (row stride `stride`, `dim` columns) transposed into the lanes
// [lane0, lane0 + nq) of dst (dim x kBlockQ); with lane0 == 0 the lanes [nq, kBlockQ) are
// zeroed (padding), with lane0 > 0 the other lanes are left as they are (see pad_lanes).
template <typename scalar_t, typename acc_t>
inline void pack_transposed(const scalar_t* rows, int64_t stride, int64_t nq, int64_t dim,
                            acc_t scale, acc_t* dst, int64_t lane0 = 0) {
  if (lane0 == 0) {
    for (int64_t d = 0; d < dim; ++d) {
      std::fill(dst + d * kBlockQ + nq, dst + (d + 1) * kBlockQ, acc_t(0));
    }
  }
  for (int64_t ii = 0; ii < nq; ++ii) {
    const scalar_t* r = rows + ii * stride;
    for (int64_t d = 0; d < dim; ++d) dst[d * kBlockQ + lane0 + ii] = scale * static_cast<acc_t>(r[d]);
  }
}

// Zeroes the lanes [lanes, padded_lanes) of the `dim` rows of a (dim x kBlockQ) lane array.
template <typename acc_t>
inline void pad_lanes(acc_t* dst, int64_t dim, int64_t lanes, int64_t padded_lanes) {
  for (int64_t d = 0; d < dim; ++d) {
    std::fill(dst + d * kBlockQ + lanes, dst + d * kBlockQ + padded_lanes, acc_t(0));
  }
}

// The bias of one tile (queries [i0, i0 + nq), keys [j0, j0 + nk)) on the transposed scores
// sT (nk x kBlockQ), in the cheapest form that is exact for it:
//   - a uniform tile (uniform_distance_bias: every pair visible, one common term, e.g. a tile
//     whose distances all clamp to one end row of the rel_bias table, or any unmasked tile
//     without a bias) gets `uniform`, which the caller folds into its max / exp shift: no
//     per-element work at all;
//   - another tile without global pairs gets `diag`, its bias per diagonal (row jj of sT adds
//     diag[(nk - 1 - jj) + lane], -inf where masked), which the caller adds in its next pass
//     over sT (diag stays null when every diagonal is visible with a zero bias);
//   - a tile with global pairs gets its bias (or -inf) per element, applied here.
// `diag_scratch` holds kBlockQ + kBlockK entries. `tile_may_need_bias` is false when no option
// can give a tile a bias or a mask.
template <typename acc_t>
struct TileBias {
  const acc_t* diag = nullptr;  // per-diagonal bias, or null
  acc_t uniform = 0;            // a term common to every pair (only when diag is null)
  bool one_table_row = false;   // uniform, and all pairs read one rel_bias row (or none)
};

template <typename acc_t>
inline TileBias<acc_t> tile_bias(const AttentionParamsT<acc_t>& p, int64_t b, int64_t h,
                                 int64_t i0, int64_t nq, int64_t j0, int64_t nk,
                                 bool tile_may_need_bias, acc_t* sT, acc_t* diag_scratch) {
  TileBias<acc_t> tb;
  if (!tile_may_need_bias) {
    tb.one_table_row = true;
    return tb;
  }
  // Visited tiles hold only keys < key_len and queries < Sq, so the distance rule decides.
  int64_t row = -1;
  if (uniform_distance_bias(p, h, p.query_pos(i0) - (j0 + nk - 1), p.query_pos(i0 + nq - 1) - j0,
                            &tb.uniform, &row)) {
    tb.one_table_row = true;
    return tb;
  }
  tb.uniform = 0;
  if (!tile_has_global_pair(p, i0, j0)) {
    if (local_tile_diagonal_bias(p, b, h, i0, nq, j0, nk, kBlockQ + nk - 1, diag_scratch)) {
      tb.diag = diag_scratch;
    }
    return tb;
  }
  // A tile with global pairs: the rules per element.
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t jj = 0; jj < nk; ++jj) {
    acc_t* row_s = sT + jj * kBlockQ;
    for (int64_t ii = 0; ii < nq; ++ii) {
      acc_t bias = 0;
      if (pair_bias(p, b, h, i0 + ii, j0 + jj, &bias)) {
        row_s[ii] += bias;
      } else {
        row_s[ii] = neg_inf;
      }
    }
  }
  return tb;
}

// exp(x[0..N)) in place, for the softmax's arguments x = s - max (<= 0 up to rounding;
// x = -inf gives 0, NaN stays NaN). float: x = n ln2 + r with one FMA against ln2 rounded to
// float (which adds a relative error of |n| * 1.9e-9: under 1 ulp for x >= -20), a degree-5
// polynomial fitted for relative error on [-ln2/2, ln2/2], and 2^n built in the exponent bits.
// Inputs are clamped at -88, where round(x / ln2) = -127 and the 2^n bits are +0.0, so anything
// below ~-87.7 gives exactly 0 with no extra mask. Max error (measured against double exp on
// [-87, 0]): 3 ulp for x >= -10, 6.5 ulp at the bottom of the range (ATen's exp_u20: ~20 ulp).
// 11 vector operations per vector (the previous two-constant version with a mask took 14), and
// the N vectors go through each step together: on the development machine one exp chain is
// latency-bound (~24 cycles per vector), four interleaved ones take ~15.
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

// Whether a local tile can have a bias or a mask at all (else tile_bias skips it). Key
// lengths never mask inside a visited tile: the key ranges stop at key_len.
template <typename acc_t>
inline bool any_local_bias(const AttentionParamsT<acc_t>& p) {
  return p.causal || p.has_window() || p.has_span() || p.rel_bias != nullptr ||
         p.alibi_slopes != nullptr;
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
// Rows of a score tile whose exponentials are computed together (see softmax_exp_n).
constexpr int kExpRows = 4;

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
        const Vec biased = Vec::loadu(s) + Vec::loadu(diag + (nk - 1 - jj) + v);
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

// A forward task: the query rows [i0, i0 + nq) of the heads h0 .. h0 + num_heads - 1 of batch
// b, all in one kv group and all visiting the same key ranges. Their rows share the score
// tile's lanes, head after head (lane g * nq + ii is row i0 + ii of head h0 + g), so each K and
// V tile is read once for all of them. A task normally holds one query block of one head;
// when a head's queries fill at most half a block (decode steps, short chunks), a task packs
// the heads of a GQA/MQA group instead, so that the lanes are not mostly padding and a group's
// K and V are not read once per query head, but no more heads than keep every thread busy
// (an MQA step at batch 1 is otherwise one task). Every lane's arithmetic is the same whatever
// else shares its task (the products, softmax and bias are per lane), so the packing changes
// speed, never results: it may depend on the thread count.
struct ForwardTask {
  int64_t b, h0, num_heads, i0, nq;
};

inline bool same_key_ranges(const KeyRanges& x, const KeyRanges& y) {
  if (x.count != y.count) return false;
  for (int c = 0; c < x.count; ++c) {
    if (x.lo[c] != y.lo[c] || x.hi[c] != y.hi[c]) return false;
  }
  return true;
}

template <typename acc_t>
std::vector<ForwardTask> forward_tasks(const AttentionParamsT<acc_t>& p) {
  const int64_t B = p.batch, Hkv = p.heads_kv, Sq = p.seqlen_q, group = p.group_size();
  const int64_t num_qblocks = (Sq + kBlockQ - 1) / kBlockQ;
  int64_t max_heads = (num_qblocks == 1 && 2 * Sq <= kBlockQ) ? kBlockQ / Sq : 1;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  max_heads = std::max<int64_t>(1, std::min(max_heads, (B * p.heads_q + threads - 1) / threads));
  std::vector<ForwardTask> tasks;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t hkv = 0; hkv < Hkv; ++hkv) {
      for (int64_t qb = 0; qb < num_qblocks; ++qb) {
        const int64_t i0 = qb * kBlockQ, nq = std::min(kBlockQ, Sq - i0);
        KeyRanges task_ranges;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hkv * group + g;
          const KeyRanges ranges = visible_key_ranges(p, b, h, i0, i0 + nq);
          ForwardTask* last = tasks.empty() ? nullptr : &tasks.back();
          if (g > 0 && last->num_heads < max_heads && same_key_ranges(ranges, task_ranges)) {
            ++last->num_heads;
          } else {
            tasks.push_back({b, h, 1, i0, nq});
            task_ranges = ranges;
          }
        }
      }
    }
  }
  return tasks;
}

template <typename acc_t>
struct ForwardScratch {
  std::vector<acc_t> qT, sT, oT, m, l, alpha, lane_uniform, diag, k_buf, v_buf;
  std::vector<acc_t> q_rows;  // tasks of single-row heads only (see dot_scores)
  ForwardScratch(int64_t dqk, int64_t dv, bool need_convert)
      : qT(dqk * kBlockQ), sT(kBlockK * kBlockQ), oT(dv * kBlockQ), m(kBlockQ), l(kBlockQ),
        alpha(kBlockQ), lane_uniform(kBlockQ), diag(kBlockQ + kBlockK),
        k_buf(need_convert ? kBlockK * dqk : 0), v_buf(need_convert ? kBlockK * dv : 0),
        q_rows(kBlockQ * dqk) {}
};

// Scores of tasks whose heads have one query row each (decode steps): sT[jj][x] = the dot
// product of query row x (q_rows, row-major, scale included) with key jj, for the first
// `lanes` lanes. A key block product would spend a vector lane per query row, i.e. W times the
// work for one row; here each score is a dot product along the head dim: vector partial sums
// over d, then a fixed shuffle tree, then the tail. Four keys go through together (independent
// chains), and each score is the same sequence of operations whatever its neighbours, so the
// result of a row never depends on what else its task holds (GQA stays bitwise MHA).
template <typename acc_t>
inline void dot_scores(const acc_t* k_tile, int64_t ldk, int64_t nk, const acc_t* q_rows,
                       int64_t lanes, int64_t lanes_padded, int64_t dim, acc_t* sT) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t kKeys = 4;
  const int64_t dim_vec = dim / W * W;
  auto add = [](Vec& x, Vec& y) { return x + y; };
  for (int64_t j0 = 0; j0 < nk; j0 += kKeys) {
    const int64_t n = std::min(kKeys, nk - j0);
    for (int64_t x = 0; x < lanes; ++x) {
      const acc_t* q = q_rows + x * dim;
      Vec acc[kKeys];
      for (int64_t u = 0; u < kKeys; ++u) acc[u] = Vec(acc_t(0));
      for (int64_t d = 0; d < dim_vec; d += W) {
        const Vec qv = Vec::loadu(q + d);
#pragma GCC unroll 4
        for (int64_t u = 0; u < kKeys; ++u) {
          if (u < n) acc[u] = at::vec::fmadd(qv, Vec::loadu(k_tile + (j0 + u) * ldk + d), acc[u]);
        }
      }
      for (int64_t u = 0; u < n; ++u) {
        const acc_t* k_row = k_tile + (j0 + u) * ldk;
        acc_t sum = at::vec::vec_reduce_all<acc_t>(add, acc[u]);
        for (int64_t d = dim_vec; d < dim; ++d) sum = std::fma(q[d], k_row[d], sum);
        sT[(j0 + u) * kBlockQ + x] = sum;
      }
    }
  }
  // Padding lanes score 0, as a zero query would.
  for (int64_t jj = 0; jj < nk && lanes < lanes_padded; ++jj) {
    std::fill(sT + jj * kBlockQ + lanes, sT + jj * kBlockQ + lanes_padded, acc_t(0));
  }
}

template <typename scalar_t>
void attention_forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const AttentionParamsT<acc_type<scalar_t>>& p, at::Tensor& out,
                            at::Tensor& lse) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr bool need_convert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t Hq = p.heads_q, Sq = p.seqlen_q, Dqk = p.head_dim_qk, Dv = p.head_dim_v;
  const int64_t group = p.group_size();
  const std::vector<ForwardTask> tasks = forward_tasks(p);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  if (num_tasks == 0) return;
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  float* lse_ptr = lse.data_ptr<float>();
  const bool may_need_bias = any_local_bias(p);
  const acc_t scale = static_cast<acc_t>(p.scale);
  auto padded = [](int64_t lanes) { return (lanes + W - 1) / W * W; };

  // Most expensive tasks first (causal, windows and global rows make them uneven), then the
  // dynamic hand-out balances the tail.
  std::vector<int64_t> cost(num_tasks);
  for (int64_t t = 0; t < num_tasks; ++t) {
    const ForwardTask& task = tasks[t];
    const KeyRanges r = visible_key_ranges(p, task.b, task.h0, task.i0, task.i0 + task.nq);
    cost[t] = 0;
    for (int c = 0; c < r.count; ++c) cost[t] += r.hi[c] - r.lo[c];
    cost[t] *= padded(task.num_heads * task.nq);
  }
  std::vector<int64_t> order(num_tasks);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  const int64_t work = std::accumulate(cost.begin(), cost.end(), int64_t(0)) * (Dqk + Dv);

  run_tasks(
      num_tasks, work, [&] { return ForwardScratch<acc_t>(Dqk, Dv, need_convert); },
      [&](int64_t task_index, ForwardScratch<acc_t>& s) {
        const ForwardTask& task = tasks[order[task_index]];
        const int64_t b = task.b, h0 = task.h0, hkv = h0 / group, heads = task.num_heads;
        const int64_t i0 = task.i0, nq = task.nq, i1 = i0 + nq;
        const int64_t lanes = heads * nq, lanes_padded = padded(lanes);
        // Heads with one query row each (decode steps) get their scores by dot_scores. A task
        // of a single row also keeps its output as a row (the first Dv entries of oT) and adds
        // o += P · V_tile: the same fused multiply-adds per element, in the same order, as the
        // lane product, with no vector lanes spent on padding (Dv a multiple of W: the row
        // product has no scalar column tail).
        const bool dot_mode = nq == 1;
        const bool row_mode = lanes == 1 && Dv % W == 0;
        const scalar_t* k_head = k_ptr + b * p.k_stride_b + hkv * p.k_stride_h;
        const scalar_t* v_head = v_ptr + b * p.v_stride_b + hkv * p.v_stride_h;

        for (int64_t g = 0; g < heads; ++g) {
          const scalar_t* q_rows = q_ptr + b * p.q_stride_b + (h0 + g) * p.q_stride_h + i0 * p.q_stride_s;
          pack_transposed(q_rows, p.q_stride_s, nq, Dqk, scale, s.qT.data(), g * nq);
          if (dot_mode) {
            for (int64_t d = 0; d < Dqk; ++d) s.q_rows[g * Dqk + d] = s.qT[d * kBlockQ + g];
          }
        }
        pad_lanes(s.qT.data(), Dqk, lanes, lanes_padded);
        std::fill(s.m.begin(), s.m.end(), -std::numeric_limits<acc_t>::infinity());
        std::fill(s.l.begin(), s.l.end(), acc_t(0));
        std::fill(s.oT.begin(), s.oT.end(), acc_t(0));
        std::fill(s.lane_uniform.begin(), s.lane_uniform.end(), acc_t(0));

        // Every head of the task visits these (forward_tasks groups heads by them).
        const KeyRanges ranges = visible_key_ranges(p, b, h0, i0, i1);
        for (int rg = 0; rg < ranges.count; ++rg) {
          for (int64_t j0 = ranges.lo[rg]; j0 < ranges.hi[rg]; j0 += kBlockK) {
            const int64_t nk = std::min(kBlockK, ranges.hi[rg] - j0);
            int64_t ldk = 0, ldv = 0;
            const acc_t* k_tile = rows_as_acc(k_head + j0 * p.k_stride_s, p.k_stride_s, nk, Dqk,
                                              s.k_buf.data(), &ldk);
            if (dot_mode) {
              dot_scores(k_tile, ldk, nk, s.q_rows.data(), lanes, lanes_padded, Dqk, s.sT.data());
            } else {
              // sT = K_tile · (scale * Q_lanes)ᵀ
              gemm_bcast<acc_t, false>(nk, lanes_padded, Dqk, k_tile, ldk, 1, s.qT.data(),
                                       kBlockQ, s.sT.data(), kBlockQ);
            }
            // The bias, head by head. A task with one head adds a per-diagonal bias inside the
            // softmax's first pass; with several heads each head's diagonals are added here.
            const acc_t* fused_diag = nullptr;
            for (int64_t g = 0; g < heads; ++g) {
              acc_t* sT_head = s.sT.data() + g * nq;
              const TileBias<acc_t> tb = tile_bias(p, b, h0 + g, i0, nq, j0, nk, may_need_bias,
                                                   sT_head, s.diag.data());
              std::fill(s.lane_uniform.begin() + g * nq, s.lane_uniform.begin() + (g + 1) * nq, tb.uniform);
              if (tb.diag != nullptr && heads == 1) {
                fused_diag = tb.diag;
              } else if (tb.diag != nullptr) {
                for (int64_t jj = 0; jj < nk; ++jj) {
                  const acc_t* diag_row = tb.diag + (nk - 1 - jj);
                  for (int64_t ii = 0; ii < nq; ++ii) sT_head[jj * kBlockQ + ii] += diag_row[ii];
                }
              }
            }
            online_softmax_tile(s.sT.data(), nk, lanes_padded, fused_diag, s.lane_uniform.data(),
                                s.m.data(), s.l.data(), s.alpha.data());
            bool rescale = false;
            for (int64_t x = 0; x < lanes; ++x) rescale = rescale || s.alpha[x] != acc_t(1);
            if (rescale && row_mode) {
              const Vec a(s.alpha[0]);
              for (int64_t d = 0; d < Dv; d += W) (Vec::loadu(s.oT.data() + d) * a).store(s.oT.data() + d);
            } else if (rescale) {
              for (int64_t d = 0; d < Dv; ++d) {
                acc_t* o = s.oT.data() + d * kBlockQ;
                for (int64_t x = 0; x < lanes_padded; x += W) {
                  (Vec::loadu(o + x) * Vec::loadu(s.alpha.data() + x)).store(o + x);
                }
              }
            }
            const acc_t* v_tile = rows_as_acc(v_head + j0 * p.v_stride_s, p.v_stride_s, nk, Dv,
                                              s.v_buf.data(), &ldv);
            if (row_mode) {
              // o (the first Dv entries of oT) += P (lane 0 of sT) · V_tile
              gemm_bcast<acc_t, true>(1, Dv, nk, s.sT.data(), 0, kBlockQ, v_tile, ldv,
                                      s.oT.data(), Dv);
            } else {
              // oT += V_tileᵀ · P   (A(d, j) = V[j][d])
              gemm_bcast<acc_t, true>(Dv, lanes_padded, nk, v_tile, 1, ldv, s.sT.data(), kBlockQ,
                                      s.oT.data(), kBlockQ);
            }
          }
        }

        // out = oTᵀ / l, lse = m + log l. Empty rows: zeros and -inf. A NaN or +inf logit
        // makes the row NaN (lse NaN / +inf), as in the reference.
        for (int64_t x = 0; x < lanes; ++x) {
          const int64_t h = h0 + x / nq, i = i0 + x % nq;
          scalar_t* o = out_ptr + b * p.o_stride_b + h * p.o_stride_h + i * p.o_stride_s;
          float* lse_i = lse_ptr + (b * Hq + h) * Sq + i;
          const acc_t mi = s.m[x], li = s.l[x];
          if (std::isnan(mi) || mi == std::numeric_limits<acc_t>::infinity()) {
            for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
            *lse_i = static_cast<float>(mi);
          } else if (li > acc_t(0)) {
            const acc_t inv = acc_t(1) / li;
            const int64_t o_stride = row_mode ? 1 : kBlockQ;
            for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<scalar_t>(s.oT[d * o_stride + x] * inv);
            *lse_i = static_cast<float>(mi + std::log(li));
          } else {
            for (int64_t d = 0; d < Dv; ++d) o[d] = scalar_t(0);
            *lse_i = -std::numeric_limits<float>::infinity();
          }
        }
      });
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------
// Exact log-sum-exp of the rows of one query block (float64 backward): the forward's online
// softmax without the output. `work` holds >= 4 * kBlockQ entries. Writes lse_safe[ii] for the
// nq rows: lse, or +inf for a row with no visible key (so that exp(s - lse) = 0 there).
template <typename acc_t, typename scalar_t>
void recompute_lse(const AttentionParamsT<acc_t>& p, int64_t b, int64_t h, int64_t i0, int64_t nq,
                   const KeyRanges& ranges, const scalar_t* k_head, bool may_need_bias,
                   const acc_t* qT, acc_t* sT, acc_t* diag, acc_t* work, acc_t* lse_safe) {
  static_assert(std::is_same_v<scalar_t, acc_t>, "only used where no conversion is needed");
  acc_t* m = work;
  acc_t* l = work + kBlockQ;
  acc_t* alpha = work + 2 * kBlockQ;
  acc_t* uniform = work + 3 * kBlockQ;
  std::fill(m, m + kBlockQ, -std::numeric_limits<acc_t>::infinity());
  std::fill(l, l + kBlockQ, acc_t(0));
  for (int rg = 0; rg < ranges.count; ++rg) {
    for (int64_t j0 = ranges.lo[rg]; j0 < ranges.hi[rg]; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, ranges.hi[rg] - j0);
      gemm_bcast<acc_t, false>(nk, kBlockQ, p.head_dim_qk, k_head + j0 * p.k_stride_s,
                               p.k_stride_s, 1, qT, kBlockQ, sT, kBlockQ);
      const TileBias<acc_t> tb = tile_bias(p, b, h, i0, nq, j0, nk, may_need_bias, sT, diag);
      std::fill(uniform, uniform + kBlockQ, tb.uniform);
      online_softmax_tile(sT, nk, kBlockQ, tb.diag, uniform, m, l, alpha);
    }
  }
  for (int64_t ii = 0; ii < nq; ++ii) {
    if (std::isnan(m[ii]) || !(l[ii] > acc_t(0))) {
      lse_safe[ii] = std::isnan(m[ii]) ? m[ii] : std::numeric_limits<acc_t>::infinity();
    } else {
      lse_safe[ii] = m[ii] + std::log(l[ii]);
    }
  }
}

// The backward's elementwise pass over one (nk x kBlockQ) tile, in one sweep over it:
//   P  = exp(s + bias - lse)   into sT      (shift[x] = lse - uniform bias, per lane vector)
//   dS = P * (dP - D)          into dsT     (dsT holds dP = V·dOᵀ on entry, delta[x] = D)
// and, when asked, the sums of dS that the table / span gradients need: along the tile's
// diagonals into td (kDiagSums, td zeroed, kBlockQ + nk - 1 entries), or over the whole tile
// into total (kTileSum). Both sums add whole lane vectors, so they need a full query block
// (padding lanes would be exact zeros, but only while the inputs are finite).
// Rows go in the order r, r + W, r + 2W, ... (r < W): row jj adds into td at offset
// nk - 1 - jj, so consecutive rows then touch exactly the vectors the previous one stored,
// where in plain order each load would straddle two earlier stores by one lane and wait for
// them to retire (store-to-load forwarding fails: that loop alone took ~17% of the backward's
// non-GEMM time). The exponentials of a row's vectors are computed together (softmax_exp_n).
template <typename acc_t>
struct ProbabilityPassArgs {
  acc_t* sT;
  acc_t* dsT;
  int64_t nk;
  const acc_t* diag;  // per-diagonal bias (kHasDiag)
  const Vectorized<acc_t>* shift;
  const Vectorized<acc_t>* delta;
  acc_t* td;
  Vectorized<acc_t>* total;
};

template <typename acc_t, bool kHasDiag, bool kDiagSums, bool kTileSum>
inline void probabilities_and_ds(const ProbabilityPassArgs<acc_t>& a) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr int kVecs = static_cast<int>(kBlockQ / W);
  for (int64_t r = 0; r < W && r < a.nk; ++r) {
    for (int64_t jj = r; jj < a.nk; jj += W) {
      acc_t* p_row = a.sT + jj * kBlockQ;
      acc_t* ds_row = a.dsT + jj * kBlockQ;
      const int64_t offset = a.nk - 1 - jj;
      Vec e[kVecs];
#pragma GCC unroll 8
      for (int x = 0; x < kVecs; ++x) {
        Vec v = Vec::loadu(p_row + x * W);
        if constexpr (kHasDiag) v = v + Vec::loadu(a.diag + offset + x * W);
        e[x] = v - a.shift[x];
      }
      softmax_exp_n<kVecs>(e);
#pragma GCC unroll 8
      for (int x = 0; x < kVecs; ++x) {
        e[x].store(p_row + x * W);
        const Vec ds = e[x] * (Vec::loadu(ds_row + x * W) - a.delta[x]);
        ds.store(ds_row + x * W);
        if constexpr (kDiagSums) {
          acc_t* t = a.td + offset + x * W;
          (Vec::loadu(t) + ds).store(t);
        }
        if constexpr (kTileSum) a.total[x] = a.total[x] + ds;
      }
    }
  }
}

template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> qT, doT, sT, dsT, q_buf, do_buf, k_buf, v_buf, row_delta, lse_safe, dq,
      diag, span_diag, tile_diag, lse_work;
  std::vector<double> diag_acc;  // per-distance sums of dS for one head (table gradient)
  BackwardScratch(int64_t dqk, int64_t dv, bool need_convert, int64_t num_distances)
      : qT(dqk * kBlockQ), doT(dv * kBlockQ), sT(kBlockK * kBlockQ), dsT(kBlockK * kBlockQ),
        q_buf(need_convert ? kBlockQ * dqk : 0), do_buf(need_convert ? kBlockQ * dv : 0),
        k_buf(need_convert ? kBlockK * dqk : 0), v_buf(need_convert ? kBlockK * dv : 0),
        row_delta(kBlockQ), lse_safe(kBlockQ), dq(kBlockQ * dqk), diag(kBlockQ + kBlockK),
        span_diag(kBlockQ + kBlockK), tile_diag(kBlockQ + kBlockK),
        lse_work(std::is_same_v<acc_t, double> ? 4 * kBlockQ : 0), diag_acc(num_distances) {}
};

// The number of query-block chunks per (batch, kv head) in the backward: enough tasks to keep
// a multi-core machine busy. A function of the shapes only, so results do not depend on the
// thread count.
inline int64_t backward_chunks(int64_t batch_kv_heads, int64_t num_qblocks) {
  constexpr int64_t kTargetTasks = 16;
  if (batch_kv_heads <= 0 || num_qblocks <= 1) return 1;
  const int64_t c = (kTargetTasks + batch_kv_heads - 1) / batch_kv_heads;
  return std::max<int64_t>(1, std::min(c, num_qblocks));
}

struct BackwardOutputs {
  at::Tensor grad_q, grad_k, grad_v, grad_table, grad_span;
};

template <typename scalar_t>
BackwardOutputs attention_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_lse /* undefined: none */,
    const AttentionParamsT<acc_type<scalar_t>>& p, bool need_table_grad, bool need_span_grad,
    int64_t num_table_rows) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr bool need_convert = !std::is_same_v<scalar_t, acc_t>;
  constexpr int kLaneVecs = static_cast<int>(kBlockQ / W);
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, Sq = p.seqlen_q, Sk = p.seqlen_k,
                Dqk = p.head_dim_qk, Dv = p.head_dim_v;
  const int64_t group = p.group_size();
  const int64_t num_qblocks = (Sq + kBlockQ - 1) / kBlockQ;
  const int64_t chunks = backward_chunks(B * Hkv, num_qblocks);
  // One task per (b, kv head, chunk), also when Sq == 0 (the task then only zeroes dK / dV).
  const int64_t num_tasks = B * Hkv * chunks;
  const bool may_need_bias = any_local_bias(p);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const bool need_diag_sums = need_table_grad || need_span_grad;
  // Distances d = pos_q - j range over [1 - Sq, Sk - 1].
  const int64_t min_distance = 1 - Sq;
  const int64_t num_distances = need_table_grad ? std::max<int64_t>(Sq + Sk - 1, 0) : 0;

  BackwardOutputs res;
  const auto acc_options = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  res.grad_q = at::empty_like(q, at::MemoryFormat::Contiguous);
  // dK / dV accumulate in acc_t: straight into the outputs when they are acc_t and each
  // (b, kv head) has one chunk, else into per-chunk partials reduced below.
  const bool direct_kv = !need_convert && chunks == 1;
  at::Tensor dk_acc, dv_acc;
  if (direct_kv) {
    res.grad_k = at::empty({B, Hkv, Sk, Dqk}, k.options());
    res.grad_v = at::empty({B, Hkv, Sk, Dv}, v.options());
    dk_acc = res.grad_k;
    dv_acc = res.grad_v;
  } else {
    dk_acc = at::empty({chunks, B, Hkv, Sk, Dqk}, acc_options);
    dv_acc = at::empty({chunks, B, Hkv, Sk, Dv}, acc_options);
  }
  at::Tensor table_partial, span_partial;  // (B, chunks, Hq, rows) / (B, chunks, Hq), double
  if (need_table_grad) table_partial = at::zeros({B, chunks, Hq, num_table_rows}, q.options().dtype(at::kDouble));
  if (need_span_grad) span_partial = at::zeros({B, chunks, Hq}, q.options().dtype(at::kDouble));

  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.data_ptr<scalar_t>();
  const scalar_t* o_ptr = out.data_ptr<scalar_t>();
  const scalar_t* do_ptr = grad_out.data_ptr<scalar_t>();
  const float* lse_ptr = lse.data_ptr<float>();
  const float* glse_ptr = grad_lse.defined() ? grad_lse.data_ptr<float>() : nullptr;
  scalar_t* dq_ptr = res.grad_q.data_ptr<scalar_t>();
  acc_t* dk_base = dk_acc.data_ptr<acc_t>();
  acc_t* dv_base = dv_acc.data_ptr<acc_t>();
  double* table_part_ptr = need_table_grad ? table_partial.data_ptr<double>() : nullptr;
  double* span_part_ptr = need_span_grad ? span_partial.data_ptr<double>() : nullptr;
  const int64_t do_sb = grad_out.stride(0), do_sh = grad_out.stride(1), do_ss = grad_out.stride(2);
  const int64_t o_sb = out.stride(0), o_sh = out.stride(1), o_ss = out.stride(2);
  const acc_t pos_inf = std::numeric_limits<acc_t>::infinity();

  // (an upper bound: every query block against every key, five products)
  const int64_t work = B * Hq * num_qblocks * kBlockQ * Sk * (2 * Dqk + 3 * Dv);
  run_tasks(
      num_tasks, work, [&] { return BackwardScratch<acc_t>(Dqk, Dv, need_convert, num_distances); },
      [&](int64_t task, BackwardScratch<acc_t>& s) {
        const int64_t chunk = task % chunks, bkv = task / chunks;
        const int64_t b = bkv / Hkv, hkv = bkv % Hkv;
        // This task's dK / dV rows (Sk x D): the output itself or its chunk's partial.
        const int64_t kv_offset = direct_kv ? bkv : (chunk * B * Hkv + bkv);
        acc_t* dk = dk_base + kv_offset * Sk * Dqk;
        acc_t* dv = dv_base + kv_offset * Sk * Dv;
        std::fill(dk, dk + Sk * Dqk, acc_t(0));
        std::fill(dv, dv + Sk * Dv, acc_t(0));
        const scalar_t* k_head = k_ptr + b * p.k_stride_b + hkv * p.k_stride_h;
        const scalar_t* v_head = v_ptr + b * p.v_stride_b + hkv * p.v_stride_h;

        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hkv * group + g;
          if (need_table_grad) std::fill(s.diag_acc.begin(), s.diag_acc.end(), 0.0);
          double span_acc = 0.0;
          for (int64_t qb = chunk; qb < num_qblocks; qb += chunks) {
            const int64_t i0 = qb * kBlockQ, i1 = std::min(i0 + kBlockQ, Sq), nq = i1 - i0;
            const scalar_t* q_rows = q_ptr + b * p.q_stride_b + h * p.q_stride_h + i0 * p.q_stride_s;
            const scalar_t* do_rows = do_ptr + b * do_sb + h * do_sh + i0 * do_ss;
            const scalar_t* o_rows = o_ptr + b * o_sb + h * o_sh + i0 * o_ss;
            pack_transposed(q_rows, p.q_stride_s, nq, Dqk, scale, s.qT.data());
            pack_transposed(do_rows, do_ss, nq, Dv, acc_t(1), s.doT.data());
            int64_t ldq = 0, ldo = 0;
            const acc_t* q_blk = rows_as_acc(q_rows, p.q_stride_s, nq, Dqk, s.q_buf.data(), &ldq);
            const acc_t* do_blk = rows_as_acc(do_rows, do_ss, nq, Dv, s.do_buf.data(), &ldo);
            // D_i = rowsum(dO * O) - grad_lse_i; lse = -inf (empty row) becomes +inf so that
            // P = exp(s - lse) is 0 there instead of NaN. Padding lanes get P = 0 too.
            for (int64_t ii = 0; ii < kBlockQ; ++ii) {
              if (ii >= nq) {
                s.row_delta[ii] = 0;
                s.lse_safe[ii] = pos_inf;
                continue;
              }
              acc_t dot = 0;
              for (int64_t d = 0; d < Dv; ++d) {
                dot += static_cast<acc_t>(do_rows[ii * do_ss + d]) * static_cast<acc_t>(o_rows[ii * o_ss + d]);
              }
              const int64_t row = (b * Hq + h) * Sq + i0 + ii;
              if (glse_ptr != nullptr) dot -= static_cast<acc_t>(glse_ptr[row]);
              s.row_delta[ii] = dot;
              const acc_t l = static_cast<acc_t>(lse_ptr[row]);
              s.lse_safe[ii] = l == -pos_inf ? pos_inf : l;
            }
            std::fill(s.dq.begin(), s.dq.begin() + nq * Dqk, acc_t(0));
            Vec delta[kLaneVecs];
            for (int x = 0; x < kLaneVecs; ++x) delta[x] = Vec::loadu(s.row_delta.data() + x * W);

            const KeyRanges ranges = visible_key_ranges(p, b, h, i0, i1);
            if constexpr (std::is_same_v<acc_t, double>) {
              // lse comes as float32; in float64 recompute it exactly (one extra K·Qᵀ pass) so
              // that float64 gradients are float64-accurate (gradcheck).
              recompute_lse(p, b, h, i0, nq, ranges, k_head, may_need_bias, s.qT.data(),
                            s.sT.data(), s.diag.data(), s.lse_work.data(), s.lse_safe.data());
            }
            for (int rg = 0; rg < ranges.count; ++rg) {
              for (int64_t j0 = ranges.lo[rg]; j0 < ranges.hi[rg]; j0 += kBlockK) {
                const int64_t nk = std::min(kBlockK, ranges.hi[rg] - j0);
                int64_t ldk = 0, ldv = 0;
                const acc_t* k_tile = rows_as_acc(k_head + j0 * p.k_stride_s, p.k_stride_s, nk,
                                                  Dqk, s.k_buf.data(), &ldk);
                const acc_t* v_tile = rows_as_acc(v_head + j0 * p.v_stride_s, p.v_stride_s, nk,
                                                  Dv, s.v_buf.data(), &ldv);
                acc_t* sT = s.sT.data();
                acc_t* dsT = s.dsT.data();
                // S = K·qT (+ bias), dP = V·dOᵀ; then one pass: P = exp(S + bias - lse) into
                // sT, dS = P * (dP - D) into dsT, and the sums of dS the table / span
                // gradients need (fused for full query blocks, see probabilities_and_ds).
                gemm_bcast<acc_t, false>(nk, kBlockQ, Dqk, k_tile, ldk, 1, s.qT.data(), kBlockQ, sT, kBlockQ);
                const TileBias<acc_t> tb = tile_bias(p, b, h, i0, nq, j0, nk, may_need_bias, sT, s.diag.data());
                gemm_bcast<acc_t, false>(nk, kBlockQ, Dv, v_tile, ldv, 1, s.doT.data(), kBlockQ, dsT, kBlockQ);
                const bool full_block = nq == kBlockQ;
                const bool fused_diag_sums = need_diag_sums && full_block && !tb.one_table_row;
                const bool fused_tile_sum = need_table_grad && full_block && tb.one_table_row;
                acc_t* td = s.tile_diag.data();
                if (fused_diag_sums) std::fill(td, td + nk - 1 + kBlockQ, acc_t(0));
                Vec shift[kLaneVecs], total[kLaneVecs];
                for (int x = 0; x < kLaneVecs; ++x) {
                  shift[x] = Vec::loadu(s.lse_safe.data() + x * W) - Vec(tb.uniform);
                  total[x] = Vec(acc_t(0));
                }
                const ProbabilityPassArgs<acc_t> pass{sT, dsT, nk, tb.diag, shift, delta, td, total};
                if (tb.diag != nullptr) {
                  if (fused_diag_sums) {
                    probabilities_and_ds<acc_t, true, true, false>(pass);
                  } else {
                    probabilities_and_ds<acc_t, true, false, false>(pass);
                  }
                } else if (fused_diag_sums) {
                  probabilities_and_ds<acc_t, false, true, false>(pass);
                } else if (fused_tile_sum) {
                  probabilities_and_ds<acc_t, false, false, true>(pass);
                } else {
                  probabilities_and_ds<acc_t, false, false, false>(pass);
                }
                // dV += P · dO, dK += dS · Q (scale applied once at the end), dQ += dSᵀ · K.
                gemm_bcast<acc_t, true>(nk, Dv, nq, sT, kBlockQ, 1, do_blk, ldo, dv + j0 * Dv, Dv);
                gemm_bcast<acc_t, true>(nk, Dqk, nq, dsT, kBlockQ, 1, q_blk, ldq, dk + j0 * Dqk, Dqk);
                gemm_bcast<acc_t, true>(nq, Dqk, nk, dsT, 1, kBlockQ, k_tile, ldk, s.dq.data(), Dqk);

                if (need_diag_sums) {
                  const int64_t ndiag = nq + nk - 1;
                  const int64_t d_first = p.query_pos(i0) - (j0 + nk - 1);
                  if (fused_tile_sum) {
                    // Every pair of the tile reads one table row: its whole sum goes to one of
                    // the tile's distances (all of which map to that row).
                    alignas(64) acc_t lanes[kBlockQ];
                    for (int x = 0; x < kLaneVecs; ++x) total[x].store(lanes + x * W);
                    double sum = 0;
                    for (int64_t ii = 0; ii < kBlockQ; ++ii) sum += static_cast<double>(lanes[ii]);
                    s.diag_acc[d_first - min_distance] += sum;
                  } else {
                    if (!fused_diag_sums) {
                      // Sums of dS along the tile's diagonals: u = ii + (nk - 1 - jj), real
                      // query lanes only (a partial block).
                      std::fill(td, td + ndiag, acc_t(0));
                      for (int64_t jj = 0; jj < nk; ++jj) {
                        const acc_t* ds_row = dsT + jj * kBlockQ;
                        acc_t* t = td + (nk - 1 - jj);
                        for (int64_t ii = 0; ii < nq; ++ii) t[ii] += ds_row[ii];
                      }
                    }
                    if (need_table_grad) {
                      double* acc = s.diag_acc.data() + (d_first - min_distance);
                      for (int64_t u = 0; u < ndiag; ++u) acc[u] += static_cast<double>(td[u]);
                    }
                    if (need_span_grad) {
                      if (!tile_has_global_pair(p, i0, j0)) {
                        local_tile_diagonal_span_grad(p, b, h, i0, nq, j0, nk, s.span_diag.data());
                        for (int64_t u = 0; u < ndiag; ++u) {
                          span_acc += static_cast<double>(td[u]) * static_cast<double>(s.span_diag[u]);
                        }
                      } else {
                        for (int64_t jj = 0; jj < nk; ++jj) {
                          for (int64_t ii = 0; ii < nq; ++ii) {
                            const acc_t gs = span_logit_grad(p, b, h, i0 + ii, j0 + jj);
                            if (gs != acc_t(0)) {
                              span_acc += static_cast<double>(dsT[jj * kBlockQ + ii]) * static_cast<double>(gs);
                            }
                          }
                        }
                      }
                    }
                  }
                }
              }
            }
            // dQ = scale * sum_j dS K  (this task owns these rows of grad_q)
            scalar_t* dq_rows = dq_ptr + ((b * Hq + h) * Sq + i0) * Dqk;
            for (int64_t x = 0; x < nq * Dqk; ++x) dq_rows[x] = static_cast<scalar_t>(scale * s.dq[x]);
          }
          const int64_t part = (b * chunks + chunk) * Hq + h;
          if (need_table_grad) {
            double* rows = table_part_ptr + part * num_table_rows;
            for (int64_t x = 0; x < num_distances; ++x) {
              rows[rel_bias_row(p, min_distance + x)] += s.diag_acc[x];
            }
          }
          if (need_span_grad) span_part_ptr[part] = span_acc;
        }
        if (direct_kv) {
          for (int64_t x = 0; x < Sk * Dqk; ++x) dk[x] *= scale;
        }
      });

  // Fixed-order reductions of the partials.
  if (!direct_kv) {
    res.grad_k = at::empty({B, Hkv, Sk, Dqk}, k.options());
    res.grad_v = at::empty({B, Hkv, Sk, Dv}, v.options());
    scalar_t* gk = res.grad_k.data_ptr<scalar_t>();
    scalar_t* gv = res.grad_v.data_ptr<scalar_t>();
    const int64_t plane_k = B * Hkv * Sk * Dqk, plane_v = B * Hkv * Sk * Dv;
    // grad = sum over chunks in chunk order (times scale for dK), row by row.
    at::parallel_for(0, B * Hkv * Sk, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row_k(Dqk), row_v(Dv);
      for (int64_t r = begin; r < end; ++r) {
        std::fill(row_k.begin(), row_k.end(), acc_t(0));
        std::fill(row_v.begin(), row_v.end(), acc_t(0));
        for (int64_t c = 0; c < chunks; ++c) {
          const acc_t* pk = dk_base + c * plane_k + r * Dqk;
          const acc_t* pv = dv_base + c * plane_v + r * Dv;
          for (int64_t d = 0; d < Dqk; ++d) row_k[d] += pk[d];
          for (int64_t d = 0; d < Dv; ++d) row_v[d] += pv[d];
        }
        for (int64_t d = 0; d < Dqk; ++d) gk[r * Dqk + d] = static_cast<scalar_t>(scale * row_k[d]);
        for (int64_t d = 0; d < Dv; ++d) gv[r * Dv + d] = static_cast<scalar_t>(row_v[d]);
      }
    });
  }
  // Table: grad[row, h] = sum over b, then chunks, in that order. Span: (B, Hq), summed over
  // chunks (the caller sums over b for a per-head span, again in order).
  if (need_table_grad) {
    res.grad_table = at::zeros({num_table_rows, Hq}, q.options().dtype(at::kDouble));
    double* gt = res.grad_table.data_ptr<double>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t h = 0; h < Hq; ++h) {
          const double* part = table_part_ptr + ((b * chunks + c) * Hq + h) * num_table_rows;
          for (int64_t row = 0; row < num_table_rows; ++row) gt[row * Hq + h] += part[row];
        }
      }
    }
  }
  if (need_span_grad) {
    res.grad_span = at::zeros({B, Hq}, q.options().dtype(at::kDouble));
    double* gs = res.grad_span.data_ptr<double>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t h = 0; h < Hq; ++h) gs[b * Hq + h] += span_part_ptr[(b * chunks + c) * Hq + h];
      }
    }
  }
  return res;
}

// ------------------------------------------------------------------------------------------
// Op entry points: checks (common/attention_args.cpp), parameters, dispatch.
// ------------------------------------------------------------------------------------------
AttentionOutputs attention_cpu(const AttentionArgs& a) {
  a.check();
  a.check_values();
  const at::Tensor& q = a.q;
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), Dv = a.v.size(3);
  at::Tensor out = at::empty({B, Hq, Sq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  FASTATTN_DISPATCH_CPU_FLOATING(q.scalar_type(), "fastattn::attention (CPU)", [&] {
    using acc_t = acc_type<scalar_t>;
    ParamTensors keep;
    const auto p = make_attention_params<acc_t>(a, keep, /*read_scale_tensor=*/true);
    attention_forward_impl<scalar_t>(q, a.k, a.v, p, out, lse);
  });
  return {out, lse};
}

// A per-head span's gradient: the (B, Hq) one summed over the batch, in batch order.
at::Tensor sum_over_batch(const at::Tensor& grad_span) {
  const int64_t B = grad_span.size(0), Hq = grad_span.size(1);
  at::Tensor per_head = at::zeros({Hq}, grad_span.options());
  const double* src = grad_span.data_ptr<double>();
  double* dst = per_head.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) dst[h] += src[b * Hq + h];
  }
  return per_head;
}

AttentionGrads attention_backward_cpu(const AttentionBackwardArgs& args) {
  args.check();
  const AttentionArgs& a = args.attn;
  a.check_values();
  const at::Tensor& q = a.q;
  // Small or rarely strided inputs are normalized (q, k and v are read through their strides).
  auto last_dim_contiguous = [](const at::Tensor& t) {
    return (t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
  };
  const at::Tensor grad_out = last_dim_contiguous(args.grad_out);
  const at::Tensor out = last_dim_contiguous(args.out);
  const at::Tensor lse = args.lse.to(at::kFloat).contiguous();
  const at::Tensor grad_lse =
      present(args.grad_lse) ? args.grad_lse->to(at::kFloat).contiguous() : at::Tensor();
  const bool want_table = args.need_rel_bias_grad && present(a.rel_bias);
  const bool want_span = args.need_span_grad && present(a.span);

  BackwardOutputs res;
  FASTATTN_DISPATCH_CPU_FLOATING(q.scalar_type(), "fastattn::attention_backward (CPU)", [&] {
    using acc_t = acc_type<scalar_t>;
    ParamTensors keep;
    const auto p = make_attention_params<acc_t>(a, keep, /*read_scale_tensor=*/true);
    res = attention_backward_impl<scalar_t>(grad_out, q, a.k, a.v, out, lse, grad_lse, p,
                                            want_table, want_span,
                                            want_table ? a.rel_bias->size(0) : 0);
  });
  at::Tensor grad_table = at::empty({0}, q.options());
  at::Tensor grad_span = at::empty({0}, q.options());
  if (want_table) grad_table = res.grad_table.to(a.rel_bias->scalar_type()).contiguous();
  if (want_span) {
    const at::Tensor gs = a.span->dim() == 1 ? sum_over_batch(res.grad_span) : res.grad_span;
    grad_span = gs.to(a.span->scalar_type()).contiguous();
  }
  return {res.grad_q, res.grad_k, res.grad_v, grad_table, grad_span};
}

}  // namespace
}  // namespace cpu
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  fastattn::register_attention_kernels<&fastattn::cpu::attention_cpu,
                                       &fastattn::cpu::attention_backward_cpu>(m);
}
