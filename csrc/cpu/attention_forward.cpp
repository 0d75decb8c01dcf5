// CPU forward of fastattn::attention (flash / online softmax), its op entry point, and the
// registration of both CPU attention kernels (the backward is attention_backward.cpp).
//
// One task per (batch, query head, query block of kBlockQ), or, for short queries (decode
// steps), per (batch, several heads of one kv group): see ForwardTask. The query rows of a task
// are its "lanes":
//   qT  = scale * Q_blockᵀ                         (Dqk x BQ, packed once per task)
//   for each visited key tile (attention_tiles.h: at most two key ranges, tiles outside the
//   window / span / causal range are skipped):
//     sT  = K_tile · qT                            (nk x BQ: keys in rows, queries in lanes)
//     sT  = softcap * tanh(sT / softcap)           (only with softcap > 0)
//     sT += bias (per-diagonal vector for local tiles, per element for global tiles; -inf masks)
//     online softmax per query lane: m, l, alpha = exp(m_old - m_new), P = exp(sT - m_new)
//     oT  = alpha * oT + V_tileᵀ · P              (Dv x BQ)
//   out = oTᵀ / l, lse = m + log(l)  (an empty row: out = 0, lse = -inf)
// The layout and the shared pieces are described in attention_kernel.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/attention_args.h"
#include "common/attention_params.h"
#include "common/dispatch.h"
#include "cpu/attention_dropout.h"
#include "cpu/attention_kernel.h"

namespace fastattn {
namespace cpu {
namespace {

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

// Appends the tasks of the query block [i0, i0 + nq) of the heads of kv group hkv (batch b):
// consecutive heads that visit the same key ranges share a task, up to max_heads of them.
template <typename acc_t>
void add_block_tasks(const AttentionParamsT<acc_t>& p, int64_t b, int64_t hkv, int64_t i0,
                     int64_t nq, int64_t max_heads, std::vector<ForwardTask>& tasks) {
  const int64_t group = p.group_size();
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

template <typename acc_t>
std::vector<ForwardTask> forward_tasks(const AttentionParamsT<acc_t>& p) {
  const int64_t B = p.batch, Hkv = p.heads_kv, Sq = p.seqlen_q;
  const int64_t num_qblocks = (Sq + kBlockQ - 1) / kBlockQ;
  int64_t max_heads = (num_qblocks == 1 && 2 * Sq <= kBlockQ) ? kBlockQ / Sq : 1;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  max_heads = std::max<int64_t>(1, std::min(max_heads, (B * p.heads_q + threads - 1) / threads));
  std::vector<ForwardTask> tasks;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t hkv = 0; hkv < Hkv; ++hkv) {
      for (int64_t qb = 0; qb < num_qblocks; ++qb) {
        const int64_t i0 = qb * kBlockQ;
        add_block_tasks(p, b, hkv, i0, std::min(kBlockQ, Sq - i0), max_heads, tasks);
      }
    }
  }
  return tasks;
}

// Lanes rounded up to whole vectors.
template <typename acc_t>
inline int64_t padded_lanes(int64_t lanes) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  return (lanes + W - 1) / W * W;
}

// The order in which the tasks are handed out: most expensive first (causal, windows and
// global rows make them uneven), then the dynamic hand-out balances the tail. *work: the
// multiply-adds of all tasks (for run_tasks).
template <typename acc_t>
std::vector<int64_t> forward_task_order(const AttentionParamsT<acc_t>& p,
                                        const std::vector<ForwardTask>& tasks, int64_t* work) {
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  std::vector<int64_t> cost(num_tasks);
  for (int64_t t = 0; t < num_tasks; ++t) {
    const ForwardTask& task = tasks[t];
    const KeyRanges r = visible_key_ranges(p, task.b, task.h0, task.i0, task.i0 + task.nq);
    cost[t] = 0;
    for (int c = 0; c < r.count; ++c) cost[t] += r.hi[c] - r.lo[c];
    cost[t] *= padded_lanes<acc_t>(task.num_heads * task.nq);
  }
  std::vector<int64_t> order(num_tasks);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  *work = std::accumulate(cost.begin(), cost.end(), int64_t(0)) * (p.head_dim_qk + p.head_dim_v);
  return order;
}

template <typename acc_t>
struct ForwardScratch {
  std::vector<acc_t> qT, sT, oT, m, l, alpha, lane_uniform, diag, k_buf, v_buf;
  std::vector<acc_t> q_rows;  // tasks of single-row heads only (see dot_scores)
  LaneRows rows;          // the lanes' rows (dropout, attn_mask)
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
      Vec total[kKeys];
      for (int64_t u = 0; u < kKeys; ++u) total[u] = Vec(acc_t(0));
      // Blocks of kSumBlock entries, each summed on its own (see attention_gemm.h).
      for (int64_t d0 = 0; d0 < dim_vec; d0 += kSumBlock) {
        const int64_t d1 = std::min(dim_vec, d0 + kSumBlock);
        Vec acc[kKeys];
        for (int64_t u = 0; u < kKeys; ++u) acc[u] = Vec(acc_t(0));
        for (int64_t d = d0; d < d1; d += W) {
          const Vec qv = Vec::loadu(q + d);
#pragma GCC unroll 4
          for (int64_t u = 0; u < kKeys; ++u) {
            if (u < n) acc[u] = at::vec::fmadd(qv, Vec::loadu(k_tile + (j0 + u) * ldk + d), acc[u]);
          }
        }
        for (int64_t u = 0; u < kKeys; ++u) total[u] = d0 == 0 ? acc[u] : total[u] + acc[u];
      }
      for (int64_t u = 0; u < n; ++u) {
        const acc_t* k_row = k_tile + (j0 + u) * ldk;
        acc_t sum = at::vec::vec_reduce_all<acc_t>(add, total[u]);
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

// What every forward task reads: the call's parameters and tensors.
template <typename scalar_t>
struct ForwardCall {
  using acc_t = acc_type<scalar_t>;
  const AttentionParamsT<acc_t>& p;
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  scalar_t* out;
  float* lse;
  bool may_need_bias;  // any_local_bias(p)
  acc_t scale;
};

// One task's lanes (see ForwardTask) and how its tiles are computed. Heads with one query row
// each (decode steps) get their scores by dot_scores (dot_mode). A task of a single row also
// keeps its output as a row (the first Dv entries of oT) and adds o += P · V_tile (row_mode):
// the same fused multiply-adds per element, in the same order, as the lane product, with no
// vector lanes spent on padding (Dv a multiple of W: the row product has no scalar column tail).
struct TaskLanes {
  int64_t b, h0, hkv, heads, i0, nq, lanes, lanes_padded;
  bool dot_mode, row_mode;
};

template <typename acc_t>
TaskLanes task_lanes(const AttentionParamsT<acc_t>& p, const ForwardTask& task) {
  TaskLanes t;
  t.b = task.b;
  t.h0 = task.h0;
  t.hkv = task.h0 / p.group_size();
  t.heads = task.num_heads;
  t.i0 = task.i0;
  t.nq = task.nq;
  t.lanes = t.heads * t.nq;
  t.lanes_padded = padded_lanes<acc_t>(t.lanes);
  t.dot_mode = t.nq == 1;
  t.row_mode = t.lanes == 1 && p.head_dim_v % Vectorized<acc_t>::size() == 0;
  return t;
}

// Packs the task's scaled queries into qT (and q_rows in dot mode) and resets the running
// softmax state and output.
template <typename scalar_t, typename acc_t>
void start_task(const ForwardCall<scalar_t>& c, const TaskLanes& t, ForwardScratch<acc_t>& s) {
  const AttentionParamsT<acc_t>& p = c.p;
  const int64_t Dqk = p.head_dim_qk;
  for (int64_t g = 0; g < t.heads; ++g) {
    const scalar_t* q_rows = c.q + t.b * p.q_stride_b + (t.h0 + g) * p.q_stride_h + t.i0 * p.q_stride_s;
    pack_transposed(q_rows, p.q_stride_s, t.nq, Dqk, c.scale, s.qT.data(), g * t.nq);
    if (t.dot_mode) {
      for (int64_t d = 0; d < Dqk; ++d) s.q_rows[g * Dqk + d] = s.qT[d * kBlockQ + g];
    }
  }
  pad_lanes(s.qT.data(), Dqk, t.lanes, t.lanes_padded);
  if (p.dropout || p.has_mask()) {
    for (int64_t x = 0; x < kBlockQ; ++x) {
      const bool real = x < t.lanes;
      s.rows.bh[x] = t.b * p.heads_q + (real ? t.h0 + x / t.nq : 0);
      s.rows.i[x] = real ? t.i0 + x % t.nq : 0;
    }
  }
  std::fill(s.m.begin(), s.m.end(), -std::numeric_limits<acc_t>::infinity());
  std::fill(s.l.begin(), s.l.end(), acc_t(0));
  std::fill(s.oT.begin(), s.oT.end(), acc_t(0));
  std::fill(s.lane_uniform.begin(), s.lane_uniform.end(), acc_t(0));
}

// The bias of the key tile [j0, j0 + nk), head by head, and each head's uniform term in
// lane_uniform. A task with one head adds a per-diagonal bias inside the softmax's first pass
// (returned, else null); with several heads each head's diagonals are added here.
template <typename scalar_t, typename acc_t>
const acc_t* add_tile_bias(const ForwardCall<scalar_t>& c, const TaskLanes& t, int64_t j0,
                           int64_t nk, ForwardScratch<acc_t>& s) {
  const acc_t* fused_diag = nullptr;
  for (int64_t g = 0; g < t.heads; ++g) {
    acc_t* sT_head = s.sT.data() + g * t.nq;
    const TileBias<acc_t> tb = tile_bias(c.p, t.b, t.h0 + g, t.i0, t.nq, j0, nk, c.may_need_bias,
                                         sT_head, s.diag.data());
    std::fill(s.lane_uniform.begin() + g * t.nq, s.lane_uniform.begin() + (g + 1) * t.nq, tb.uniform);
    if (tb.diag != nullptr && t.heads == 1) {
      fused_diag = tb.diag;
    } else if (tb.diag != nullptr) {
      for (int64_t jj = 0; jj < nk; ++jj) {
        const acc_t* diag_row = tb.diag + (nk - 1 - jj);
        for (int64_t ii = 0; ii < t.nq; ++ii) {
          sT_head[jj * kBlockQ + ii] = masked_add(sT_head[jj * kBlockQ + ii], diag_row[ii]);
        }
      }
    }
  }
  return fused_diag;
}

// oT *= alpha per lane, when some lane's max moved.
template <typename acc_t>
void rescale_output(const TaskLanes& t, int64_t Dv, ForwardScratch<acc_t>& s) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  bool rescale = false;
  for (int64_t x = 0; x < t.lanes; ++x) rescale = rescale || s.alpha[x] != acc_t(1);
  if (rescale && t.row_mode) {
    const Vec a(s.alpha[0]);
    for (int64_t d = 0; d < Dv; d += W) (Vec::loadu(s.oT.data() + d) * a).store(s.oT.data() + d);
  } else if (rescale) {
    for (int64_t d = 0; d < Dv; ++d) {
      acc_t* o = s.oT.data() + d * kBlockQ;
      for (int64_t x = 0; x < t.lanes_padded; x += W) {
        (Vec::loadu(o + x) * Vec::loadu(s.alpha.data() + x)).store(o + x);
      }
    }
  }
}

// One key tile [j0, j0 + nk) of a task: scores (capped), bias, online softmax,
// oT += V_tileᵀ · P.
template <typename scalar_t, typename acc_t>
void forward_key_tile(const ForwardCall<scalar_t>& c, const TaskLanes& t, int64_t j0, int64_t nk,
                      ForwardScratch<acc_t>& s) {
  const AttentionParamsT<acc_t>& p = c.p;
  const int64_t Dqk = p.head_dim_qk, Dv = p.head_dim_v;
  if (p.has_mask() && tile_masked_out(p, t.b, s.rows, t.lanes, j0, nk)) return;
  const scalar_t* k_head = c.k + t.b * p.k_stride_b + t.hkv * p.k_stride_h;
  const scalar_t* v_head = c.v + t.b * p.v_stride_b + t.hkv * p.v_stride_h;
  int64_t ldk = 0, ldv = 0;
  const acc_t* k_tile = rows_as_acc(k_head + j0 * p.k_stride_s, p.k_stride_s, nk, Dqk,
                                    s.k_buf.data(), &ldk);
  if (t.dot_mode) {
    dot_scores(k_tile, ldk, nk, s.q_rows.data(), t.lanes, t.lanes_padded, Dqk, s.sT.data());
  } else {
    // sT = K_tile · (scale * Q_lanes)ᵀ
    gemm_bcast<acc_t, false>(nk, t.lanes_padded, Dqk, k_tile, ldk, 1, s.qT.data(), kBlockQ,
                             s.sT.data(), kBlockQ);
  }
  // Soft-capping acts on the scaled scores, before any bias or mask (padding lanes: 0 -> 0).
  if (p.softcap > 0) softcap_tile<acc_t>(s.sT.data(), nk, t.lanes_padded, p.softcap, nullptr);
  if (p.has_mask()) mask_tile(p, t.b, s.rows, t.lanes, j0, nk, s.sT.data());
  const acc_t* fused_diag = add_tile_bias(c, t, j0, nk, s);
  online_softmax_tile(s.sT.data(), nk, t.lanes_padded, fused_diag, s.lane_uniform.data(),
                      s.m.data(), s.l.data(), s.alpha.data());
  // Dropout acts on the weights that reach V, after the normalizer l took them undropped.
  if (p.dropout) apply_dropout(p, t.b, s.rows, t.lanes_padded, j0, nk, s.sT.data(), kBlockQ);
  rescale_output(t, Dv, s);
  const acc_t* v_tile = rows_as_acc(v_head + j0 * p.v_stride_s, p.v_stride_s, nk, Dv,
                                    s.v_buf.data(), &ldv);
  if (t.row_mode) {
    // o (the first Dv entries of oT) += P (lane 0 of sT) · V_tile
    gemm_bcast<acc_t, true>(1, Dv, nk, s.sT.data(), 0, kBlockQ, v_tile, ldv, s.oT.data(), Dv);
  } else {
    // oT += V_tileᵀ · P   (A(d, j) = V[j][d])
    gemm_bcast<acc_t, true>(Dv, t.lanes_padded, nk, v_tile, 1, ldv, s.sT.data(), kBlockQ,
                            s.oT.data(), kBlockQ);
  }
}

// out = oTᵀ / l, lse = m + log l. Empty rows: zeros and -inf. A NaN or +inf logit makes the
// row NaN (lse NaN / +inf), as in the reference.
template <typename scalar_t, typename acc_t>
void write_task_rows(const ForwardCall<scalar_t>& c, const TaskLanes& t, const ForwardScratch<acc_t>& s) {
  const AttentionParamsT<acc_t>& p = c.p;
  const int64_t Dv = p.head_dim_v;
  for (int64_t x = 0; x < t.lanes; ++x) {
    const int64_t h = t.h0 + x / t.nq, i = t.i0 + x % t.nq;
    scalar_t* o = c.out + t.b * p.o_stride_b + h * p.o_stride_h + i * p.o_stride_s;
    float* lse_i = c.lse + (t.b * p.heads_q + h) * p.seqlen_q + i;
    const acc_t mi = s.m[x], li = s.l[x];
    if (std::isnan(mi) || mi == std::numeric_limits<acc_t>::infinity()) {
      for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
      *lse_i = static_cast<float>(mi);
    } else if (li > acc_t(0)) {
      const acc_t inv = acc_t(1) / li;
      const int64_t o_stride = t.row_mode ? 1 : kBlockQ;
      for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<scalar_t>(s.oT[d * o_stride + x] * inv);
      *lse_i = static_cast<float>(mi + std::log(li));
    } else {
      for (int64_t d = 0; d < Dv; ++d) o[d] = scalar_t(0);
      *lse_i = -std::numeric_limits<float>::infinity();
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_task(const ForwardCall<scalar_t>& c, const ForwardTask& task, ForwardScratch<acc_t>& s) {
  const TaskLanes t = task_lanes(c.p, task);
  start_task(c, t, s);
  // Every head of the task visits these (forward_tasks groups heads by them).
  const KeyRanges ranges = visible_key_ranges(c.p, t.b, t.h0, t.i0, t.i0 + t.nq);
  for (int rg = 0; rg < ranges.count; ++rg) {
    for (int64_t j0 = ranges.lo[rg]; j0 < ranges.hi[rg]; j0 += kBlockK) {
      forward_key_tile(c, t, j0, std::min(kBlockK, ranges.hi[rg] - j0), s);
    }
  }
  write_task_rows(c, t, s);
}

template <typename scalar_t>
void attention_forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const AttentionParamsT<acc_type<scalar_t>>& p, at::Tensor& out,
                            at::Tensor& lse) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool need_convert = !std::is_same_v<scalar_t, acc_t>;
  const std::vector<ForwardTask> tasks = forward_tasks(p);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  if (num_tasks == 0) return;
  const ForwardCall<scalar_t> call{p,
                                   q.data_ptr<scalar_t>(),
                                   k.data_ptr<scalar_t>(),
                                   v.data_ptr<scalar_t>(),
                                   out.data_ptr<scalar_t>(),
                                   lse.data_ptr<float>(),
                                   any_local_bias(p),
                                   static_cast<acc_t>(p.scale)};
  int64_t work = 0;
  const std::vector<int64_t> order = forward_task_order(p, tasks, &work);
  const int64_t Dqk = p.head_dim_qk, Dv = p.head_dim_v;
  run_tasks(
      num_tasks, work, [&] { return ForwardScratch<acc_t>(Dqk, Dv, need_convert); },
      [&](int64_t task_index, ForwardScratch<acc_t>& s) { forward_task(call, tasks[order[task_index]], s); });
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Op entry point: checks (common/attention_args.cpp), parameters, dispatch.
// ------------------------------------------------------------------------------------------
AttentionOutputs attention_cpu(const AttentionArgs& a) {
  a.check();
  a.check_values();
  const at::Tensor& q = a.q;
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), Dv = a.v.size(3);
  at::Tensor out = at::empty({B, Hq, Sq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};  // no query row: nothing to compute (out is empty too)
  FASTATTN_DISPATCH_CPU_FLOATING(q.scalar_type(), "fastattn::attention (CPU)", [&] {
    using acc_t = acc_type<scalar_t>;
    ParamTensors keep;
    const auto p = make_attention_params<acc_t>(a, keep, /*read_scale_tensor=*/true);
    attention_forward_impl<scalar_t>(q, a.k, a.v, p, out, lse);
  });
  return {out, lse};
}

}  // namespace cpu
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  fastattn::register_attention_kernels<&fastattn::cpu::attention_cpu,
                                       &fastattn::cpu::attention_backward_cpu>(m);
}
