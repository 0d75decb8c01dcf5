// Backward attention kernels. Deterministic: every sum over thread blocks runs in a fixed
// order, so two backward passes on the same inputs give bitwise-equal gradients.
//
// With P = exp(logits - lse) (recomputed from the forward's lse, never stored) and
// dS = dlogits:
//   D_i    = rowsum(dO_i * O_i) - grad_lse_i                           (kernel 1: delta)
//   dP     = dO V^T,   dS = P * (dP - D),   dS' = dS * (1 - tanh^2) with soft-capping, else dS
//   dV     = P^T dO,   dK = scale * dS'^T Q,   dQ = scale * dS' K        (kernel 2)
//   grad_rel_bias[row(d), h] += dS,  grad_span[b, h] += dS * dlogit/dspan  (kernel 2)
//
// Kernel 2 is FlashAttention-2's backward: one block per (key block, b * Hkv + h_kv) keeps its
// K and V tiles and the dK, dV accumulators (in registers) while it walks the group's query
// heads and, for each, the query blocks that can see its keys, from the last to the first. Per
// query block it computes S^T and dP^T (keys x queries), P and dS into shared memory, then
// dV += P^T dO, dK += dS^T Q, and this key block's share of dQ = dS K, which it adds into an
// fp32 dQ buffer. Five matrix products per (query block, key block), against seven when dQ had
// a kernel of its own that recomputed S and dP. The next query block's Q arrives by cp.async
// while the current one is computed (double-buffered), its dO while dQ is.
//
// Determinism of dQ: the key blocks that add into one query block's dQ take turns
// (wait_for_turn / pass_turn, attention_utils.cuh) in ascending key-block order, so the fp32
// atomics on each element always run in the same order. Walking query blocks from the last
// down makes the turns cheap: with causal masks, windows or full attention alike, a lower key
// block reaches any query block no later than a higher one (it sees the same or earlier query
// blocks), so after the first query block the blocks of a head run in step without waiting.
// A block's work index is a ticket it takes when it starts, and it only ever waits for blocks
// with lower tickets, which have started (no assumption on the order CUDA starts blocks in),
// so the wait always ends. A small kernel then scales
// and converts the dQ buffer.
//
// The table gradient: per (query block, key block) tile whose distances span several table
// rows, dS (in shared memory, as the element type: the value dK and dQ use too) is summed along
// each diagonal (one distance d) by one thread, then per table row (clamped distances share a
// row) by one thread, into a partial row buffer of the (b, h, key block) that only this block
// touches. A tile whose distances all clamp to one end row of the table (tile_is_uniform: most
// tiles of a long sequence) only adds its dS to a per-thread register for that end, summed over
// the block when the head is done. The span gradient is a per-thread sum likewise. Small
// reduction kernels then add the partials over batches and key blocks in a fixed order.
#pragma once

#include "attention_utils.cuh"

namespace fastattn {
namespace cuda_attn {

// ---------------------------------------------------------------------------------------------
// Kernel 1: delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] - grad_lse[b, h, i]
// ---------------------------------------------------------------------------------------------
template <typename T>
struct DeltaArgs {
  const T* dout;
  const T* out;
  const float* grad_lse;  // (B, Hq, Sq) contiguous, or null
  float* delta;           // (B, Hq, Sq) contiguous
  int64_t total_rows;     // B * Hq * Sq
  int64_t heads, seqlen, head_dim;
  int64_t dout_stride_b, dout_stride_h, dout_stride_s;
  int64_t out_stride_b, out_stride_h, out_stride_s;
};

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32) attention_bwd_delta_kernel(const DeltaArgs<T> a) {
  const WarpRow r = warp_row(a.total_rows, a.heads, a.seqlen);
  const int lane = threadIdx.x % 32;
  if (!r.valid) return;  // (no barrier in this kernel)
  const T* dout_row = a.dout + r.b * a.dout_stride_b + r.h * a.dout_stride_h + r.i * a.dout_stride_s;
  const T* out_row = a.out + r.b * a.out_stride_b + r.h * a.out_stride_h + r.i * a.out_stride_s;
  float sum = 0.f;
  for (int64_t d = lane; d < a.head_dim; d += 32) sum += to_float(dout_row[d]) * to_float(out_row[d]);
  sum = warp_sum(sum);
  if (lane == 0) a.delta[r.row] = sum - (a.grad_lse != nullptr ? a.grad_lse[r.row] : 0.f);
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: dK, dV, dQ and the rel_bias / span gradients
// ---------------------------------------------------------------------------------------------
template <typename T>
struct BwdArgs {
  AttentionParams p;
  const T* q;
  const T* k;
  const T* v;
  const T* dout;          // (B, Hq, Sq, Dv), strides below
  int64_t dout_stride_b, dout_stride_h, dout_stride_s;
  const float* lse;       // (B, Hq, Sq) contiguous
  const float* delta;     // (B, Hq, Sq) contiguous
  const float* scale_ptr; // device pointer to the scale, or null
  float* dq_accum;        // (B, Hq, Sq, Dqk) fp32, zero-initialized; dS K without the scale
  int* dq_turns;          // (B, Hq, num_q_blocks) zero-initialized turn counters
  int* block_tickets;     // one zero-initialized counter: blocks take their work in start order
  bool dq_in_turns;       // false only for measuring what the turns cost (see attention_api.cu)
  T* dk;                  // (B, Hkv, Sk, Dqk) contiguous (when the group is not split)
  T* dv;                  // (B, Hkv, Sk, Dv) contiguous
  float* dk_partial;      // (group_splits, B, Hkv, Sk, Dqk) fp32 when the group is split, else null
  float* dv_partial;      // (group_splits, B, Hkv, Sk, Dv)
  float* bias_partial;    // (B, Hq, num_k_blocks, 2 * max_dist - 1) zero-initialized, or null
  float* span_partial;    // (B, Hq, num_k_blocks) zero-initialized, or null
  float* mask_grad;       // (B, Hq, Sq, Sk) zero-initialized: the attn_mask's gradient dS, or null
  int64_t num_k_blocks, num_q_blocks;
  int64_t heads_per_split, group_splits;  // query heads of a group per block; blocks per group
  bool q_vec, k_vec, v_vec, dout_vec;  // 16-byte vector loads allowed
};

// Loads the per-row softmax statistics of the query block [i0, i0 + kRows): lse in base-2
// units (0 for an empty row, whose pairs are all masked: exp2(-inf - 0) = 0, as the reference's
// safe lse) and delta. Rows past Sq get 0 (their pairs are masked anyway).
template <int kRows, int kThreads>
FA_DEVICE void load_row_stats(float* s_lse, float* s_delta, const float* lse_bh,
                              const float* delta_bh, int64_t i0, int64_t seqlen_q) {
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    const int64_t i = i0 + r;
    float l = 0.f, d = 0.f;
    if (i < seqlen_q) {
      l = lse_bh[i];
      l = l == -INFINITY ? 0.f : l * kLog2e;
      d = delta_bh[i];
    }
    s_lse[r] = l;
    s_delta[r] = d;
  }
}

// Tile sizes and warp roles for element type T and padded head dim kD.
template <typename T, int kD>
struct BwdConfig {
  static constexpr bool kTensorCores = !is_float32<T>();
  static constexpr bool kWide = kD > 128;  // the 256 class: half the tiles, same registers
  static constexpr int kBlockK = kTensorCores ? (kWide ? 64 : 128) : (kWide ? 32 : 64);
  static constexpr int kBlockQ = kTensorCores ? (kWide ? 32 : 64) : (kWide ? 16 : 32);
  static constexpr int kWarps = kTensorCores ? 8 : 4;
  static constexpr int kThreads = kWarps * 32;
  // Warp grids (warps along rows x along columns) of the three products; a warp's tile is
  // (16 kM) x (8 kN) (warp_tile_mma). Larger, squarer warp tiles read less shared memory per
  // mma; the dK, dV accumulators (2 kMB kNB 4 floats per thread) bound them.
  //   A: S^T = K Q^T and dP^T = V dO^T, kBlockK keys x kBlockQ queries;
  static constexpr int kGridAK = kTensorCores ? 4 : 2, kGridAQ = kWarps / kGridAK;
  //   B: dV += P^T dO and dK += dS^T Q, kBlockK keys x kD dims;
  static constexpr int kGridBK = (kTensorCores && !kWide) ? 4 : 2, kGridBD = kWarps / kGridBK;
  //   C: dQ_part = dS K, kBlockQ queries x kD dims.
  static constexpr int kGridCQ = kTensorCores ? 2 : (kWide ? 1 : 2), kGridCD = kWarps / kGridCQ;
  static constexpr int kMA = kBlockK / kGridAK / 16, kNA = kBlockQ / kGridAQ / 8;
  static constexpr int kMB = kBlockK / kGridBK / 16, kNB = kD / kGridBD / 8;
  static constexpr int kMC = kBlockQ / kGridCQ / 16, kNC = kD / kGridCD / 8;
  static_assert(kMA * 16 * kGridAK == kBlockK && kNA * 8 * kGridAQ == kBlockQ, "grid A");
  static_assert(kMB * 16 * kGridBK == kBlockK && kNB * 8 * kGridBD == kD, "grid B");
  static_assert(kMC * 16 * kGridCQ == kBlockQ && kNC * 8 * kGridCD == kD, "grid C");
  static_assert(kGridAK * kGridAQ == kWarps && kGridBK * kGridBD == kWarps && kGridCQ * kGridCD == kWarps,
                "every warp has a tile in every product");

  static constexpr int kLd = kD + smem_pad<T>();        // K, V, Q, dO tiles
  static constexpr int kLdT = kBlockQ + smem_pad<T>();  // P^T, dS^T tiles (keys x queries)
  static constexpr int kQTile = kBlockQ * kLd;           // one Q buffer, elements
  static constexpr int kDiagonals = kBlockQ + kBlockK - 1;
  // K, V; Q twice (the next query block's arrives while this one is computed), dO once (the
  // next one arrives during the dQ product); P^T, dS^T; lse, delta, warp sums, the tile's logit
  // table and the diagonal sums of the table gradient.
  static constexpr size_t kSmemTiles =
      sizeof(T) * (static_cast<size_t>(2 * kBlockK) * kLd + 3 * kQTile + 2 * kBlockK * kLdT);
  static constexpr size_t kSmemBytes =
      kSmemTiles + sizeof(float) * (2 * kBlockQ + kWarps + TileTable<kBlockQ, kBlockK>::kFloats + kDiagonals) +
      sizeof(int);  // the block's ticket
  // An A100 gives a block at most 163 KB (166912 bytes); the H100 227 KB.
  static_assert(kSmemBytes <= 166912, "the backward must fit an A100's shared memory");
};

// Adds the tile's dS (queries [i0, i0 + kBQ) x keys [j0, j0 + kBK), read from s_dst, dS^T in
// the element type with row length ld; zero on masked pairs) to the partial table rows,
// deterministically: pass 1 sums each diagonal (one distance d) in ascending query order; pass
// 2 adds, for each table row, its diagonals in ascending d (several only where rel_bias_row
// clamps) and updates the row, which no other block touches. Ends before a barrier: s_diag
// must not be written again until the caller's next one.
template <typename T, int kBQ, int kBK, int kThreads>
FA_DEVICE void accumulate_rel_bias_grad(const AttentionParams& p, const T* s_dst, int ld,
                                        float* s_diag, int64_t b, int64_t i0, int64_t j0,
                                        float* partial_rows) {
  constexpr int kDiagonals = kBQ + kBK - 1;
  // Slot s holds q_l - k_l = s - (kBK - 1), i.e. d = d_first + s.
  for (int s = threadIdx.x; s < kDiagonals; s += kThreads) {
    const int offset = s - (kBK - 1);
    const int q_begin = offset > 0 ? offset : 0;
    const int q_end = kBQ < kBK + offset ? kBQ : kBK + offset;
    float sum = 0.f;
    for (int q = q_begin; q < q_end; ++q) sum += to_float(s_dst[(q - offset) * ld + q]);
    s_diag[s] = sum;
  }
  __syncthreads();
  const int64_t d_first = p.query_pos(b, i0) - (j0 + kBK - 1);  // smallest distance of the tile
  for (int s = threadIdx.x; s < kDiagonals; s += kThreads) {
    const int64_t row = rel_bias_row(p, d_first + s);
    if (s > 0 && rel_bias_row(p, d_first + s - 1) == row) continue;  // not the row's first slot
    float sum = s_diag[s];
    for (int s2 = s + 1; s2 < kDiagonals && rel_bias_row(p, d_first + s2) == row; ++s2) {
      sum += s_diag[s2];
    }
    partial_rows[row] += sum;
  }
}

// The block's sum of one value per thread, in a fixed order (warp butterfly, then warps 0 ..
// kWarps - 1 by thread 0): valid in thread 0. s_warp_sums holds kWarps floats; every thread of
// the block must call it, and it may be called again right after (it ends on a barrier).
template <int kWarps>
FA_DEVICE float block_sum_fixed_order(float value, float* s_warp_sums) {
  const float warp_total = warp_sum(value);
  if (threadIdx.x % 32 == 0) s_warp_sums[threadIdx.x / 32] = warp_total;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += s_warp_sums[w];
  }
  __syncthreads();
  return total;
}

template <typename T, int kD>
__global__ void __launch_bounds__(BwdConfig<T, kD>::kThreads)
    attention_bwd_kernel(const BwdArgs<T> args) {
  using Cfg = BwdConfig<T, kD>;
  constexpr int kBK = Cfg::kBlockK, kBQ = Cfg::kBlockQ, kLd = Cfg::kLd, kLdT = Cfg::kLdT;
  constexpr int kThreads = Cfg::kThreads, kWarps = Cfg::kWarps;
  constexpr int kMA = Cfg::kMA, kNA = Cfg::kNA, kMB = Cfg::kMB, kNB = Cfg::kNB;
  constexpr int kMC = Cfg::kMC, kNC = Cfg::kNC;
  const AttentionParams& p = args.p;
  const bool want_bias_grad = args.bias_partial != nullptr;
  const bool want_span_grad = args.span_partial != nullptr;

  T* sK = reinterpret_cast<T*>(dynamic_smem());
  T* sV = sK + kBK * kLd;
  T* sQ_buf = sV + kBK * kLd;             // Q of the n-th visited query block in buffer n % 2
  T* sdO = sQ_buf + 2 * Cfg::kQTile;
  T* sPt = sdO + Cfg::kQTile;             // P^T   (keys x queries)
  T* sdSt = sPt + kBK * kLdT;             // dS^T  (keys x queries)
  float* s_lse = reinterpret_cast<float*>(sdSt + kBK * kLdT);
  float* s_delta = s_lse + kBQ;
  float* s_warp_sums = s_delta + kBQ;
  float* s_table = s_warp_sums + kWarps;  // the current tile's logit table
  float* s_diag = s_table + TileTable<kBQ, kBK>::kFloats;
  int* s_ticket = reinterpret_cast<int*>(s_diag + Cfg::kDiagonals);

  // The block's work comes from a ticket taken when it starts, not from blockIdx: a block only
  // ever waits (dQ turns) for blocks with lower tickets, which have started and never wait for
  // it, so the waits end whatever order the GPU starts blocks in (CUDA does not promise
  // blockIdx order). Ticket = ((b * Hkv + h_kv) * group_splits + split) * num_k_blocks + key
  // block: the key blocks of one (b, query heads) set are consecutive and ascending.
  if (threadIdx.x == 0) *s_ticket = take_ticket(args.block_tickets);
  __syncthreads();
  const int64_t ticket = *s_ticket;
  const int64_t k_block = ticket % args.num_k_blocks;
  const int64_t split = (ticket / args.num_k_blocks) % args.group_splits;
  const int64_t bh_kv = ticket / args.num_k_blocks / args.group_splits;  // b * Hkv + h_kv
  const int64_t b = bh_kv / p.heads_kv, h_kv = bh_kv % p.heads_kv;
  // This block's query heads of the group: [gi_begin, gi_end).
  const int64_t gi_begin = split * args.heads_per_split;
  const int64_t gi_end = min64(gi_begin + args.heads_per_split, p.group_size());
  const int64_t j0 = k_block * kBK;
  const int64_t valid_keys = min64(kBK, p.seqlen_k - j0);
  const int64_t num_q_blocks = args.num_q_blocks;
  const int64_t table_rows = 2 * p.max_dist - 1;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  // This warp's tiles in the three products (first row, first column).
  const int a_key0 = (warp / Cfg::kGridAQ) * kMA * 16, a_q0 = (warp % Cfg::kGridAQ) * kNA * 8;
  const int b_key0 = (warp / Cfg::kGridBD) * kMB * 16, b_d0 = (warp % Cfg::kGridBD) * kNB * 8;
  const int c_q0 = (warp / Cfg::kGridCD) * kMC * 16, c_d0 = (warp % Cfg::kGridCD) * kNC * 8;

  const T* k_bh = args.k + b * p.k_stride_b + h_kv * p.k_stride_h;
  const T* v_bh = args.v + b * p.v_stride_b + h_kv * p.v_stride_h;
  load_tile_async<T, kBK, kD, kThreads>(sK, kLd, k_bh, p.k_stride_s, j0, valid_keys,
                                        p.head_dim_qk, args.k_vec);
  load_tile_async<T, kBK, kD, kThreads>(sV, kLd, v_bh, p.v_stride_s, j0, valid_keys,
                                        p.head_dim_v, args.v_vec);

  const float scale = read_scale(p, args.scale_ptr);
  const ScoreRule rule = score_rule(p, scale);
  const DropoutSeed drop_seed = p.dropout ? dropout_seed_of(p) : DropoutSeed{};
  float acc_dk[kMB][kNB][4], acc_dv[kMB][kNB][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  // The keys query block qb of head h can see; a key block takes part in the query block when
  // it intersects them. Every key block makes this same test, so it also says whose turns come
  // before this block's in the query block's dQ.
  const auto query_block_ranges = [&](int64_t h, int64_t qb) -> KeyRanges {
    const int64_t i0 = qb * kBQ;
    return visible_key_ranges(p, b, h, i0, min64(i0 + kBQ, p.seqlen_q));
  };
  const auto sees_keys = [&](const KeyRanges& r, int64_t key_block) -> bool {
    return key_tile_in_ranges(r, key_block * kBK, key_block * kBK + kBK);
  };
  // The block visits (query head gi of the group, query block qb): its heads in order, query
  // blocks from the last down, skipping those that cannot see this key block. advance() steps
  // to the next such pair and says whether there is one (start from gi_begin, num_q_blocks).
  const int64_t group = p.group_size();
  const auto advance = [&](int64_t& gi, int64_t& qb) -> bool {
    if (num_q_blocks == 0 || gi >= gi_end) return false;
    for (;;) {
      if (--qb < 0) {
        qb = num_q_blocks - 1;
        if (++gi >= gi_end) return false;
      }
      if (sees_keys(query_block_ranges(h_kv * group + gi, qb), k_block)) return true;
    }
  };
  const auto load_q = [&](int64_t gi, int64_t qb, int buf) {
    const int64_t h = h_kv * group + gi;
    const int64_t i0 = qb * kBQ, rows = min64(kBQ, p.seqlen_q - i0);
    load_tile_async<T, kBQ, kD, kThreads>(sQ_buf + buf * Cfg::kQTile, kLd,
                                          args.q + b * p.q_stride_b + h * p.q_stride_h,
                                          p.q_stride_s, i0, rows, p.head_dim_qk, args.q_vec);
  };
  const auto load_dout = [&](int64_t gi, int64_t qb) {
    const int64_t h = h_kv * group + gi;
    const int64_t i0 = qb * kBQ, rows = min64(kBQ, p.seqlen_q - i0);
    load_tile_async<T, kBQ, kD, kThreads>(sdO, kLd, args.dout + b * args.dout_stride_b + h * args.dout_stride_h,
                                          args.dout_stride_s, i0, rows, p.head_dim_v, args.dout_vec);
  };

  // Per-thread shares of the current head's span gradient and of its uniform tiles' dS for
  // table row 0 and row 2 * max_dist - 2 (the same row when max_dist == 1: every tile then
  // uses edge_sums[0]); flushed into the head's partials when the head is done.
  float span_acc = 0.f;
  float edge_sums[2] = {0.f, 0.f};
  int* turn_to_pass = nullptr;  // thread 0: the dQ turn to pass at the next barrier

  int64_t next_gi = gi_begin, next_qb = num_q_blocks;
  bool have_next = advance(next_gi, next_qb);
  if (have_next) {
    load_q(next_gi, next_qb, 0);
    load_dout(next_gi, next_qb);
  }
  cp_async_commit();  // K and V (with the first Q and dO when there is one)
  for (int buf = 0; have_next; buf ^= 1) {
    const int64_t gi = next_gi, qb = next_qb;
    have_next = advance(next_gi, next_qb);
    const int64_t h = h_kv * group + gi;
    const int64_t bh = b * p.heads_q + h;
    const int64_t i0 = qb * kBQ;
    T* sQ = sQ_buf + buf * Cfg::kQTile;

    cp_async_wait<0>();
    __syncthreads();  // Q, dO (and K, V) landed; the previous step is done with everything
                      // else, and every thread has fenced its dQ atomics
    if (threadIdx.x == 0 && turn_to_pass != nullptr) pass_turn(turn_to_pass);
    if (have_next) {
      load_q(next_gi, next_qb, buf ^ 1);
      cp_async_commit();
    }
    load_row_stats<kBQ, kThreads>(s_lse, s_delta, args.lse + bh * p.seqlen_q,
                                  args.delta + bh * p.seqlen_q, i0, p.seqlen_q);
    float tile_bias;  // the common bias of a uniform tile (base 2)
    int64_t tile_bias_row;
    const bool uniform =
        tile_is_uniform(p, b, h, i0, i0 + kBQ, j0, j0 + kBK, &tile_bias, &tile_bias_row);
    const TileRules rules = tile_rules<kBQ, kBK>(p, b, i0, j0);
    if (!uniform) fill_tile_table<kBQ, kBK, kThreads>(p, b, h, i0, j0, rules.has_global(), s_table);
    __syncthreads();
    // A tile that attn_mask hides entirely has P = dS = 0: no product, no gradient term. It
    // still takes its dQ turn (later key blocks count it) and reloads dO like any other.
    const bool tile_visible = !p.has_mask() || mask_tile_visible<kBQ, kBK, kThreads>(p, b, h, i0, j0);

    // A: S^T = K Q^T and dP^T = V dO^T for this warp's keys x queries; P and dS into shared
    // memory (transposed: keys x queries, the A operands of phase B). dK and dQ take dS times
    // the soft-cap's derivative (ScoreRule::grad); the table and span gradients take dS itself
    // (their terms are added after the cap). A non-uniform tile's table gradient reads dS^T
    // from shared memory, so with a cap it is read first and dS^T rewritten after.
    if (tile_visible) {
      float acc_s[kMA][kNA][4], acc_dp[kMA][kNA][4];
      zero_acc(acc_s);
      zero_acc(acc_dp);
      warp_tile_mma<T, kMA, kNA, kD, false, BLayout::kNK>(acc_s, sK + a_key0 * kLd, kLd, sQ + a_q0 * kLd, kLd);
      warp_tile_mma<T, kMA, kNA, kD, false, BLayout::kNK>(acc_dp, sV + a_key0 * kLd, kLd, sdO + a_q0 * kLd, kLd);
      const bool table_from_smem = want_bias_grad && !uniform;
      const bool cap_later = rule.capped && table_from_smem;
      float tile_ds_sum = 0.f;  // this thread's dS of a uniform tile
      // Calls visit(key, query, p, ds, cap_grad, pz) for each of this thread's elements, in
      // pairs of queries (store_pair), and returns the pair's values through pv / ds. With
      // dropout (factors z: 1 / (1 - p) or 0), O = (P z) V: dS = P (dP z - D), and dV takes
      // pz = P z (pz = P without dropout).
      const auto for_each_pair = [&](auto&& visit) {
#pragma unroll
        for (int m = 0; m < kMA; ++m) {
#pragma unroll
          for (int n = 0; n < kNA; ++n) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              const int key = a_key0 + m * 16 + g + 8 * hf;  // row of the accumulator: a key
              const int col = a_q0 + n * 8 + 2 * t;          // its first column: a query
              float pv[2], ds[2], cap_grad[2], pz[2];
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int query = col + e;
                const float score = rule.score(acc_s[m][n][2 * hf + e]);
                float x = uniform ? fmaf(score, rule.logit_log2, tile_bias)
                                  : tile_logit_log2<kBQ, kBK>(rules, s_table, query, key, score,
                                                              rule.logit_log2);
                const int64_t i = i0 + query, j = j0 + key;
                const bool inside = i < p.seqlen_q && j < p.seqlen_k;
                if (p.has_mask() && inside) x = mask_logit_log2(p, b, h, i, j, x);
                const float z = p.dropout ? dropout_factor_at(p, drop_seed, b, h, i0 + query, j0 + key) : 1.f;
                pv[e] = exp2f(x - s_lse[query]);
                pz[e] = pv[e] * z;
                ds[e] = pv[e] * (acc_dp[m][n][2 * hf + e] * z - s_delta[query]);
                cap_grad[e] = rule.grad(score);
                // the mask is added after the cap: its gradient is dS itself, one thread per pair
                if (args.mask_grad != nullptr && inside) args.mask_grad[(bh * p.seqlen_q + i) * p.seqlen_k + j] = ds[e];
              }
              visit(key, col, pv, ds, cap_grad, pz);
            }
          }
        }
      };
      for_each_pair([&](int key, int col, const float* pv, const float* ds, const float* cap_grad,
                        const float* pz) {
        // Uniform tiles have no span (tile_is_uniform), so only the others contribute.
        if (!uniform && want_span_grad) {
          for (int e = 0; e < 2; ++e) {
            if (pv[e] != 0.f) span_acc += ds[e] * span_logit_grad(p, b, h, i0 + col + e, j0 + key);
          }
        }
        if (want_bias_grad && uniform) tile_ds_sum += ds[0] + ds[1];
        store_pair(sPt + key * kLdT + col, pz[0], pz[1]);
        if (cap_later) {
          store_pair(sdSt + key * kLdT + col, ds[0], ds[1]);
        } else {
          store_pair(sdSt + key * kLdT + col, ds[0] * cap_grad[0], ds[1] * cap_grad[1]);
        }
      });
      if (want_bias_grad && uniform) {  // (not edge_sums[index]: that would live in local memory)
        if (tile_bias_row == 0) {
          edge_sums[0] += tile_ds_sum;
        } else {
          edge_sums[1] += tile_ds_sum;
        }
      }
      __syncthreads();  // P^T and dS^T are complete (each product reads other warps' parts)
      if (table_from_smem) {  // the same for the whole block
        float* bias_rows = args.bias_partial + (bh * args.num_k_blocks + k_block) * table_rows;
        accumulate_rel_bias_grad<T, kBQ, kBK, kThreads>(p, sdSt, kLdT, s_diag, b, i0, j0, bias_rows);
      }
      if (cap_later) {
        __syncthreads();  // every warp has read the diagonals of dS^T
        for_each_pair([&](int key, int col, const float*, const float* ds, const float* cap_grad,
                          const float*) {
          store_pair(sdSt + key * kLdT + col, ds[0] * cap_grad[0], ds[1] * cap_grad[1]);
        });
        __syncthreads();  // dS^T times the cap's derivative is complete
      }
    }

    // B: dV += P^T dO and dK += dS^T Q for this warp's keys x dims.
    if (tile_visible) {
      warp_tile_mma<T, kMB, kNB, kBQ, false, BLayout::kKN>(acc_dv, sPt + b_key0 * kLdT, kLdT, sdO + b_d0, kLd);
      warp_tile_mma<T, kMB, kNB, kBQ, false, BLayout::kKN>(acc_dk, sdSt + b_key0 * kLdT, kLdT, sQ + b_d0, kLd);
    }
    __syncthreads();  // every warp is done with dO
    if (have_next) {
      load_dout(next_gi, next_qb);
      cp_async_commit();
    }

    // C: this key block's share of dQ = dS K (queries x dims; dS read from dS^T), added into
    // the fp32 buffer in this key block's turn.
    {
      float acc_dq[kMC][kNC][4];
      zero_acc(acc_dq);
      if (tile_visible) warp_tile_mma<T, kMC, kNC, kBK, true, BLayout::kKN>(acc_dq, sdSt + c_q0, kLdT, sK + c_d0, kLd);
      int turn = 0;  // key blocks before this one that add into this query block's dQ
      const KeyRanges ranges = query_block_ranges(h, qb);
      for (int64_t kb = 0; kb < k_block; ++kb) turn += sees_keys(ranges, kb) ? 1 : 0;
      int* turns = args.dq_turns + bh * num_q_blocks + qb;
      if (args.dq_in_turns) wait_for_turn(turns, turn);
      float* dq_rows = args.dq_accum + (bh * p.seqlen_q + i0) * p.head_dim_qk;
#pragma unroll
      for (int m = 0; m < kMC; ++m) {
#pragma unroll
        for (int n = 0; n < kNC; ++n) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int64_t row = c_q0 + m * 16 + g + 8 * (r / 2);
            const int col = c_d0 + n * 8 + 2 * t + (r % 2);
            if (tile_visible && i0 + row < p.seqlen_q && col < p.head_dim_qk) {
              atomic_add_f32(dq_rows + row * p.head_dim_qk + col, acc_dq[m][n][r]);
            }
          }
        }
      }
      if (args.dq_in_turns) thread_fence();  // the adds are visible before the turn passes (after the next barrier)
      turn_to_pass = turns;
    }

    // The head is done: its span and uniform-tile table sums join its partials.
    if (!have_next || next_gi != gi) {
      if (want_bias_grad) {
        const float low = block_sum_fixed_order<kWarps>(edge_sums[0], s_warp_sums);
        const float high = block_sum_fixed_order<kWarps>(edge_sums[1], s_warp_sums);
        if (threadIdx.x == 0) {
          float* bias_rows = args.bias_partial + (bh * args.num_k_blocks + k_block) * table_rows;
          bias_rows[0] += low;
          bias_rows[table_rows - 1] += high;
        }
        edge_sums[0] = edge_sums[1] = 0.f;
      }
      if (want_span_grad) {
        const float total = block_sum_fixed_order<kWarps>(span_acc, s_warp_sums);
        if (threadIdx.x == 0) args.span_partial[bh * args.num_k_blocks + k_block] = total;
        span_acc = 0.f;
      }
    }
  }

  cp_async_wait<0>();  // K and V, when no query block came (the loop never waited)
  __syncthreads();
  if (threadIdx.x == 0 && turn_to_pass != nullptr) pass_turn(turn_to_pass);
  if (args.dk_partial != nullptr) {
    // A split group: this split's fp32 dK (times scale) and dV, straight from the registers.
    const int64_t row0 = (split * p.batch * p.heads_kv + bh_kv) * p.seqlen_k + j0;
    float* dk_rows = args.dk_partial + row0 * p.head_dim_qk;
    float* dv_rows = args.dv_partial + row0 * p.head_dim_v;
#pragma unroll
    for (int m = 0; m < kMB; ++m) {
#pragma unroll
      for (int n = 0; n < kNB; ++n) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int key = b_key0 + m * 16 + g + 8 * (r / 2);
          const int col = b_d0 + n * 8 + 2 * t + (r % 2);
          if (key >= valid_keys) continue;
          if (col < p.head_dim_qk) dk_rows[key * p.head_dim_qk + col] = acc_dk[m][n][r] * scale;
          if (col < p.head_dim_v) dv_rows[key * p.head_dim_v + col] = acc_dv[m][n][r];
        }
      }
    }
    return;
  }
  // Stage dK (times scale) and dV in sK / sV, then write them out.
#pragma unroll
  for (int m = 0; m < kMB; ++m) {
#pragma unroll
    for (int n = 0; n < kNB; ++n) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int key = b_key0 + m * 16 + g + 8 * hf;
        const int col = b_d0 + n * 8 + 2 * t;
        store_pair(sK + key * kLd + col, acc_dk[m][n][2 * hf] * scale, acc_dk[m][n][2 * hf + 1] * scale);
        store_pair(sV + key * kLd + col, acc_dv[m][n][2 * hf], acc_dv[m][n][2 * hf + 1]);
      }
    }
  }
  __syncthreads();
  // dK, dV are freshly allocated contiguous tensors (16-byte aligned rows when D % 8 == 0).
  const int64_t dk_stride_s = p.head_dim_qk, dv_stride_s = p.head_dim_v;
  T* dk_bh = args.dk + bh_kv * p.seqlen_k * dk_stride_s;
  T* dv_bh = args.dv + bh_kv * p.seqlen_k * dv_stride_s;
  store_tile<T, kBK, kD, kThreads>(sK, kLd, dk_bh, dk_stride_s, j0, valid_keys, p.head_dim_qk,
                                   p.head_dim_qk % (16 / sizeof(T)) == 0);
  store_tile<T, kBK, kD, kThreads>(sV, kLd, dv_bh, dv_stride_s, j0, valid_keys, p.head_dim_v,
                                   p.head_dim_v % (16 / sizeof(T)) == 0);
}

// ---------------------------------------------------------------------------------------------
// Kernel 3: dQ = scale * dq_accum, converted to the element type
// ---------------------------------------------------------------------------------------------
template <typename T>
struct DqConvertArgs {
  const float* dq_accum;   // (B, Hq, Sq, Dqk) fp32
  T* dq;                   // same shape, contiguous
  const float* scale_ptr;  // device pointer to the scale, or null
  float scale;
  int64_t numel;
};

template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_dq_convert_kernel(const DqConvertArgs<T> a) {
  const float scale = a.scale_ptr != nullptr ? *a.scale_ptr : a.scale;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    a.dq[i] = from_float<T>(a.dq_accum[i] * scale);
  }
}

// dK or dV of a split group: out = sum over splits, in split order, of partial[split].
template <typename T>
struct GroupSplitReduceArgs {
  const float* partial;  // (splits, numel) fp32
  T* out;                // numel, contiguous
  int64_t numel, splits;
};

template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_group_split_reduce_kernel(const GroupSplitReduceArgs<T> a) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int64_t s = 0; s < a.splits; ++s) sum += a.partial[s * a.numel + i];
    a.out[i] = from_float<T>(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Fixed-order reductions of the per-block partials
// ---------------------------------------------------------------------------------------------
struct BiasGradReduceArgs {
  const float* partial;  // (B, Hq, n_split, R)
  float* grad;           // (R, Hq) fp32
  int64_t rows, heads, batch, n_split;
};

// grad[r, h] = sum over b, then split, of partial[b, h, split, r].
__global__ void __launch_bounds__(256) rel_bias_grad_reduce_kernel(const BiasGradReduceArgs a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.rows * a.heads) return;
  const int64_t h = idx / a.rows, r = idx % a.rows;  // r fastest: coalesced partial reads
  float sum = 0.f;
  for (int64_t b = 0; b < a.batch; ++b) {
    const float* base = a.partial + ((b * a.heads + h) * a.n_split) * a.rows + r;
    for (int64_t s = 0; s < a.n_split; ++s) sum += base[s * a.rows];
  }
  a.grad[r * a.heads + h] = sum;
}

struct SpanGradReduceArgs {
  const float* partial;  // (B, Hq, n_split)
  float* grad;           // (B, Hq), or (Hq,) when per_head
  int64_t heads, batch, n_split;
  bool per_head;         // span was (Hq,): also sum over the batch
};

__global__ void __launch_bounds__(256) span_grad_reduce_kernel(const SpanGradReduceArgs a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t outputs = a.per_head ? a.heads : a.batch * a.heads;
  if (idx >= outputs) return;
  const int64_t b_first = a.per_head ? 0 : idx / a.heads;
  const int64_t b_end = a.per_head ? a.batch : b_first + 1;
  const int64_t h = idx % a.heads;
  float sum = 0.f;
  for (int64_t b = b_first; b < b_end; ++b) {
    const float* base = a.partial + (b * a.heads + h) * a.n_split;
    for (int64_t s = 0; s < a.n_split; ++s) sum += base[s];
  }
  a.grad[idx] = sum;
}

}  // namespace cuda_attn
}  // namespace fastattn
