// Backward attention kernels. Deterministic: no atomics; every output element is written by
// exactly one thread block, and every sum over blocks runs in a fixed order.
//
// With P = exp(logits - lse) (recomputed from the forward's lse, never stored) and
// dS = dlogits:
//   D_i    = rowsum(dO_i * O_i) - grad_lse_i                         (kernel 1: delta)
//   dP     = dO V^T,   dS = P * (dP - D)
//   dV     = P^T dO,   dK = scale * dS^T Q                           (kernel 2: dK/dV)
//   dQ     = scale * dS K                                            (kernel 3: dQ)
//   grad_rel_bias[row(d), h] += dS,  grad_span[b, h] += dS * dlogit/dspan  (kernel 3)
//
// Kernel 2 runs one block per (key block, b * Hkv + h_kv) and loops over the group's query
// heads and over the query blocks that can see the key block, in a fixed order, so GQA needs
// no atomics; the next query block's Q and dO arrive by cp.async (double-buffered) while the
// current one is computed. Kernel 3 runs one block per (query split, b * Hq + h): a block handles query
// blocks split, split + n_split, ... and walks their visible key tiles like the forward (the
// next tile's K and V arrive by cp.async, double-buffered, while the current one is used). It
// accumulates dQ in registers, the span gradient per thread, and the bias-table gradient in a
// per-block partial row buffer in global memory (only this block touches it). Per key tile
// whose distances span several table rows, dS is staged in shared memory, summed along each
// diagonal (one distance d) by one thread, then per table row (clamped distances share a row)
// by one thread. A tile whose distances all clamp to one end row of the table (tile_is_uniform:
// most tiles of a long sequence) only adds its dS to a per-thread register for that end, summed
// over the block at the end. Small reduction kernels then add the per-block partials in a
// fixed order.
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

constexpr int kDeltaWarps = 8;  // rows per block (one warp per row)

template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32) attention_bwd_delta_kernel(const DeltaArgs<T> a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDeltaWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= a.total_rows) return;  // idle warps of the last block (no barrier in this kernel)
  const int64_t b = row / (a.heads * a.seqlen), h = (row / a.seqlen) % a.heads, i = row % a.seqlen;
  const T* dout_row = a.dout + b * a.dout_stride_b + h * a.dout_stride_h + i * a.dout_stride_s;
  const T* out_row = a.out + b * a.out_stride_b + h * a.out_stride_h + i * a.out_stride_s;
  float sum = 0.f;
  for (int64_t d = lane; d < a.head_dim; d += 32) sum += to_float(dout_row[d]) * to_float(out_row[d]);
  sum = warp_sum(sum);
  if (lane == 0) a.delta[row] = sum - (a.grad_lse != nullptr ? a.grad_lse[row] : 0.f);
}

// ---------------------------------------------------------------------------------------------
// Kernels 2 and 3: shared arguments
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
  T* dq;                  // (B, Hq, Sq, Dqk) contiguous
  T* dk;                  // (B, Hkv, Sk, Dqk) contiguous
  T* dv;                  // (B, Hkv, Sk, Dv) contiguous
  float* bias_partial;    // (B * Hq * n_split, 2 * max_dist - 1) zero-initialized, or null
  float* span_partial;    // (B * Hq * n_split), or null
  int64_t num_k_blocks;   // kernel 2
  int64_t n_split;        // kernel 3: blocks per (b, h)
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

// ---------------------------------------------------------------------------------------------
// Kernel 2: dK, dV
// ---------------------------------------------------------------------------------------------
template <typename T, int kD>
struct BwdKVConfig {
  static constexpr bool kTensorCores = !is_float32<T>();
  static constexpr int kBlockK = kTensorCores ? (kD <= 128 ? 64 : 32) : (kD <= 128 ? 32 : 16);
  static constexpr int kBlockQ = kTensorCores ? 32 : (kD <= 128 ? 32 : 16);
  static constexpr int kWarps = kTensorCores ? 4 : (kD <= 128 ? 4 : 2);
  static constexpr int kThreads = kWarps * 32;
  // Warp roles. Every warp owns a 16-key slab; kSplit warps share a slab and split
  //  - phase A (P^T and dS^T, 16 keys x kBlockQ queries) by queries: kQueriesPerWarp each,
  //  - phase B (dK, dV accumulators, 16 keys x kD dims) by dims: kDimsPerWarp each.
  static constexpr int kSlabs = kBlockK / 16;
  static constexpr int kSplit = kWarps / kSlabs;
  static constexpr int kQueriesPerWarp = kBlockQ / kSplit;
  static constexpr int kDimsPerWarp = kD / kSplit;
  static constexpr int kLd = kD + smem_pad<T>();       // K, V, Q, dO tiles
  static constexpr int kLdT = kBlockQ + smem_pad<T>(); // P^T, dS^T tiles (keys x queries)
  static constexpr int kQTile = kBlockQ * kLd;          // one Q (or dO) buffer, elements
  // K, V; Q and dO twice (the next query block's arrive while this one is computed); P^T, dS^T.
  static constexpr size_t kSmemBytes =
      sizeof(T) * (static_cast<size_t>(2 * kBlockK) * kLd + 4 * kQTile + 2 * kBlockK * kLdT) +
      sizeof(float) * (2 * kBlockQ + TileTable<kBlockQ, kBlockK>::kFloats);
  static_assert(kWarps % kSlabs == 0, "warps per slab");
  static_assert(kQueriesPerWarp % 8 == 0 && kDimsPerWarp % 8 == 0, "8-column accumulator tiles");
  static_assert(kBlockQ % 16 == 0, "query tile is the K dim of P^T dO");
};

template <typename T, int kD>
__global__ void __launch_bounds__(BwdKVConfig<T, kD>::kThreads)
    attention_bwd_dkdv_kernel(const BwdArgs<T> args) {
  using Cfg = BwdKVConfig<T, kD>;
  constexpr int kBK = Cfg::kBlockK, kBQ = Cfg::kBlockQ, kLd = Cfg::kLd, kLdT = Cfg::kLdT;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kQW = Cfg::kQueriesPerWarp, kDW = Cfg::kDimsPerWarp;
  constexpr int kTilesA = kQW / 8;  // accumulator tiles of P^T / dP^T (8 queries each)
  constexpr int kTilesB = kDW / 8;  // accumulator tiles of dK / dV (8 dims each)
  const AttentionParams& p = args.p;

  T* sK = reinterpret_cast<T*>(dynamic_smem());
  T* sV = sK + kBK * kLd;
  T* sQ_buf = sV + kBK * kLd;           // Q of query block n in buffer n % 2
  T* sdO_buf = sQ_buf + 2 * Cfg::kQTile;  // dO likewise
  T* sPt = sdO_buf + 2 * Cfg::kQTile;   // P^T   (keys x queries)
  T* sdSt = sPt + kBK * kLdT; // dS^T  (keys x queries)
  float* s_lse = reinterpret_cast<float*>(sdSt + kBK * kLdT);
  float* s_delta = s_lse + kBQ;
  float* s_table = s_delta + kBQ;  // the (query block, key block) tile's logit table

  const int64_t k_block = blockIdx.x % args.num_k_blocks;
  const int64_t bh_kv = blockIdx.x / args.num_k_blocks;  // b * Hkv + h_kv
  const int64_t b = bh_kv / p.heads_kv, h_kv = bh_kv % p.heads_kv;
  const int64_t group = p.group_size();
  const int64_t j0 = k_block * kBK;
  const int64_t valid_keys = min64(kBK, p.seqlen_k - j0);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int slab = warp % Cfg::kSlabs;  // this warp's keys: [16 * slab, 16 * slab + 16)
  const int part = warp / Cfg::kSlabs;  // its share of the queries (phase A) / dims (phase B)

  const T* k_bh = args.k + b * p.k_stride_b + h_kv * p.k_stride_h;
  const T* v_bh = args.v + b * p.v_stride_b + h_kv * p.v_stride_h;
  load_tile_async<T, kBK, kD, kThreads>(sK, kLd, k_bh, p.k_stride_s, j0, valid_keys,
                                        p.head_dim_qk, args.k_vec);
  load_tile_async<T, kBK, kD, kThreads>(sV, kLd, v_bh, p.v_stride_s, j0, valid_keys,
                                        p.head_dim_v, args.v_vec);

  const float scale = read_scale(p, args.scale_ptr);
  const float scale_log2 = scale * kLog2e;
  float acc_dk[kTilesB][4], acc_dv[kTilesB][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  // The block visits (query head gi of the group, query block qb) in that order, skipping the
  // query blocks that cannot see this key block (the same decision for the whole block).
  // advance() steps to the next such pair and says whether there is one.
  const int64_t num_q_blocks = ceil_div(p.seqlen_q, kBQ);
  const auto advance = [&](int64_t& gi, int64_t& qb) -> bool {
    if (num_q_blocks == 0) return false;
    for (;;) {
      if (++qb == num_q_blocks) {
        qb = 0;
        if (++gi == group) return false;
      }
      const int64_t i0 = qb * kBQ, i1 = min64(i0 + kBQ, p.seqlen_q);
      if (key_tile_in_ranges(visible_key_ranges(p, b, h_kv * group + gi, i0, i1), j0, j0 + kBK)) {
        return true;
      }
    }
  };
  // Q and dO of (gi, qb) into buffer `buf` by cp.async (the caller commits the group).
  const auto prefetch = [&](int64_t gi, int64_t qb, int buf) {
    const int64_t h = h_kv * group + gi;
    const int64_t i0 = qb * kBQ, rows = min64(kBQ, p.seqlen_q - i0);
    load_tile_async<T, kBQ, kD, kThreads>(sQ_buf + buf * Cfg::kQTile, kLd,
                                          args.q + b * p.q_stride_b + h * p.q_stride_h,
                                          p.q_stride_s, i0, rows, p.head_dim_qk, args.q_vec);
    load_tile_async<T, kBQ, kD, kThreads>(sdO_buf + buf * Cfg::kQTile, kLd,
                                          args.dout + b * args.dout_stride_b + h * args.dout_stride_h,
                                          args.dout_stride_s, i0, rows, p.head_dim_v, args.dout_vec);
  };

  int64_t next_gi = 0, next_qb = -1;
  bool have_next = advance(next_gi, next_qb);
  if (have_next) prefetch(next_gi, next_qb, 0);
  cp_async_commit();  // K and V (with the first Q/dO when there is one)
  for (int buf = 0; have_next; buf ^= 1) {
    const int64_t gi = next_gi, qb = next_qb;
    have_next = advance(next_gi, next_qb);
    const int64_t h = h_kv * group + gi;
    const int64_t bh = b * p.heads_q + h;
    const int64_t i0 = qb * kBQ;
    T* sQ = sQ_buf + buf * Cfg::kQTile;
    T* sdO = sdO_buf + buf * Cfg::kQTile;

    cp_async_wait<0>();
    __syncthreads();  // this block's Q/dO (and K/V) landed; phase B of the previous one is done
                      // with the other buffer, sPt, sdSt and the row stats
    if (have_next) {
      prefetch(next_gi, next_qb, buf ^ 1);
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

    // Phase A: S^T = K Q^T and dP^T = V dO^T for 16 keys x kQW queries.
    const int q_first = part * kQW;  // first query (in the tile) of this warp
    float acc_s[kTilesA][4], acc_dp[kTilesA][4];
    zero_acc(acc_s);
    zero_acc(acc_dp);
    warp_mma_nt<T, kTilesA, kD>(acc_s, sK + slab * 16 * kLd, kLd, sQ + q_first * kLd, kLd);
    warp_mma_nt<T, kTilesA, kD>(acc_dp, sV + slab * 16 * kLd, kLd, sdO + q_first * kLd, kLd);

#pragma unroll
    for (int n = 0; n < kTilesA; ++n) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int key = slab * 16 + g + 8 * hf;  // row of the accumulator: a key
        float pv[2], ds[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int query = q_first + n * 8 + 2 * t + e;  // column: a query
          const float qk = acc_s[n][2 * hf + e];
          const float x = uniform ? fmaf(qk, scale_log2, tile_bias)
                                  : tile_logit_log2<kBQ, kBK>(rules, s_table, query, key, qk, scale_log2);
          pv[e] = exp2f(x - s_lse[query]);
          ds[e] = pv[e] * (acc_dp[n][2 * hf + e] - s_delta[query]);
        }
        const int col = q_first + n * 8 + 2 * t;
        store_pair(sPt + key * kLdT + col, pv[0], pv[1]);
        store_pair(sdSt + key * kLdT + col, ds[0], ds[1]);
      }
    }
    __syncthreads();  // the warps sharing a slab read each other's P^T / dS^T columns

    // Phase B: dV += P^T dO and dK += dS^T Q for 16 keys x kDW dims.
    const int d_first = part * kDW;
    warp_mma_nn<T, kTilesB, kBQ>(acc_dv, sPt + slab * 16 * kLdT, kLdT, sdO + d_first, kLd);
    warp_mma_nn<T, kTilesB, kBQ>(acc_dk, sdSt + slab * 16 * kLdT, kLdT, sQ + d_first, kLd);
  }

  // Stage dK (times scale) and dV in sK / sV, then write them out.
  cp_async_wait<0>();  // K and V, when no query block came (the loop never waited)
  __syncthreads();
#pragma unroll
  for (int n = 0; n < kTilesB; ++n) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int key = slab * 16 + g + 8 * hf;
      const int col = part * kDW + n * 8 + 2 * t;
      store_pair(sK + key * kLd + col, acc_dk[n][2 * hf] * scale, acc_dk[n][2 * hf + 1] * scale);
      store_pair(sV + key * kLd + col, acc_dv[n][2 * hf], acc_dv[n][2 * hf + 1]);
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
// Kernel 3: dQ, and the rel_bias / span gradients
// ---------------------------------------------------------------------------------------------
template <typename T, int kD>
struct BwdQConfig {
  static constexpr bool kTensorCores = !is_float32<T>();
  static constexpr int kBlockQ = kTensorCores ? (kD <= 128 ? 64 : 32) : (kD <= 128 ? 32 : 16);
  static constexpr int kBlockK = kTensorCores ? 32 : (kD <= 128 ? 32 : 16);
  static constexpr int kWarps = kBlockQ / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLd = kD + smem_pad<T>();        // Q, dO, K, V tiles
  static constexpr int kLdS = kBlockK + smem_pad<T>();  // dS tile in T (operand of dS K)
  static constexpr int kLdF = kBlockK + 1;              // dS tile in fp32 (bias gradient)
  static constexpr int kDiagonals = kBlockQ + kBlockK - 1;
  static constexpr int kKTile = kBlockK * kLd;  // one K (or V) buffer, elements
  // Q, dO; K and V twice (the next key tile's arrive while this one is computed); dS.
  static constexpr size_t kSmemBytesBase =
      sizeof(T) * (static_cast<size_t>(2 * kBlockQ) * kLd + 4 * kKTile + kBlockQ * kLdS) +
      sizeof(float) * (2 * kBlockQ + kWarps + TileTable<kBlockQ, kBlockK>::kFloats);
  // Extra shared memory when the bias-table gradient is computed.
  static constexpr size_t kSmemBytesBias = sizeof(float) * (kBlockQ * kLdF + kDiagonals);
  static_assert(kBlockK % 16 == 0, "key tile is the K dim of dS K");
};

// Adds the tile's dS (queries [i0, i0 + kBQ) x keys [j0, j0 + kBK), fp32 in s_ds with row
// length kBK + 1, zero on masked pairs) to the block's partial bias-table rows, deterministically:
// pass 1 sums each diagonal (one distance d) in ascending query order; pass 2 adds, for each
// table row, its diagonals in ascending d (several only where rel_bias_row clamps) and updates
// the row, which no other thread of any block touches.
template <int kBQ, int kBK, int kThreads>
FA_DEVICE void accumulate_rel_bias_grad(const AttentionParams& p, const float* s_ds, float* s_diag,
                                        int64_t i0, int64_t j0, float* partial_rows) {
  constexpr int kLdF = kBK + 1, kDiagonals = kBQ + kBK - 1;
  // Slot s holds q_l - k_l = s - (kBK - 1), i.e. d = d_first + s.
  for (int s = threadIdx.x; s < kDiagonals; s += kThreads) {
    const int offset = s - (kBK - 1);
    const int q_begin = offset > 0 ? offset : 0;
    const int q_end = kBQ < kBK + offset ? kBQ : kBK + offset;
    float sum = 0.f;
    for (int q = q_begin; q < q_end; ++q) sum += s_ds[q * kLdF + (q - offset)];
    s_diag[s] = sum;
  }
  __syncthreads();
  const int64_t d_first = p.query_pos(i0) - (j0 + kBK - 1);  // smallest distance of the tile
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
__global__ void __launch_bounds__(BwdQConfig<T, kD>::kThreads)
    attention_bwd_dq_kernel(const BwdArgs<T> args) {
  using Cfg = BwdQConfig<T, kD>;
  constexpr int kBQ = Cfg::kBlockQ, kBK = Cfg::kBlockK, kLd = Cfg::kLd, kLdS = Cfg::kLdS;
  constexpr int kLdF = Cfg::kLdF, kThreads = Cfg::kThreads, kWarps = Cfg::kWarps;
  constexpr int kTilesS = kBK / 8;  // accumulator tiles of S / dP (8 keys each)
  constexpr int kTilesQ = kD / 8;   // accumulator tiles of dQ (8 dims each)
  const AttentionParams& p = args.p;
  const bool want_bias_grad = args.bias_partial != nullptr;
  const bool want_span_grad = args.span_partial != nullptr;

  T* sQ = reinterpret_cast<T*>(dynamic_smem());
  T* sdO = sQ + kBQ * kLd;
  T* sK_buf = sdO + kBQ * kLd;          // K of the n-th key tile in buffer n % 2
  T* sV_buf = sK_buf + 2 * Cfg::kKTile;  // V likewise
  T* sdS = sV_buf + 2 * Cfg::kKTile;
  float* s_lse = reinterpret_cast<float*>(sdS + kBQ * kLdS);
  float* s_delta = s_lse + kBQ;
  float* s_warp_sums = s_delta + kBQ;
  float* s_table = s_warp_sums + kWarps;   // the current tile's logit table
  float* s_ds_f32 = s_table + TileTable<kBQ, kBK>::kFloats;  // only when want_bias_grad (host sizes the smem)
  float* s_diag = s_ds_f32 + kBQ * kLdF;

  const int64_t split = blockIdx.x % args.n_split;
  const int64_t bh = blockIdx.x / args.n_split;  // b * Hq + h
  const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
  const int64_t h_kv = h / p.group_size();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = warp * 16;

  const T* q_bh = args.q + b * p.q_stride_b + h * p.q_stride_h;
  const T* do_bh = args.dout + b * args.dout_stride_b + h * args.dout_stride_h;
  const T* k_bh = args.k + b * p.k_stride_b + h_kv * p.k_stride_h;
  const T* v_bh = args.v + b * p.v_stride_b + h_kv * p.v_stride_h;
  const int64_t dq_stride_s = p.head_dim_qk;  // dQ is a fresh contiguous tensor
  T* dq_bh = args.dq + bh * p.seqlen_q * dq_stride_s;
  float* bias_rows = want_bias_grad ? args.bias_partial + blockIdx.x * (2 * p.max_dist - 1) : nullptr;

  const float scale = read_scale(p, args.scale_ptr);
  const float scale_log2 = scale * kLog2e;
  float span_acc = 0.f;  // this thread's share of dL/dspan[b, h]
  // This thread's share of the uniform tiles' dS for table row 0 and row 2 * max_dist - 2 (the
  // same row when max_dist == 1: every tile then uses edge_sums[0]).
  float edge_sums[2] = {0.f, 0.f};

  const int64_t num_q_blocks = ceil_div(p.seqlen_q, kBQ);
  for (int64_t qb = split; qb < num_q_blocks; qb += args.n_split) {
    const int64_t i0 = qb * kBQ;
    const int64_t i1 = min64(i0 + kBQ, p.seqlen_q);
    __syncthreads();  // the previous query block's dQ has been copied out of sQ
    load_tile_async<T, kBQ, kD, kThreads>(sQ, kLd, q_bh, p.q_stride_s, i0, i1 - i0,
                                          p.head_dim_qk, args.q_vec);
    load_tile_async<T, kBQ, kD, kThreads>(sdO, kLd, do_bh, args.dout_stride_s, i0, i1 - i0,
                                          p.head_dim_v, args.dout_vec);
    load_row_stats<kBQ, kThreads>(s_lse, s_delta, args.lse + bh * p.seqlen_q,
                                  args.delta + bh * p.seqlen_q, i0, p.seqlen_q);
    // K and V of key tile kt into buffer `buf` by cp.async (the caller commits the group).
    const auto prefetch = [&](int64_t kt, int buf) {
      const int64_t j0 = kt * kBK, valid_keys = min64(kBK, p.seqlen_k - j0);
      load_tile_async<T, kBK, kD, kThreads>(sK_buf + buf * Cfg::kKTile, kLd, k_bh, p.k_stride_s,
                                            j0, valid_keys, p.head_dim_qk, args.k_vec);
      load_tile_async<T, kBK, kD, kThreads>(sV_buf + buf * Cfg::kKTile, kLd, v_bh, p.v_stride_s,
                                            j0, valid_keys, p.head_dim_v, args.v_vec);
    };

    float acc_dq[kTilesQ][4];
    zero_acc(acc_dq);
    const KeyTiles tiles = key_tiles(visible_key_ranges(p, b, h, i0, i1), kBK);
    if (tiles.first() < tiles.end) prefetch(tiles.first(), 0);
    cp_async_commit();  // Q, dO and the first K/V tile
    int buf = 0;
    for (int64_t kt = tiles.first(); kt < tiles.end; kt = tiles.next(kt), buf ^= 1) {
      const int64_t j0 = kt * kBK;
      const T* sK = sK_buf + buf * Cfg::kKTile;
      const T* sV = sV_buf + buf * Cfg::kKTile;
      cp_async_wait<0>();
      __syncthreads();  // this tile's K/V (and Q/dO) landed; every warp is done with the
                        // previous tile (the other buffer, the table, the fp32 dS)
      if (tiles.next(kt) < tiles.end) {
        prefetch(tiles.next(kt), buf ^ 1);
        cp_async_commit();
      }
      float tile_bias;  // the common bias of a uniform tile (base 2)
      int64_t tile_bias_row;
      const bool uniform =
          tile_is_uniform(p, b, h, i0, i0 + kBQ, j0, j0 + kBK, &tile_bias, &tile_bias_row);
      const TileRules rules = tile_rules<kBQ, kBK>(p, b, i0, j0);
      if (!uniform) fill_tile_table<kBQ, kBK, kThreads>(p, b, h, i0, j0, rules.has_global(), s_table);
      __syncthreads();
      // A uniform tile's dS all goes to one table row, an end row (every distance clamps): it
      // is summed in this thread's register for that end instead of along the diagonals.
      const bool bias_grad_by_diagonal = want_bias_grad && !uniform;
      float tile_ds_sum = 0.f;  // this thread's dS of a uniform tile

      float acc_s[kTilesS][4], acc_dp[kTilesS][4];
      zero_acc(acc_s);
      zero_acc(acc_dp);
      warp_mma_nt<T, kTilesS, kD>(acc_s, sQ + row0 * kLd, kLd, sK, kLd);
      warp_mma_nt<T, kTilesS, kD>(acc_dp, sdO + row0 * kLd, kLd, sV, kLd);

#pragma unroll
      for (int n = 0; n < kTilesS; ++n) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int query = row0 + g + 8 * hf;
          float ds[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = n * 8 + 2 * t + e;
            const float qk = acc_s[n][2 * hf + e];
            const float x = uniform ? fmaf(qk, scale_log2, tile_bias)
                                    : tile_logit_log2<kBQ, kBK>(rules, s_table, query, key, qk, scale_log2);
            const float pv = exp2f(x - s_lse[query]);
            ds[e] = pv * (acc_dp[n][2 * hf + e] - s_delta[query]);
            // Uniform tiles have no span (tile_is_uniform), so only the others contribute.
            if (!uniform && want_span_grad && pv != 0.f) {
              span_acc += ds[e] * span_logit_grad(p, b, h, i0 + query, j0 + key);
            }
          }
          store_pair(sdS + query * kLdS + n * 8 + 2 * t, ds[0], ds[1]);
          if (want_bias_grad && uniform) tile_ds_sum += ds[0] + ds[1];
          if (bias_grad_by_diagonal) {
            s_ds_f32[query * kLdF + n * 8 + 2 * t] = ds[0];
            s_ds_f32[query * kLdF + n * 8 + 2 * t + 1] = ds[1];
          }
        }
      }
      if (want_bias_grad && uniform) {
        if (tile_bias_row == 0) {
          edge_sums[0] += tile_ds_sum;
        } else {
          edge_sums[1] += tile_ds_sum;
        }
      }
      __syncwarp();  // dS rows written by this warp's lanes are read by all its lanes
      warp_mma_nn<T, kTilesQ, kBK>(acc_dq, sdS + row0 * kLdS, kLdS, sK, kLd);

      if (bias_grad_by_diagonal) {  // the same for the whole block
        __syncthreads();  // the whole fp32 dS tile is written
        accumulate_rel_bias_grad<kBQ, kBK, kThreads>(p, s_ds_f32, s_diag, i0, j0, bias_rows);
      }
    }

    // dQ = scale * dS K for this query block, staged in sQ.
    cp_async_wait<0>();  // Q/dO, when no key tile came (the loop never waited)
    __syncthreads();
#pragma unroll
    for (int n = 0; n < kTilesQ; ++n) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        store_pair(sQ + (row0 + g + 8 * hf) * kLd + n * 8 + 2 * t, acc_dq[n][2 * hf] * scale,
                   acc_dq[n][2 * hf + 1] * scale);
      }
    }
    __syncthreads();
    store_tile<T, kBQ, kD, kThreads>(sQ, kLd, dq_bh, dq_stride_s, i0, i1 - i0, p.head_dim_qk,
                                     p.head_dim_qk % (16 / sizeof(T)) == 0);
  }

  if (want_bias_grad) {
    // The end rows' uniform-tile sums join the partial rows, after every diagonal update of
    // this block (the barriers order them): fixed-order block sums, added by thread 0.
    const float low = block_sum_fixed_order<kWarps>(edge_sums[0], s_warp_sums);
    const float high = block_sum_fixed_order<kWarps>(edge_sums[1], s_warp_sums);
    if (threadIdx.x == 0) {
      bias_rows[0] += low;
      bias_rows[2 * p.max_dist - 2] += high;
    }
  }
  if (want_span_grad) {
    const float total = block_sum_fixed_order<kWarps>(span_acc, s_warp_sums);
    if (threadIdx.x == 0) args.span_partial[blockIdx.x] = total;
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
