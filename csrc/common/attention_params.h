// The attention op's parameters and its mask/bias rules, shared by the CPU and CUDA kernels.
//
// Everything that decides *which* (query, key) pairs are visible and *what* is added to their
// logit lives here, as inline host/device functions, so the two devices cannot drift apart.
// The Python twin of these rules is fastattn/reference.py::attention.
//
// Positions: query i of batch b stands at q_offset[b] + i, key j at k_offset[b] + j (the
// defaults, Sk - Sq and 0, align them bottom-right), and the distance is their difference.
// The kernels count positions from key 0 of the row: query_pos(b, i) = i + q_offset[b] -
// k_offset[b], so that d = query_pos(b, i) - j; only the global-token rule needs the absolute
// key position (global_limit). Offsets are clamped to +-2^60, so no position arithmetic of the
// kernels overflows whatever a direct op call passes.
//
// A pair (i, j) of batch b, query head h is visible when
//   j < key_lengths[b]                                   (padding / KV cache length)
//   and (!causal || d >= 0)
//   and ( is_global(i, j)                                (j < G or pos_q < G: Longformer)
//         or ( -right <= d <= left                       (window, -1 = unbounded)
//              and m(d) > 0 ) )                          (adaptive span, when span is given)
// and its logit is
//   cap(scale * q.k) + rel_bias[clamp(d) + max_dist - 1, h] - slope[h] * |d| + (global ? 0 : log m(d))
// with m(d) = clamp((R + span[b, h] - |d|) / R, 0, 1), R = span_ramp, and cap(s) = s, or
// softcap * tanh(s / softcap) when softcap > 0 (softcap_score below).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif

namespace fastattn {

// Math helpers overloaded on the bias scalar (float everywhere; double for the CPU kernel's
// float64 path, so that float64 inputs get float64 bias/span/scale math end to end).
FA_HD float fa_log(float x) { return logf(x); }
FA_HD double fa_log(double x) { return log(x); }
FA_HD float fa_ceil(float x) { return ceilf(x); }
FA_HD double fa_ceil(double x) { return ceil(x); }
FA_HD float fa_tanh(float x) { return tanhf(x); }
FA_HD double fa_tanh(double x) { return tanh(x); }

// `Real` is the scalar type of the scale and of the bias/slope/span tables: float (the default,
// `AttentionParams`) on every path except the CPU float64 one, which uses double so that
// gradcheck in float64 sees float64 precision in the table, span and scale too.
template <typename Real>
struct AttentionParamsT {
  // Shapes.
  int64_t batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_k = 0;
  int64_t head_dim_qk = 0, head_dim_v = 0;
  // Element strides (batch, head, sequence); the last dim is contiguous.
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_s = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;
  int64_t o_stride_b = 0, o_stride_h = 0, o_stride_s = 0;
  Real scale = 1;
  // Logit soft-capping (0 = off): the scaled score s = scale * q.k becomes
  // softcap * tanh(s / softcap) before any bias or mask is applied.
  Real softcap = 0;

  // Masks. window_left/right = -1 means unbounded; causal is applied on top of them.
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  int64_t num_global = 0;
  const int64_t* key_lengths = nullptr;  // (batch,) or null
  const int64_t* q_offset = nullptr;     // (batch,), clamped to +-2^60; or null (Sk - Sq)
  const int64_t* k_offset = nullptr;     // (batch,), clamped to +-2^60; or null (0)

  // Biases, all contiguous Real (fp32: see checks.h: as_fp32_contiguous; fp64 on CPU float64).
  const Real* rel_bias = nullptr;  // (2 * max_dist - 1, heads_q) or null
  int64_t max_dist = 0;
  const Real* alibi_slopes = nullptr;  // (heads_q,) or (batch, heads_q) with alibi_stride_b; or null
  int64_t alibi_stride_b = 0;
  const Real* span = nullptr;          // (batch, heads_q) with span_stride_b = heads_q, or
  int64_t span_stride_b = 0;           // (heads_q,) with span_stride_b = 0; or null
  Real span_ramp = 32;

  // SDPA's attn_mask, read through its strides (0 on broadcast dims): a float mask's value is
  // added to the logit (-inf hides the pair), a bool mask's False hides it.
  const Real* mask = nullptr;          // float attn_mask, or null
  const uint8_t* mask_bool = nullptr;  // bool attn_mask, or null
  int64_t mask_stride_b = 0, mask_stride_h = 0, mask_stride_q = 0, mask_stride_k = 0;

  // Attention dropout (common/dropout.h): a weight is kept when its 16-bit draw is below
  // dropout_threshold and then multiplied by dropout_scale = 1 / (1 - p). The seed and offset
  // are in dropout_seed / dropout_offset, or (CUDA, a seed tensor on the GPU) read by the kernel
  // from dropout_seed_ptr = [seed, offset], so that drawing them never waits for the GPU.
  bool dropout = false;
  uint32_t dropout_threshold = 65536;
  Real dropout_scale = 1;
  uint64_t dropout_seed = 0, dropout_offset = 0;
  const int64_t* dropout_seed_ptr = nullptr;

  FA_HD int64_t group_size() const { return heads_q / heads_kv; }
  // Query i's position counted from key 0 of row b (see the file comment).
  FA_HD int64_t query_pos(int64_t b, int64_t i) const {
    const int64_t qo = q_offset != nullptr ? q_offset[b] : seqlen_k - seqlen_q;
    const int64_t ko = k_offset != nullptr ? k_offset[b] : 0;
    return i + (qo - ko);
  }
  // Key 0's absolute position in row b (k_offset, default 0).
  FA_HD int64_t key_offset(int64_t b) const { return k_offset != nullptr ? k_offset[b] : 0; }
  // Global tokens (num_global = G > 0): key j is global when j < global_limit(b), query i when
  // query_pos(b, i) < global_limit(b): the absolute positions below G. (G is capped at 2^61,
  // past every position.)
  FA_HD int64_t global_limit(int64_t b) const {
    const int64_t g = num_global < (int64_t(1) << 61) ? num_global : (int64_t(1) << 61);
    return g - (k_offset != nullptr ? k_offset[b] : 0);
  }
  FA_HD Real alibi_slope(int64_t b, int64_t h) const { return alibi_slopes[b * alibi_stride_b + h]; }
  FA_HD bool has_mask() const { return mask != nullptr || mask_bool != nullptr; }
  FA_HD int64_t mask_index(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return b * mask_stride_b + h * mask_stride_h + i * mask_stride_q + j * mask_stride_k;
  }
  FA_HD int64_t key_len(int64_t b) const {
    if (key_lengths == nullptr) return seqlen_k;
    const int64_t len = key_lengths[b];
    return len < 0 ? 0 : (len > seqlen_k ? seqlen_k : len);
  }
  FA_HD Real span_of(int64_t b, int64_t h) const { return span[b * span_stride_b + h]; }
  FA_HD bool has_span() const { return span != nullptr; }
  FA_HD bool has_window() const { return window_left >= 0 || window_right >= 0; }
  FA_HD bool has_local_restriction() const { return has_window() || has_span(); }
};

using AttentionParams = AttentionParamsT<float>;

// Logit soft-capping of a scaled score s: softcap * tanh(s / softcap) (softcap > 0). Its
// derivative, for the backward's dS, is 1 - tanh^2 = 1 - (capped / softcap)^2, computed from
// the capped score the backward recomputes anyway.
template <typename Real>
FA_HD Real softcap_score(Real s, Real softcap) {
  return softcap * fa_tanh(s / softcap);
}
template <typename Real>
FA_HD Real softcap_grad(Real capped, Real softcap) {
  const Real t = capped / softcap;
  return Real(1) - t * t;
}

// Row (query) index of the rel_bias table for a distance d.
template <typename Real>
FA_HD int64_t rel_bias_row(const AttentionParamsT<Real>& p, int64_t d) {
  const int64_t lim = p.max_dist - 1;
  const int64_t c = d < -lim ? -lim : (d > lim ? lim : d);
  return c + lim;
}

// The adaptive-span soft mask m(d) in [0, 1] (1 when no span is given).
template <typename Real>
FA_HD Real span_mask(const AttentionParamsT<Real>& p, int64_t b, int64_t h, int64_t d) {
  if (!p.has_span()) return Real(1);
  const Real ad = static_cast<Real>(d < 0 ? -d : d);
  const Real m = (p.span_ramp + p.span_of(b, h) - ad) / p.span_ramp;
  return m < Real(0) ? Real(0) : (m > Real(1) ? Real(1) : m);
}

// num_global == 0 means no global token at all: with Sq > Sk some queries sit at negative
// positions, which must not count as "< G" then.
template <typename Real>
FA_HD bool is_global_pair(const AttentionParamsT<Real>& p, int64_t b, int64_t pos_q, int64_t j) {
  if (p.num_global <= 0) return false;
  const int64_t limit = p.global_limit(b);
  return j < limit || pos_q < limit;
}

// Largest |d| the span lets through for head (b, h): m(d) > 0  <=>  |d| < R + span.
// Returns -1 when nothing passes, a huge value when there is no span.
template <typename Real>
FA_HD int64_t span_reach(const AttentionParamsT<Real>& p, int64_t b, int64_t h) {
  if (!p.has_span()) return INT64_C(1) << 62;
  const Real lim = p.span_ramp + p.span_of(b, h);
  if (!(lim > Real(0))) return -1;  // also catches NaN
  // Largest integer strictly below lim.
  const Real c = fa_ceil(lim) - Real(1);
  return c > Real(4.0e18) ? (INT64_C(1) << 62) : static_cast<int64_t>(c);
}

// The part of the logit rule that depends only on the distance d = pos_q - j (for head (b, h)
// and whether the pair is global): whether a pair at distance d is visible, and its additive
// logit term. pair_bias adds the per-row and per-column rules (key_lengths, global pairs), so
// kernels can tabulate this per tile diagonal and keep the per-element work to an index.
// `visible == false` leaves `bias` unspecified.
template <typename Real>
FA_HD bool distance_bias(const AttentionParamsT<Real>& p, int64_t b, int64_t h, int64_t d,
                         bool global_pair, Real* bias) {
  if (p.causal && d < 0) return false;
  Real extra = 0;
  if (!global_pair) {
    if (p.window_left >= 0 && d > p.window_left) return false;
    if (p.window_right >= 0 && d < -p.window_right) return false;
    if (p.has_span()) {
      const Real m = span_mask(p, b, h, d);
      if (!(m > Real(0))) return false;
      extra = fa_log(m);
    }
  }
  if (p.rel_bias != nullptr) extra += p.rel_bias[rel_bias_row(p, d) * p.heads_q + h];
  if (p.alibi_slopes != nullptr) extra -= p.alibi_slope(b, h) * static_cast<Real>(d < 0 ? -d : d);
  *bias = extra;
  return true;
}

// Whether every local pair at a distance in [d_min, d_max] is visible with one common bias
// term, and that term (*bias; *row is its rel_bias row, -1 without a table). True when there is
// no alibi and no span, causality and the window let the whole range through, and either there
// is no rel_bias or every distance of the range clamps to one table row (a tile max_dist - 1 or
// more off the diagonal, as most tiles of a long sequence are). Global pairs in such a range get
// the same term too: the window would let them through anyway, and the table does not care.
// Kernels use it to give a whole tile one bias instead of evaluating the rule per element;
// key_lengths and rows past Sq are the caller's business (a rectangle test).
template <typename Real>
FA_HD bool uniform_distance_bias(const AttentionParamsT<Real>& p, int64_t h, int64_t d_min,
                                 int64_t d_max, Real* bias, int64_t* row) {
  if (p.alibi_slopes != nullptr || p.has_span()) return false;
  if (p.causal && d_min < 0) return false;
  if (p.window_left >= 0 && d_max > p.window_left) return false;
  if (p.window_right >= 0 && d_min < -p.window_right) return false;
  *bias = Real(0);
  *row = -1;
  if (p.rel_bias != nullptr) {
    const int64_t r = rel_bias_row(p, d_min);
    if (rel_bias_row(p, d_max) != r) return false;
    *bias = p.rel_bias[r * p.heads_q + h];
    *row = r;
  }
  return true;
}

// The attn_mask rule of pair (b, h, i, j), applied to its logit x (after the cap, with the
// other biases or before them: addition commutes): x plus a float mask's value, or -inf where
// the mask hides the pair (selected, not added, so a NaN or inf score there cannot leak).
template <typename Real>
FA_HD Real apply_mask(const AttentionParamsT<Real>& p, int64_t b, int64_t h, int64_t i, int64_t j,
                      Real x) {
  const int64_t at = p.mask_index(b, h, i, j);
  if (p.mask_bool != nullptr) return p.mask_bool[at] ? x : -static_cast<Real>(INFINITY);
  const Real m = p.mask[at];
  return m == -static_cast<Real>(INFINITY) ? m : x + m;
}

// Whether (i, j) is visible, and the additive logit term that is not scale * q.k.
// `visible == false` leaves `bias` unspecified.
template <typename Real>
FA_HD bool pair_bias(const AttentionParamsT<Real>& p, int64_t b, int64_t h, int64_t i, int64_t j,
                     Real* bias) {
  if (j >= p.key_len(b)) return false;
  const int64_t pos_q = p.query_pos(b, i);
  return distance_bias(p, b, h, pos_q - j, is_global_pair(p, b, pos_q, j), bias);
}

// d(logit)/d(span[b, h]) for a visible pair: 1 / (R + span - |d|) inside the ramp
// (0 < m < 1), 0 where m is clamped at 1 or the pair is global. At m == 1 exactly (|d| == span,
// common with integer spans) this gives 0, as torch.clamp's autograd does on its bounds (and
// so reference.py).
template <typename Real>
FA_HD Real span_logit_grad(const AttentionParamsT<Real>& p, int64_t b, int64_t h, int64_t i,
                           int64_t j) {
  if (!p.has_span()) return Real(0);
  const int64_t pos_q = p.query_pos(b, i);
  if (is_global_pair(p, b, pos_q, j)) return Real(0);
  const int64_t d = pos_q - j;
  const Real ad = static_cast<Real>(d < 0 ? -d : d);
  const Real num = p.span_ramp + p.span_of(b, h) - ad;
  if (!(num > Real(0)) || num >= p.span_ramp) return Real(0);
  return Real(1) / num;
}

// The half-open key range [*lo, *hi) that can hold visible *local* (non-global) keys for the
// query block [i0, i1) of head (b, h). Keys j < num_global, and every key for queries with
// pos_q < num_global, are visible on top of this range (see query_block_sees_all_keys).
// Tiles outside the range are skipped, which makes windowed/span attention cost O(S * w).
template <typename Real>
FA_HD void local_key_range(const AttentionParamsT<Real>& p, int64_t b, int64_t h, int64_t i0, int64_t i1,
                           int64_t* lo, int64_t* hi) {
  int64_t start = 0, end = p.key_len(b);
  const int64_t pq0 = p.query_pos(b, i0), pq1 = p.query_pos(b, i1 - 1);
  int64_t left = p.window_left, right = p.window_right;
  if (p.causal) right = 0;  // causal wins over any right window
  const int64_t reach = span_reach(p, b, h);
  if (p.has_span()) {
    if (reach < 0) { *lo = 0; *hi = 0; return; }
    left = left < 0 ? reach : (left < reach ? left : reach);
    right = right < 0 ? reach : (right < reach ? right : reach);
  }
  if (left >= 0 && pq0 - left > start) start = pq0 - left;    // j >= pos_q - left
  if (right >= 0 && pq1 + right + 1 < end) end = pq1 + right + 1;  // j <= pos_q + right
  if (end < start) end = start;
  *lo = start;
  *hi = end;
}

// Whether some query of the block [i0, i1) is a global query (sees every key).
template <typename Real>
FA_HD bool query_block_has_global_query(const AttentionParamsT<Real>& p, int64_t b, int64_t i0) {
  return p.num_global > 0 && p.query_pos(b, i0) < p.global_limit(b);
}

}  // namespace fastattn
