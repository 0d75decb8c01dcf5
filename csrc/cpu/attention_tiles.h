// Tile bookkeeping of the CPU attention kernels: the tile sizes, which key tiles a query block
// visits, the additive bias (or -inf mask) of one (query block x key tile) tile, and the
// transposed lane layout of a query block. The mask/bias *rules* are those of
// common/attention_params.h (pair_bias and friends); this file only decides how often they
// are evaluated.
//
// The CUDA kernel mirrors this structure:
//   1. For a query block [i0, i1) of head (b, h), visit at most two key ranges (below):
//      the global keys [0, G), then the local range from local_key_range (clipped past G and
//      by causality); blocks holding a global query visit every key. Tiles outside them are
//      never touched, so windowed / span attention costs O(S * w).
//   2. A tile holding no global pair ("local tile") has a bias that depends only on the
//      distance d = pos_q - j: we evaluate pair_bias once per diagonal (nq + nk - 1 calls) and
//      add a shifted slice of that vector to each row. A tile whose diagonals are all visible
//      with zero bias (no bias options, inside the window) adds nothing at all.
//   3. A tile holding a global pair ("global tile": j0 < G or pos_q(i0) < G) evaluates
//      pair_bias per element; there are O(G) such rows / columns.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/attention_params.h"

namespace fastattn {
namespace cpu {

// Tile sizes. kBlockQ: query lanes per task (a multiple of the vector width; 32 = one 4-vector
// column block of the micro-kernel); kBlockK: keys per tile. Measured (CPU time, 1 thread,
// S=2048, D=64, fp32, fwd / fwd+bwd ms): 64x64 78/267, 64x128 84/274, 128x64 81/259,
// 128x128 78/256, 32x256 80/278, 32x128 75/255. Small query blocks also keep windowed
// tasks tight (each block visits its window plus kBlockQ keys).
constexpr int64_t kBlockQ = 32;
constexpr int64_t kBlockK = 128;

// Up to two half-open key ranges, in increasing key order and disjoint.
struct KeyRanges {
  int64_t lo[2] = {0, 0};
  int64_t hi[2] = {0, 0};
  int count = 0;
  void add(int64_t l, int64_t h) {
    if (h > l) {
      lo[count] = l;
      hi[count] = h;
      ++count;
    }
  }
};

// The keys the query block [i0, i1) of head (b, h) must visit (i1 > i0).
template <typename Real>
inline KeyRanges visible_key_ranges(const AttentionParamsT<Real>& p, int64_t b, int64_t h,
                                    int64_t i0, int64_t i1) {
  KeyRanges ranges;
  // No key at or past key_len is ever visible, and under causality no key past the position
  // of the block's last query (causal applies to global pairs too).
  int64_t end = p.key_len(b);
  if (p.causal) {
    const int64_t causal_end = p.query_pos(b, i1 - 1) + 1;
    if (causal_end < end) end = causal_end;
  }
  if (end <= 0) return ranges;
  if (query_block_has_global_query(p, b, i0)) {
    ranges.add(0, end);  // a global query sees every key
    return ranges;
  }
  int64_t lo = 0, hi = 0;
  local_key_range(p, b, h, i0, i1, &lo, &hi);
  const int64_t limit = p.num_global > 0 ? p.global_limit(b) : 0;
  const int64_t num_global = limit < end ? (limit > 0 ? limit : 0) : end;
  ranges.add(0, num_global);  // global keys are seen by every query
  if (lo < num_global) lo = num_global;
  if (hi > end) hi = end;
  ranges.add(lo, hi);
  return ranges;
}

// Whether the tile (queries [i0, i0 + nq), keys [j0, j0 + nk)) holds a global pair.
template <typename Real>
inline bool tile_has_global_pair(const AttentionParamsT<Real>& p, int64_t b, int64_t i0, int64_t j0) {
  return p.num_global > 0 && (j0 < p.global_limit(b) || p.query_pos(b, i0) < p.global_limit(b));
}

// The rows a score tile's lanes belong to: lane x is query row i[x] of head bh[x] = b * Hq + h
// (dropout draws and attn_mask reads). Sized kBlockQ; lanes past the tile's hold any value.
struct LaneRows {
  int64_t bh[kBlockQ];
  int64_t i[kBlockQ];
};

// attn_mask on a transposed score tile: sT[jj][x] for keys j0 + jj < j0 + nk and the first
// `lanes` lanes (apply_mask: plus a float mask's value, or -inf where it hides the pair).
// Whether attn_mask hides every pair of the tile (keys [j0, j0 + nk), the first `lanes` lanes):
// then the tile adds nothing to any row, forward or backward, and is skipped before its
// products (a block-diagonal mask over a packed row costs its blocks only).
template <typename acc_t>
inline bool tile_masked_out(const AttentionParamsT<acc_t>& p, int64_t b, const LaneRows& rows,
                            int64_t lanes, int64_t j0, int64_t nk) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t sk = p.mask_stride_k;
  for (int64_t x = 0; x < lanes; ++x) {
    const int64_t at = p.mask_index(b, rows.bh[x] - b * p.heads_q, rows.i[x], j0);
    for (int64_t jj = 0; jj < nk; ++jj) {
      if (p.mask_bool != nullptr ? p.mask_bool[at + jj * sk] != 0 : p.mask[at + jj * sk] != neg_inf) return false;
    }
  }
  return true;
}

// Lane by lane: each lane's mask row is read along the keys (contiguous for a row-major mask)
// into its column of the tile.
template <typename acc_t>
inline void mask_tile(const AttentionParamsT<acc_t>& p, int64_t b, const LaneRows& rows, int64_t lanes,
                      int64_t j0, int64_t nk, acc_t* sT) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t sk = p.mask_stride_k;
  for (int64_t x = 0; x < lanes; ++x) {
    const int64_t at = p.mask_index(b, rows.bh[x] - b * p.heads_q, rows.i[x], j0);
    acc_t* col = sT + x;
    if (p.mask_bool != nullptr) {
      const uint8_t* m = p.mask_bool + at;
      for (int64_t jj = 0; jj < nk; ++jj) col[jj * kBlockQ] = m[jj * sk] ? col[jj * kBlockQ] : neg_inf;
    } else {
      const acc_t* m = p.mask + at;
      for (int64_t jj = 0; jj < nk; ++jj) {
        const acc_t v = m[jj * sk];
        col[jj * kBlockQ] = v == neg_inf ? v : col[jj * kBlockQ] + v;  // (selected: see apply_mask)
      }
    }
  }
}

// The in-tile pair (i, j) that lies on diagonal u of a local tile, u in [0, nq + nk - 1).
// Diagonal u holds the pairs with d = pos_q(i0) - (j0 + nk - 1) + u: u < nk starts on the
// tile's first query row, the others on its first key column. Row jj of a transposed score
// tile (key jj, query lanes ii) meets diagonal u = ii + (nk - 1 - jj).
inline void diagonal_pair(int64_t i0, int64_t j0, int64_t nk, int64_t u, int64_t* i, int64_t* j) {
  if (u < nk) {
    *i = i0;
    *j = j0 + nk - 1 - u;
  } else {
    *i = i0 + (u - nk + 1);
    *j = j0;
  }
}

// Per-diagonal bias of a local tile: diag[u] = the pair_bias of diagonal u, or -inf where its
// pairs are masked, for u in [0, nq + nk - 1); entries up to `padded_len` are set to 0 (they
// meet only the padding query lanes). Returns false when every diagonal is visible with a
// zero bias, i.e. when the tile needs no bias at all.
template <typename Real, typename acc_t>
inline bool local_tile_diagonal_bias(const AttentionParamsT<Real>& p, int64_t b, int64_t h,
                                     int64_t i0, int64_t nq, int64_t j0, int64_t nk,
                                     int64_t padded_len, acc_t* diag) {
  const int64_t ndiag = nq + nk - 1;
  bool needed = false;
  for (int64_t u = 0; u < ndiag; ++u) {
    int64_t i, j;
    diagonal_pair(i0, j0, nk, u, &i, &j);
    Real bias = 0;
    if (pair_bias(p, b, h, i, j, &bias)) {
      diag[u] = static_cast<acc_t>(bias);
      needed = needed || bias != Real(0);
    } else {
      diag[u] = -std::numeric_limits<acc_t>::infinity();
      needed = true;
    }
  }
  for (int64_t u = ndiag; u < padded_len; ++u) diag[u] = acc_t(0);
  return needed;
}

// d(logit)/d(span) per diagonal of a local tile (same indexing as local_tile_diagonal_bias).
template <typename Real, typename acc_t>
inline void local_tile_diagonal_span_grad(const AttentionParamsT<Real>& p, int64_t b, int64_t h,
                                          int64_t i0, int64_t nq, int64_t j0, int64_t nk,
                                          acc_t* grad) {
  for (int64_t u = 0; u < nq + nk - 1; ++u) {
    int64_t i, j;
    diagonal_pair(i0, j0, nk, u, &i, &j);
    grad[u] = static_cast<acc_t>(span_logit_grad(p, b, h, i, j));
  }
}

// Whether a local tile can have a bias or a mask at all (else tile_bias skips it). Key
// lengths never mask inside a visited tile: the key ranges stop at key_len.
template <typename acc_t>
inline bool any_local_bias(const AttentionParamsT<acc_t>& p) {
  return p.causal || p.has_window() || p.has_span() || p.rel_bias != nullptr ||
         p.alibi_slopes != nullptr;
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
  if (uniform_distance_bias(p, h, p.query_pos(b, i0) - (j0 + nk - 1), p.query_pos(b, i0 + nq - 1) - j0,
                            &tb.uniform, &row)) {
    tb.one_table_row = true;
    return tb;
  }
  tb.uniform = 0;
  if (!tile_has_global_pair(p, b, i0, j0)) {
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

}  // namespace cpu
}  // namespace fastattn
