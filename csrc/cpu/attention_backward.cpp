// CPU backward of fastattn::attention and its op entry point (registered with the forward in
// attention_forward.cpp; the shared pieces are in attention_kernel.h).
//
// One task per (batch, kv head, chunk of query blocks); the chunk count depends only on the
// shapes, never on the thread count:
//   for each query head g of the group, each query block of the chunk (fixed order):
//     D = rowsum(dO * O) - grad_lse; for each visited key tile:
//       P   = exp(cap(K·qT) + bias - lse)          (recomputed, nk x BQ)
//       dP  = V · dOᵀ,  dS = P * (dP - D)
//       table / span gradients: sums of dS along the tile's diagonals (they depend on d only)
//       dS *= cap'(K·qT) = 1 - tanh²               (only with softcap > 0: the biases are
//                                                    added after the cap, the score before)
//       dV_tile += P · dO,  dK_tile += dS · Q,  dQ_block += dSᵀ · K
//   dQ (and scale) written by the task that owns the query block; dK/dV accumulated by the
//   task that owns (b, kv head) over its chunk; chunk partials, table and span partials are
//   reduced in chunk order. The chunks run in rounds of as many as keep the threads busy, each
//   round's partials added to the running sums before the next round reuses their memory, so
//   the partials take (threads, not chunks) x the size of dK / dV while every sum keeps the
//   same order. No accumulation order depends on threads, so two backward passes give
//   bitwise-equal gradients on any number of threads.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/attention_args.h"
#include "common/attention_params.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/attention_dropout.h"
#include "cpu/attention_kernel.h"
#include "cpu/output_buffers.h"

namespace fastattn {
namespace cpu {
namespace {

// Exact log-sum-exp of the rows of one query block (float64 backward): the forward's online
// softmax without the output. `work` holds >= 4 * kBlockQ entries. Writes lse_safe[ii] for the
// nq rows: lse, or +inf for a row with no visible key (so that exp(s - lse) = 0 there).
template <typename acc_t, typename scalar_t>
void recompute_lse(const AttentionParamsT<acc_t>& p, int64_t b, int64_t h, int64_t i0, int64_t nq,
                   const KeyRanges& ranges, const scalar_t* k_head, bool may_need_bias,
                   const LaneRows& rows, const acc_t* qT, acc_t* sT, acc_t* diag, acc_t* work,
                   acc_t* lse_safe) {
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
      if (p.softcap > 0) softcap_tile<acc_t>(sT, nk, kBlockQ, p.softcap, nullptr);
      if (p.has_mask()) mask_tile(p, b, rows, nq, j0, nk, sT);
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
        if constexpr (kHasDiag) v = masked_add(v, Vec::loadu(a.diag + offset + x * W));
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

// The variant of the pass a tile needs: its bias per diagonal or not, and which sums of dS.
template <typename acc_t>
void probabilities_pass(const ProbabilityPassArgs<acc_t>& pass, bool has_diag, bool diag_sums,
                        bool tile_sum) {
  if (has_diag) {
    if (diag_sums) {
      probabilities_and_ds<acc_t, true, true, false>(pass);
    } else {
      probabilities_and_ds<acc_t, true, false, false>(pass);
    }
  } else if (diag_sums) {
    probabilities_and_ds<acc_t, false, true, false>(pass);
  } else if (tile_sum) {
    probabilities_and_ds<acc_t, false, false, true>(pass);
  } else {
    probabilities_and_ds<acc_t, false, false, false>(pass);
  }
}

// x[0, n) *= y[0, n) (n a multiple of the vector width).
template <typename acc_t>
inline void multiply_tile(acc_t* x, const acc_t* y, int64_t n) {
  using Vec = Vectorized<acc_t>;
  for (int64_t i = 0; i < n; i += Vec::size()) (Vec::loadu(x + i) * Vec::loadu(y + i)).store(x + i);
}

template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> qT, doT, sT, dsT, q_buf, do_buf, k_buf, v_buf, row_delta, lse_safe, dq,
      diag, span_diag, tile_diag, lse_work;
  std::vector<acc_t> cap_grad;   // softcap only: d(capped score)/d(score) per element of sT
  std::vector<acc_t> drop_factors;  // dropout only: each element's factor, 1 / (1 - p) or 0
  LaneRows rows;             // the rows of the query block's lanes (dropout, attn_mask)
  std::vector<double> diag_acc;  // per-distance sums of dS for one head (table gradient)
  BackwardScratch(int64_t dqk, int64_t dv, bool need_convert, int64_t num_distances, bool softcap,
                  bool dropout)
      : qT(dqk * kBlockQ), doT(dv * kBlockQ), sT(kBlockK * kBlockQ), dsT(kBlockK * kBlockQ),
        q_buf(need_convert ? kBlockQ * dqk : 0), do_buf(need_convert ? kBlockQ * dv : 0),
        k_buf(need_convert ? kBlockK * dqk : 0), v_buf(need_convert ? kBlockK * dv : 0),
        row_delta(kBlockQ), lse_safe(kBlockQ), dq(kBlockQ * dqk), diag(kBlockQ + kBlockK),
        span_diag(kBlockQ + kBlockK), tile_diag(kBlockQ + kBlockK),
        lse_work(std::is_same_v<acc_t, double> ? 4 * kBlockQ : 0),
        cap_grad(softcap ? kBlockK * kBlockQ : 0), drop_factors(dropout ? kBlockK * kBlockQ : 0),
        diag_acc(num_distances) {}
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

// What every backward task reads and writes: the call's parameters, tensors, partials and
// the choices that depend on the shapes only.
template <typename scalar_t>
struct BackwardCall {
  using acc_t = acc_type<scalar_t>;
  const AttentionParamsT<acc_t>& p;
  const scalar_t *q, *k, *v, *o, *d_out;
  const float* lse;
  const float* grad_lse;  // or null
  scalar_t* dq;
  acc_t* dk_base;            // dK: the output (direct_kv) or the round's chunk partials
  acc_t* dv_base;            // dV: likewise
  double* table_part;        // (round chunks, B, Hq, table_cols), or null
  double* span_part;         // (B, chunks, Hq), or null
  int64_t do_sb, do_sh, do_ss, o_sb, o_sh, o_ss;  // grad_out / out strides
  int64_t chunks, num_qblocks, num_table_rows;
  int64_t chunk_begin, round_chunks;  // the chunks of the current round
  // The table partials are per table row, or per distance when there are fewer distances
  // than rows (a long table, short sequences): whichever is smaller.
  int64_t table_cols;
  bool table_by_distance;
  // The smallest distance of row b (the table gradient's first entry): 1 - Sq by default.
  int64_t min_distance(int64_t b) const { return p.query_pos(b, 0) - (p.seqlen_k - 1); }
  int64_t num_distances;     // Sq + Sk - 1 when the table gradient is needed, else 0
  bool direct_kv, may_need_bias, need_table_grad, need_span_grad, need_diag_sums;
  acc_t* mask_grad;          // (B, Hq, Sq, Sk): the attn_mask's gradient dS, or null
  acc_t scale;
};

// One (batch, kv head, chunk) task's keys and values and its rows of dK / dV (Sk x D).
template <typename scalar_t>
struct TaskKV {
  using acc_t = acc_type<scalar_t>;
  int64_t b, chunk;
  const scalar_t* k_head;
  const scalar_t* v_head;
  acc_t* dk;
  acc_t* dv;
};

// One query block of one head: its packed rows and per-row terms (the packed lanes qT, doT and
// the rows lse_safe, dq are in the scratch).
template <typename acc_t>
struct QueryBlock {
  static constexpr int kLaneVecs = static_cast<int>(kBlockQ / Vectorized<acc_t>::size());
  int64_t h, i0, nq;
  const acc_t* q_blk;   // Q rows as acc_t (nq x Dqk, row stride ldq)
  const acc_t* do_blk;  // dO rows as acc_t (nq x Dv, row stride ldo)
  int64_t ldq, ldo;
  Vectorized<acc_t> delta[kLaneVecs];  // D per lane
};

// Packs the query block [i0, i0 + nq) of head h (scaled Qᵀ and dOᵀ lanes, Q and dO rows as
// acc_t), computes D and the lse each row's probabilities use, and zeroes its dQ.
template <typename scalar_t, typename acc_t>
void start_query_block(const BackwardCall<scalar_t>& c, const TaskKV<scalar_t>& kv, int64_t h,
                       int64_t qb, BackwardScratch<acc_t>& s, QueryBlock<acc_t>* blk) {
  const AttentionParamsT<acc_t>& p = c.p;
  const int64_t Dqk = p.head_dim_qk, Dv = p.head_dim_v, b = kv.b;
  const int64_t i0 = qb * kBlockQ, nq = std::min(i0 + kBlockQ, p.seqlen_q) - i0;
  const acc_t pos_inf = std::numeric_limits<acc_t>::infinity();
  const scalar_t* q_rows = c.q + b * p.q_stride_b + h * p.q_stride_h + i0 * p.q_stride_s;
  const scalar_t* do_rows = c.d_out + b * c.do_sb + h * c.do_sh + i0 * c.do_ss;
  const scalar_t* o_rows = c.o + b * c.o_sb + h * c.o_sh + i0 * c.o_ss;
  pack_transposed(q_rows, p.q_stride_s, nq, Dqk, c.scale, s.qT.data());
  pack_transposed(do_rows, c.do_ss, nq, Dv, acc_t(1), s.doT.data());
  blk->h = h;
  blk->i0 = i0;
  blk->nq = nq;
  blk->q_blk = rows_as_acc(q_rows, p.q_stride_s, nq, Dqk, s.q_buf.data(), &blk->ldq);
  blk->do_blk = rows_as_acc(do_rows, c.do_ss, nq, Dv, s.do_buf.data(), &blk->ldo);
  // D_i = rowsum(dO * O) - grad_lse_i; lse = -inf (empty row) becomes +inf so that
  // P = exp(s - lse) is 0 there instead of NaN. Padding lanes get P = 0 too.
  for (int64_t ii = 0; ii < kBlockQ; ++ii) {
    if (ii >= nq) {
      s.row_delta[ii] = 0;
      s.lse_safe[ii] = pos_inf;
      continue;
    }
    acc_t dot = 0;
    for (int64_t d0 = 0; d0 < Dv; d0 += kSumBlock) {  // blocked sum (see attention_gemm.h)
      acc_t block = 0;
      for (int64_t d = d0; d < std::min(Dv, d0 + kSumBlock); ++d) {
        block += static_cast<acc_t>(do_rows[ii * c.do_ss + d]) * static_cast<acc_t>(o_rows[ii * c.o_ss + d]);
      }
      dot += block;
    }
    const int64_t row = (b * p.heads_q + h) * p.seqlen_q + i0 + ii;
    if (c.grad_lse != nullptr) dot -= static_cast<acc_t>(c.grad_lse[row]);
    s.row_delta[ii] = dot;
    const acc_t l = static_cast<acc_t>(c.lse[row]);
    s.lse_safe[ii] = l == -pos_inf ? pos_inf : l;
  }
  std::fill(s.dq.begin(), s.dq.begin() + nq * Dqk, acc_t(0));
  if (p.dropout || p.has_mask()) {
    for (int64_t ii = 0; ii < kBlockQ; ++ii) {
      s.rows.bh[ii] = b * p.heads_q + h;
      s.rows.i[ii] = i0 + ii;
    }
  }
  for (int x = 0; x < QueryBlock<acc_t>::kLaneVecs; ++x) {
    blk->delta[x] = Vectorized<acc_t>::loadu(s.row_delta.data() + x * Vectorized<acc_t>::size());
  }
}

// sum over the tile's pairs of dS * d(logit)/d(span) (dsT, td: the tile's diagonal sums of dS).
template <typename acc_t>
double span_grad_sum(const AttentionParamsT<acc_t>& p, int64_t b, const QueryBlock<acc_t>& blk,
                     int64_t j0, int64_t nk, const acc_t* dsT, const acc_t* td, acc_t* span_diag) {
  const int64_t h = blk.h, i0 = blk.i0, nq = blk.nq;
  double sum = 0.0;
  if (!tile_has_global_pair(p, b, i0, j0)) {
    local_tile_diagonal_span_grad(p, b, h, i0, nq, j0, nk, span_diag);
    for (int64_t u = 0; u < nq + nk - 1; ++u) {
      sum += static_cast<double>(td[u]) * static_cast<double>(span_diag[u]);
    }
    return sum;
  }
  for (int64_t jj = 0; jj < nk; ++jj) {
    for (int64_t ii = 0; ii < nq; ++ii) {
      const acc_t gs = span_logit_grad(p, b, h, i0 + ii, j0 + jj);
      if (gs != acc_t(0)) sum += static_cast<double>(dsT[jj * kBlockQ + ii]) * static_cast<double>(gs);
    }
  }
  return sum;
}

// How a tile's sums of dS for the table / span gradients are taken (see probabilities_and_ds).
struct TileSums {
  bool fused_diag = false;  // diagonal sums in the probabilities pass (full block, not one row)
  bool fused_tile = false;  // one sum of the whole tile there (full block, one table row)
};

// Adds the key tile [j0, j0 + nk)'s dS (in dsT) to the head's table gradient (s.diag_acc, per
// distance) and span gradient (*span_acc).
template <typename scalar_t, typename acc_t>
void add_bias_grads(const BackwardCall<scalar_t>& c, int64_t b, const QueryBlock<acc_t>& blk,
                    int64_t j0, int64_t nk, TileSums sums, const Vectorized<acc_t>* total,
                    BackwardScratch<acc_t>& s, double* span_acc) {
  using Vec = Vectorized<acc_t>;
  const int64_t ndiag = blk.nq + nk - 1;
  const int64_t d_first = c.p.query_pos(b, blk.i0) - (j0 + nk - 1);
  acc_t* td = s.tile_diag.data();
  if (sums.fused_tile) {
    // Every pair of the tile reads one table row: its whole sum goes to one of the tile's
    // distances (all of which map to that row).
    alignas(64) acc_t lanes[kBlockQ];
    for (int x = 0; x < QueryBlock<acc_t>::kLaneVecs; ++x) total[x].store(lanes + x * Vec::size());
    double sum = 0;
    for (int64_t ii = 0; ii < kBlockQ; ++ii) sum += static_cast<double>(lanes[ii]);
    s.diag_acc[d_first - c.min_distance(b)] += sum;
    return;
  }
  if (!sums.fused_diag) {
    // Sums of dS along the tile's diagonals: u = ii + (nk - 1 - jj), real query lanes only
    // (a partial block).
    std::fill(td, td + ndiag, acc_t(0));
    for (int64_t jj = 0; jj < nk; ++jj) {
      const acc_t* ds_row = s.dsT.data() + jj * kBlockQ;
      acc_t* t = td + (nk - 1 - jj);
      for (int64_t ii = 0; ii < blk.nq; ++ii) t[ii] += ds_row[ii];
    }
  }
  if (c.need_table_grad) {
    double* acc = s.diag_acc.data() + (d_first - c.min_distance(b));
    for (int64_t u = 0; u < ndiag; ++u) acc[u] += static_cast<double>(td[u]);
  }
  if (c.need_span_grad) {
    *span_acc += span_grad_sum(c.p, b, blk, j0, nk, s.dsT.data(), td, s.span_diag.data());
  }
}

// The attn_mask's gradient is dS itself (the mask is added after the cap): the tile's rows of
// it, each element written by the one task that computes it.
template <typename scalar_t, typename acc_t>
void write_mask_grad(const BackwardCall<scalar_t>& c, int64_t b, const QueryBlock<acc_t>& blk,
                     int64_t j0, int64_t nk, const acc_t* dsT) {
  const int64_t Sq = c.p.seqlen_q, Sk = c.p.seqlen_k;
  acc_t* rows = c.mask_grad + ((b * c.p.heads_q + blk.h) * Sq + blk.i0) * Sk + j0;
  for (int64_t ii = 0; ii < blk.nq; ++ii) {
    for (int64_t jj = 0; jj < nk; ++jj) rows[ii * Sk + jj] = dsT[jj * kBlockQ + ii];
  }
}

// One key tile [j0, j0 + nk) of a query block: S = cap(K·qT) (+ bias), dP = V·dOᵀ; then one
// pass: P = exp(S + bias - lse) into sT, dS = P * (dP - D) into dsT, and the sums of dS the
// table / span gradients need (fused for full query blocks, see probabilities_and_ds); the
// table / span gradients (from this dS: the biases are added after the cap); dS times the
// cap's derivative; then dV += P · dO, dK += dS · Q (scale applied once at the end),
// dQ += dSᵀ · K.
template <typename scalar_t, typename acc_t>
void backward_key_tile(const BackwardCall<scalar_t>& c, const TaskKV<scalar_t>& kv,
                       const QueryBlock<acc_t>& blk, int64_t j0, int64_t nk,
                       BackwardScratch<acc_t>& s, double* span_acc) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const AttentionParamsT<acc_t>& p = c.p;
  const int64_t Dqk = p.head_dim_qk, Dv = p.head_dim_v, nq = blk.nq;
  if (p.has_mask() && tile_masked_out(p, kv.b, s.rows, nq, j0, nk)) return;  // dS = 0 throughout
  int64_t ldk = 0, ldv = 0;
  const acc_t* k_tile = rows_as_acc(kv.k_head + j0 * p.k_stride_s, p.k_stride_s, nk, Dqk,
                                    s.k_buf.data(), &ldk);
  const acc_t* v_tile = rows_as_acc(kv.v_head + j0 * p.v_stride_s, p.v_stride_s, nk, Dv,
                                    s.v_buf.data(), &ldv);
  acc_t* sT = s.sT.data();
  acc_t* dsT = s.dsT.data();
  gemm_bcast<acc_t, false>(nk, kBlockQ, Dqk, k_tile, ldk, 1, s.qT.data(), kBlockQ, sT, kBlockQ);
  const bool capped = p.softcap > 0;
  if (capped) softcap_tile(sT, nk, kBlockQ, p.softcap, s.cap_grad.data());
  if (p.has_mask()) mask_tile(p, kv.b, s.rows, nq, j0, nk, sT);
  const TileBias<acc_t> tb = tile_bias(p, kv.b, blk.h, blk.i0, nq, j0, nk, c.may_need_bias, sT, s.diag.data());
  gemm_bcast<acc_t, false>(nk, kBlockQ, Dv, v_tile, ldv, 1, s.doT.data(), kBlockQ, dsT, kBlockQ);
  const bool full_block = nq == kBlockQ;
  TileSums sums;
  sums.fused_diag = c.need_diag_sums && full_block && !tb.one_table_row;
  sums.fused_tile = c.need_table_grad && full_block && tb.one_table_row;
  acc_t* td = s.tile_diag.data();
  if (sums.fused_diag) std::fill(td, td + nk - 1 + kBlockQ, acc_t(0));
  Vec shift[QueryBlock<acc_t>::kLaneVecs], total[QueryBlock<acc_t>::kLaneVecs];
  for (int x = 0; x < QueryBlock<acc_t>::kLaneVecs; ++x) {
    shift[x] = Vec::loadu(s.lse_safe.data() + x * W) - Vec(tb.uniform);
    total[x] = Vec(acc_t(0));
  }
  // Dropout (factors Z: 1 / (1 - p) or 0): O = (P * Z) V, so dP becomes dP * Z before dS and
  // dV takes P * Z.
  acc_t* z = s.drop_factors.data();
  if (p.dropout) {
    std::fill(z, z + nk * kBlockQ, acc_t(1));
    apply_dropout(p, kv.b, s.rows, kBlockQ, j0, nk, z, kBlockQ);
    multiply_tile(dsT, z, nk * kBlockQ);
  }
  const ProbabilityPassArgs<acc_t> pass{sT, dsT, nk, tb.diag, shift, blk.delta, td, total};
  probabilities_pass(pass, tb.diag != nullptr, sums.fused_diag, sums.fused_tile);
  if (c.need_diag_sums) add_bias_grads(c, kv.b, blk, j0, nk, sums, total, s, span_acc);
  if (c.mask_grad != nullptr) write_mask_grad(c, kv.b, blk, j0, nk, dsT);
  if (capped) multiply_tile(dsT, s.cap_grad.data(), nk * kBlockQ);
  if (p.dropout) multiply_tile(sT, z, nk * kBlockQ);
  gemm_bcast<acc_t, true>(nk, Dv, nq, sT, kBlockQ, 1, blk.do_blk, blk.ldo, kv.dv + j0 * Dv, Dv);
  gemm_bcast<acc_t, true>(nk, Dqk, nq, dsT, kBlockQ, 1, blk.q_blk, blk.ldq, kv.dk + j0 * Dqk, Dqk);
  gemm_bcast<acc_t, true>(nq, Dqk, nk, dsT, 1, kBlockQ, k_tile, ldk, s.dq.data(), Dqk);
}

// One query block of head h against every key tile it sees; writes its rows of dQ.
template <typename scalar_t, typename acc_t>
void backward_query_block(const BackwardCall<scalar_t>& c, const TaskKV<scalar_t>& kv, int64_t h,
                          int64_t qb, BackwardScratch<acc_t>& s, double* span_acc) {
  const AttentionParamsT<acc_t>& p = c.p;
  QueryBlock<acc_t> blk;
  start_query_block(c, kv, h, qb, s, &blk);
  const KeyRanges ranges = visible_key_ranges(p, kv.b, h, blk.i0, blk.i0 + blk.nq);
  if constexpr (std::is_same_v<acc_t, double>) {
    // lse comes as float32; in float64 recompute it exactly (one extra K·Qᵀ pass) so that
    // float64 gradients are float64-accurate (gradcheck).
    recompute_lse(p, kv.b, h, blk.i0, blk.nq, ranges, kv.k_head, c.may_need_bias, s.rows, s.qT.data(),
                  s.sT.data(), s.diag.data(), s.lse_work.data(), s.lse_safe.data());
  }
  for (int rg = 0; rg < ranges.count; ++rg) {
    for (int64_t j0 = ranges.lo[rg]; j0 < ranges.hi[rg]; j0 += kBlockK) {
      backward_key_tile(c, kv, blk, j0, std::min(kBlockK, ranges.hi[rg] - j0), s, span_acc);
    }
  }
  // dQ = scale * sum_j dS K  (this task owns these rows of grad_q)
  scalar_t* dq_rows = c.dq + ((kv.b * p.heads_q + h) * p.seqlen_q + blk.i0) * p.head_dim_qk;
  for (int64_t x = 0; x < blk.nq * p.head_dim_qk; ++x) dq_rows[x] = static_cast<scalar_t>(c.scale * s.dq[x]);
}

// Query head h's blocks of the task's chunk, then the head's table / span partials.
template <typename scalar_t, typename acc_t>
void backward_head(const BackwardCall<scalar_t>& c, const TaskKV<scalar_t>& kv, int64_t h,
                   BackwardScratch<acc_t>& s) {
  if (c.need_table_grad) std::fill(s.diag_acc.begin(), s.diag_acc.end(), 0.0);
  double span_acc = 0.0;
  for (int64_t qb = kv.chunk; qb < c.num_qblocks; qb += c.chunks) {
    backward_query_block(c, kv, h, qb, s, &span_acc);
  }
  if (c.need_table_grad) {
    const int64_t slot = ((kv.chunk - c.chunk_begin) * c.p.batch + kv.b) * c.p.heads_q + h;
    double* cols = c.table_part + slot * c.table_cols;
    for (int64_t x = 0; x < c.num_distances; ++x) {
      cols[c.table_by_distance ? x : rel_bias_row(c.p, c.min_distance(kv.b) + x)] += s.diag_acc[x];
    }
  }
  if (c.need_span_grad) c.span_part[(kv.b * c.chunks + kv.chunk) * c.p.heads_q + h] = span_acc;
}

// Task `task` of the round = (b, kv head, chunk): every query head of the group over the
// chunk's blocks.
template <typename scalar_t, typename acc_t>
void backward_task(const BackwardCall<scalar_t>& c, int64_t task, BackwardScratch<acc_t>& s) {
  const AttentionParamsT<acc_t>& p = c.p;
  const int64_t Sk = p.seqlen_k, Dqk = p.head_dim_qk, Dv = p.head_dim_v;
  const int64_t slot = task % c.round_chunks, bkv = task / c.round_chunks;
  const int64_t chunk = c.chunk_begin + slot;
  const int64_t b = bkv / p.heads_kv, hkv = bkv % p.heads_kv;
  // This task's dK / dV rows (Sk x D): the output itself or its slot of the round's partials.
  const int64_t kv_offset = c.direct_kv ? bkv : (slot * p.batch * p.heads_kv + bkv);
  const TaskKV<scalar_t> kv{b, chunk, c.k + b * p.k_stride_b + hkv * p.k_stride_h,
                            c.v + b * p.v_stride_b + hkv * p.v_stride_h,
                            c.dk_base + kv_offset * Sk * Dqk, c.dv_base + kv_offset * Sk * Dv};
  std::fill(kv.dk, kv.dk + Sk * Dqk, acc_t(0));
  std::fill(kv.dv, kv.dv + Sk * Dv, acc_t(0));
  const int64_t group = p.group_size();
  for (int64_t g = 0; g < group; ++g) backward_head(c, kv, hkv * group + g, s);
  if (c.direct_kv) {
    for (int64_t x = 0; x < Sk * Dqk; ++x) kv.dk[x] *= c.scale;
  }
}

// Adds the round's dK / dV partials, in chunk order, to the running sums (acc_t, (B, Hkv, Sk,
// D); null when there is one round); after the last round writes grad_k = scale * sum and
// grad_v = sum. The sequence of additions of a row is that of one pass over all chunks,
// whatever the round width.
template <typename scalar_t, typename acc_t>
void reduce_kv_round(const BackwardCall<scalar_t>& c, acc_t* run_k, acc_t* run_v, BackwardOutputs& res) {
  const AttentionParamsT<acc_t>& p = c.p;
  const int64_t Sk = p.seqlen_k, Dqk = p.head_dim_qk, Dv = p.head_dim_v;
  const int64_t rows = p.batch * p.heads_kv * Sk;
  const bool first = c.chunk_begin == 0, last = c.chunk_begin + c.round_chunks == c.chunks;
  scalar_t* gk = res.grad_k.data_ptr<scalar_t>();
  scalar_t* gv = res.grad_v.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row_k(Dqk), row_v(Dv);
    for (int64_t r = begin; r < end; ++r) {
      if (first) {
        std::fill(row_k.begin(), row_k.end(), acc_t(0));
        std::fill(row_v.begin(), row_v.end(), acc_t(0));
      } else {
        std::copy(run_k + r * Dqk, run_k + (r + 1) * Dqk, row_k.begin());
        std::copy(run_v + r * Dv, run_v + (r + 1) * Dv, row_v.begin());
      }
      for (int64_t slot = 0; slot < c.round_chunks; ++slot) {
        const acc_t* pk = c.dk_base + (slot * rows + r) * Dqk;
        const acc_t* pv = c.dv_base + (slot * rows + r) * Dv;
        for (int64_t d = 0; d < Dqk; ++d) row_k[d] += pk[d];
        for (int64_t d = 0; d < Dv; ++d) row_v[d] += pv[d];
      }
      if (last) {
        for (int64_t d = 0; d < Dqk; ++d) gk[r * Dqk + d] = static_cast<scalar_t>(c.scale * row_k[d]);
        for (int64_t d = 0; d < Dv; ++d) gv[r * Dv + d] = static_cast<scalar_t>(row_v[d]);
      } else {
        std::copy(row_k.begin(), row_k.end(), run_k + r * Dqk);
        std::copy(row_v.begin(), row_v.end(), run_v + r * Dv);
      }
    }
  });
}

// Table: adds the round's partials to grad ((num_rows, Hq), double) in the order chunk, batch,
// head (chunk-major, so the order does not depend on the round width), then zeroes them for
// the next round.
template <typename scalar_t>
void reduce_table_round(const BackwardCall<scalar_t>& c, at::Tensor& grad) {
  const int64_t B = c.p.batch, Hq = c.p.heads_q;
  double* gt = grad.data_ptr<double>();
  double* part = c.table_part;
  for (int64_t slot = 0; slot < c.round_chunks; ++slot) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < Hq; ++h) {
        const double* cols = part + ((slot * B + b) * Hq + h) * c.table_cols;
        for (int64_t x = 0; x < c.table_cols; ++x) {
          const int64_t row = c.table_by_distance ? rel_bias_row(c.p, c.min_distance(b) + x) : x;
          gt[row * Hq + h] += cols[x];
        }
      }
    }
  }
  std::fill(part, part + c.round_chunks * B * Hq * c.table_cols, 0.0);
}

// Span: (B, Hq), summed over chunks in order (the caller sums over b for a per-head span,
// again in order).
at::Tensor reduce_span_partials(const double* part, int64_t B, int64_t chunks, int64_t Hq,
                                const at::TensorOptions& options) {
  at::Tensor grad = at::zeros({B, Hq}, options.dtype(at::kDouble));
  double* gs = grad.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t h = 0; h < Hq; ++h) gs[b * Hq + h] += part[(b * chunks + c) * Hq + h];
    }
  }
  return grad;
}

// How many chunks of every (batch, kv head) run in one round: enough tasks for the threads.
// Only memory and speed depend on it, never a result.
inline int64_t round_width(int64_t chunks, int64_t batch_kv_heads) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_head = (threads + batch_kv_heads - 1) / std::max<int64_t>(batch_kv_heads, 1);
  return std::clamp<int64_t>(per_head, 1, chunks);
}

// Where the backward's sums live between rounds.
template <typename acc_t>
struct BackwardBuffers {
  at::Tensor dk_part, dv_part;  // the round's dK / dV partials (or the outputs: direct_kv)
  at::Tensor run_k, run_v;      // running dK / dV sums across rounds (several rounds only)
  at::Tensor table_part, span_part, grad_table;
};

// The backward's outputs and buffers for `c` (pointers set in c): dK / dV accumulate in acc_t,
// straight into the outputs when they are acc_t and each (b, kv head) has one chunk, else into
// `width` chunk partials reduced after each round.
template <typename scalar_t>
BackwardBuffers<acc_type<scalar_t>> allocate_backward(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, int64_t width,
                                                      BackwardCall<scalar_t>& c, BackwardOutputs& res) {
  using acc_t = acc_type<scalar_t>;
  const AttentionParamsT<acc_t>& p = c.p;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, Sk = p.seqlen_k;
  const int64_t Dqk = p.head_dim_qk, Dv = p.head_dim_v;
  const auto acc_options = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto f64_options = q.options().dtype(at::kDouble);
  BackwardBuffers<acc_t> buf;
  res.grad_q = at::empty_like(q, at::MemoryFormat::Contiguous);
  res.grad_k = at::empty({B, Hkv, Sk, Dqk}, k.options());
  res.grad_v = at::empty({B, Hkv, Sk, Dv}, v.options());
  if (c.direct_kv) {
    buf.dk_part = res.grad_k;
    buf.dv_part = res.grad_v;
  } else {
    buf.dk_part = at::empty({width, B, Hkv, Sk, Dqk}, acc_options);
    buf.dv_part = at::empty({width, B, Hkv, Sk, Dv}, acc_options);
    if (width < c.chunks) {
      buf.run_k = at::empty({B, Hkv, Sk, Dqk}, acc_options);
      buf.run_v = at::empty({B, Hkv, Sk, Dv}, acc_options);
    }
  }
  c.dq = res.grad_q.data_ptr<scalar_t>();
  c.dk_base = buf.dk_part.template data_ptr<acc_t>();
  c.dv_base = buf.dv_part.template data_ptr<acc_t>();
  if (c.need_table_grad) {
    buf.table_part = at::zeros({width, B, Hq, c.table_cols}, f64_options);
    buf.grad_table = at::zeros({c.num_table_rows, Hq}, f64_options);
    c.table_part = buf.table_part.template data_ptr<double>();
  }
  if (c.need_span_grad) {
    buf.span_part = at::zeros({B, c.chunks, Hq}, f64_options);
    c.span_part = buf.span_part.template data_ptr<double>();
  }
  return buf;
}

// Every gradient of a call whose outputs carry no gradient (no query row; or Dv == 0 and no
// gradient reaching lse): zeros.
BackwardOutputs zero_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              bool need_table_grad, bool need_span_grad, int64_t num_table_rows) {
  BackwardOutputs res;
  res.grad_q = at::zeros_like(q, at::MemoryFormat::Contiguous);
  res.grad_k = at::zeros({k.size(0), k.size(1), k.size(2), k.size(3)}, k.options());
  res.grad_v = at::zeros({v.size(0), v.size(1), v.size(2), v.size(3)}, v.options());
  if (need_table_grad) res.grad_table = at::zeros({num_table_rows, q.size(1)}, q.options().dtype(at::kDouble));
  if (need_span_grad) res.grad_span = at::zeros({q.size(0), q.size(1)}, q.options().dtype(at::kDouble));
  return res;
}

template <typename scalar_t>
BackwardCall<scalar_t> backward_call(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_lse,
    const AttentionParamsT<acc_type<scalar_t>>& p, bool need_table_grad, bool need_span_grad,
    int64_t num_table_rows) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Sq = p.seqlen_q, Sk = p.seqlen_k;
  BackwardCall<scalar_t> c{p};  // (the other members start zeroed / null)
  c.q = q.data_ptr<scalar_t>();
  c.k = k.data_ptr<scalar_t>();
  c.v = v.data_ptr<scalar_t>();
  c.o = out.data_ptr<scalar_t>();
  c.d_out = grad_out.data_ptr<scalar_t>();
  c.lse = lse.data_ptr<float>();
  c.grad_lse = grad_lse.defined() ? grad_lse.data_ptr<float>() : nullptr;
  c.do_sb = grad_out.stride(0);
  c.do_sh = grad_out.stride(1);
  c.do_ss = grad_out.stride(2);
  c.o_sb = out.stride(0);
  c.o_sh = out.stride(1);
  c.o_ss = out.stride(2);
  c.num_qblocks = (Sq + kBlockQ - 1) / kBlockQ;
  c.chunks = backward_chunks(p.batch * p.heads_kv, c.num_qblocks);
  c.num_table_rows = num_table_rows;
  // Distances d = query_pos(b, i) - j of row b: Sq + Sk - 1 of them from min_distance(b).
  c.num_distances = need_table_grad ? std::max<int64_t>(Sq + Sk - 1, 0) : 0;
  c.table_by_distance = c.num_distances < num_table_rows;
  c.table_cols = c.table_by_distance ? c.num_distances : num_table_rows;
  c.direct_kv = std::is_same_v<scalar_t, acc_t> && c.chunks == 1;
  c.may_need_bias = any_local_bias(p);
  c.need_table_grad = need_table_grad;
  c.need_span_grad = need_span_grad;
  c.need_diag_sums = need_table_grad || need_span_grad;
  c.scale = static_cast<acc_t>(p.scale);
  return c;
}

template <typename scalar_t>
BackwardOutputs attention_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_lse /* undefined: none */,
    const AttentionParamsT<acc_type<scalar_t>>& p, bool need_table_grad, bool need_span_grad,
    int64_t num_table_rows, const at::Tensor& mask_grad /* (B, Hq, Sq, Sk) zeros, or undefined */) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool need_convert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, Sk = p.seqlen_k;
  const int64_t Dqk = p.head_dim_qk, Dv = p.head_dim_v;
  if (B * Hq * p.seqlen_q == 0 || (Dv == 0 && !grad_lse.defined())) {
    return zero_backward(q, k, v, need_table_grad, need_span_grad, num_table_rows);
  }
  BackwardCall<scalar_t> c = backward_call<scalar_t>(grad_out, q, k, v, out, lse, grad_lse, p,
                                                     need_table_grad, need_span_grad, num_table_rows);
  c.mask_grad = mask_grad.defined() ? mask_grad.template data_ptr<acc_t>() : nullptr;
  const int64_t width = round_width(c.chunks, B * Hkv);
  BackwardOutputs res;
  BackwardBuffers<acc_t> buf = allocate_backward(q, k, v, width, c, res);
  acc_t* run_k = buf.run_k.defined() ? buf.run_k.template data_ptr<acc_t>() : nullptr;
  acc_t* run_v = buf.run_v.defined() ? buf.run_v.template data_ptr<acc_t>() : nullptr;

  // (work: an upper bound, every query block against every key, five products)
  const int64_t work_per_chunk = B * Hq * c.num_qblocks * kBlockQ * Sk * (2 * Dqk + 3 * Dv) / c.chunks;
  for (c.chunk_begin = 0; c.chunk_begin < c.chunks; c.chunk_begin += width) {
    c.round_chunks = std::min(width, c.chunks - c.chunk_begin);
    // One task per (b, kv head, chunk of the round), also when Sk == 0 (the task then only
    // writes dQ = 0).
    run_tasks(
        B * Hkv * c.round_chunks, work_per_chunk * c.round_chunks,
        [&] {
          return BackwardScratch<acc_t>(Dqk, Dv, need_convert, c.num_distances, p.softcap > 0, p.dropout);
        },
        [&](int64_t task, BackwardScratch<acc_t>& s) { backward_task(c, task, s); });
    // Fixed-order reductions of the round's partials.
    if (!c.direct_kv) reduce_kv_round<scalar_t>(c, run_k, run_v, res);
    if (need_table_grad) reduce_table_round(c, buf.grad_table);
  }
  if (need_table_grad) res.grad_table = buf.grad_table;
  if (need_span_grad) res.grad_span = reduce_span_partials(c.span_part, B, c.chunks, Hq, q.options());
  return res;
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

}  // namespace

// ------------------------------------------------------------------------------------------
// Op entry point: checks (common/attention_args.cpp), parameters, dispatch.
// ------------------------------------------------------------------------------------------
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
  const bool want_mask = args.need_attn_mask_grad && present(a.attn_mask) && a.attn_mask->is_floating_point();

  BackwardOutputs res;
  at::Tensor mask_grad;  // dS, (B, Hq, Sq, Sk), reduced to the mask's shape below
  FASTATTN_DISPATCH_CPU_FLOATING(q.scalar_type(), "fastattn::attention_backward (CPU)", [&] {
    using acc_t = acc_type<scalar_t>;
    ParamTensors keep;
    const auto p = make_attention_params<acc_t>(a, keep, /*read_scale_tensor=*/true);
    if (want_mask) {  // (from the output-buffer cache: a fresh one would cost page faults)
      mask_grad = empty_output({p.batch, p.heads_q, p.seqlen_q, p.seqlen_k},
                               q.options().dtype(c10::CppTypeToScalarType<acc_t>::value)).zero_();
    }
    res = attention_backward_impl<scalar_t>(grad_out, q, a.k, a.v, out, lse, grad_lse, p,
                                            want_table, want_span,
                                            want_table ? a.rel_bias->size(0) : 0, mask_grad);
  });
  at::Tensor grad_table = at::empty({0}, q.options());
  at::Tensor grad_span = at::empty({0}, q.options());
  if (want_table) grad_table = res.grad_table.to(a.rel_bias->scalar_type()).contiguous();
  if (want_span) {
    const at::Tensor gs = a.span->dim() == 1 ? sum_over_batch(res.grad_span) : res.grad_span;
    grad_span = gs.to(a.span->scalar_type()).contiguous();
  }
  const at::Tensor grad_mask =
      want_mask ? reduce_to_mask_shape(mask_grad, *a.attn_mask) : at::empty({0}, q.options());
  return {res.grad_q, res.grad_k, res.grad_v, grad_table, grad_span, grad_mask};
}

}  // namespace cpu
}  // namespace fastattn
