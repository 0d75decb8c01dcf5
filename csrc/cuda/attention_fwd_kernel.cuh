// Forward attention kernel (flash attention with fastattn's masks and biases).
//
// One thread block per (query block, b * Hq + h). The block keeps its query tile Q in shared
// memory and walks the key tiles that can hold a visible key (global keys, then the window /
// span range: see visible_key_ranges), in ascending order. Per key tile:
//   1. K and V arrive in shared memory by cp.async (zero-padded past Sk and the head dim),
//      software-pipelined: V of this tile loads while S = Q K^T is computed, K of the next
//      tile while O += P V is;
//   2. each warp computes S = Q K^T for its 16 kRowTiles query rows (tensor cores fed by
//      ldmatrix for half/bfloat16, CUDA-core FMAs for float32, same register layout; with two
//      row tiles, as FlashAttention-2, every K and V fragment read from shared memory feeds two
//      mma instructions);
//   3. logits = scale * S (or softcap * tanh(scale * S / softcap)) + bias in base-2 units;
//      masked pairs get -inf. A tile that attn_mask hides entirely is skipped (a block vote,
//      mask_tile_visible). Tiles where every pair
//      is visible with one common bias (none, or a rel_bias row every distance clamps to) skip
//      the per-element rule (tile_is_uniform); the others look the rule up in a per-tile
//      diagonal table (fill_tile_table / tile_logit_log2);
//   4. online softmax in fp32 (a reference max and a running sum per row; the output
//      accumulator is rescaled only when a base-2 logit exceeds the reference by more than 8,
//      which after the first tiles of a row is rare; P stays below 2^8);
//   5. P = exp2(logit - max) is rounded to the input type and, for tensor cores, kept in
//      registers as the A operand of O += P V (the accumulator layout of S is the fragment
//      layout of A); float32 stages P in the warp's rows of a shared tile.
// At the end O / rowsum is written (staged through shared memory for wide stores), with
// lse = ln(sum exp(logits)). A row that sees no key (or only -inf logits) gets O = 0 and
// lse = -inf.
//
// Split-KV (FlashDecoding): when the (query block, head) blocks alone would leave SMs idle (a
// decode step, a short prompt with few heads), num_splits > 1 blocks share each query block's
// key tiles, each taking a consecutive part (KeyTiles::part_of); a block writes its normalized
// partial O and its lse in fp32, and attention_fwd_combine_kernel merges the parts in split
// order (deterministic). Warps whose query rows all lie past Sq (a decode step fills one row
// of the tile) skip the two matrix products (their softmax runs on zeros, cheaper than a
// branch) and otherwise only help load tiles.
#pragma once

#include "attention_utils.cuh"

namespace fastattn {
namespace cuda_attn {

template <typename T>
struct FwdArgs {
  AttentionParams p;
  const T* q;
  const T* k;
  const T* v;
  T* out;                  // (B, Hq, Sq, Dv), strides in p.o_stride_*
  float* lse;              // (B, Hq, Sq) contiguous
  const float* scale_ptr;  // device pointer to the scale (learnable temperature), or null
  int64_t num_q_blocks;
  int64_t num_splits;      // blocks per (query block, head) sharing its key tiles (split-KV)
  float* out_partial;      // num_splits > 1: (num_splits, B * Hq * Sq, Dv) fp32, else null
  float* lse_partial;      // num_splits > 1: (num_splits, B * Hq * Sq) fp32, else null
  float rescale_slack;     // base 2: how far a logit may exceed its row's reference max (<= 8)
  bool q_vec, k_vec, v_vec, out_vec;  // 16-byte vector copies allowed (alignment checked)
};

// Tile sizes for element type T and padded head dim kD (Dqk and Dv are both <= kD).
template <typename T, int kD>
struct FwdConfig {
  static constexpr bool kTensorCores = !is_float32<T>();
  // Row tiles (16 queries each) per warp, queries per block and keys per tile. Chosen so that
  // the fp32 accumulators fit in registers (O: kRowTiles * kD / 2 floats per thread, S:
  // kRowTiles * kBlockK / 2) and shared memory stays under ~99 KB.
  static constexpr int kRowTiles = (kTensorCores && kD <= 128) ? 2 : 1;
  static constexpr int kWarps = (kTensorCores || kD <= 128) ? 4 : 2;
  static constexpr int kBlockQ = kWarps * 16 * kRowTiles;
  // (kD = 128 with 64 keys spilled 128 bytes per thread at 255 registers: 32 keys, as
  // FlashAttention-2's 128 x 32 configuration, fits.)
  static constexpr int kBlockK = kTensorCores ? (kD <= 96 ? 64 : 32) : (kD <= 128 ? 32 : 16);
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLd = kD + smem_pad<T>();        // row length of the Q, K, V tiles
  static constexpr int kLdP = kBlockK + smem_pad<T>();  // row length of the P tile
  // Q, K, V tiles; the P tile (float32 only); two per-tile logit tables (double-buffered).
  static constexpr size_t kSmemTiles =
      sizeof(T) * (static_cast<size_t>(kBlockQ + 2 * kBlockK) * kLd + (kTensorCores ? 0 : kBlockQ * kLdP));
  static constexpr size_t kSmemBytes =
      kSmemTiles + sizeof(float) * 2 * TileTable<kBlockQ, kBlockK>::kFloats;
  static_assert(kD % 32 == 0 && kD <= 256, "padded head dim");
  static_assert(kBlockK % 16 == 0, "key tile must be a multiple of 16");
};

template <typename T, int kD>
__global__ void __launch_bounds__(FwdConfig<T, kD>::kThreads, 1)
    attention_fwd_kernel(const FwdArgs<T> args) {
  using Cfg = FwdConfig<T, kD>;
  constexpr int kBQ = Cfg::kBlockQ, kBK = Cfg::kBlockK, kLd = Cfg::kLd, kLdP = Cfg::kLdP;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kM = Cfg::kRowTiles;
  constexpr int kTilesS = kBK / 8;  // accumulator tiles of S (8 keys each) per row tile
  constexpr int kTilesO = kD / 8;   // accumulator tiles of O (8 value dims each) per row tile
  const AttentionParams& p = args.p;

  T* sQ = reinterpret_cast<T*>(dynamic_smem());
  T* sK = sQ + kBQ * kLd;
  T* sV = sK + kBK * kLd;
  T* sP = sV + kBK * kLd;  // float32 only
  float* s_tables = reinterpret_cast<float*>(dynamic_smem() + Cfg::kSmemTiles);
  constexpr int kTableFloats = TileTable<kBQ, kBK>::kFloats;

  // blockIdx.x = (bh * num_splits + split) * num_q_blocks + q_block
  const int64_t q_block = blockIdx.x % args.num_q_blocks;
  const int64_t split = (blockIdx.x / args.num_q_blocks) % args.num_splits;
  const int64_t bh = blockIdx.x / args.num_q_blocks / args.num_splits;  // b * Hq + h
  const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
  const int64_t h_kv = h / p.group_size();  // GQA: k/v are read in place, never expanded
  const int64_t i0 = q_block * kBQ;
  const int64_t i1 = min64(i0 + kBQ, p.seqlen_q);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // accumulator rows g and g + 8, columns 2t and 2t + 1
  const int row0 = warp * 16 * kM;       // this warp's first row in the query tile
  // A warp whose rows all lie past Sq has nothing to compute (it still loads and waits).
  const bool warp_has_rows = row0 < i1 - i0;

  const T* q_bh = args.q + b * p.q_stride_b + h * p.q_stride_h;
  const T* k_bh = args.k + b * p.k_stride_b + h_kv * p.k_stride_h;
  const T* v_bh = args.v + b * p.v_stride_b + h_kv * p.v_stride_h;

  const ScoreRule rule = score_rule(p, read_scale(p, args.scale_ptr));
  const DropoutSeed drop_seed = p.dropout ? dropout_seed_of(p) : DropoutSeed{};
  float acc_o[kM][kTilesO][4];
  zero_acc(acc_o);
  // Per row tile m and accumulator row half hf (rows 16m + g and 16m + g + 8): the running max
  // of the base-2 logits and this thread's share of the running sum of exp2(logit - max).
  float row_max[kM][2], row_sum[kM][2];
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    row_max[m][0] = row_max[m][1] = -INFINITY;
    row_sum[m][0] = row_sum[m][1] = 0.f;
  }

  const KeyRanges ranges = visible_key_ranges(p, b, h, i0, i1);
  const KeyTiles tiles = key_tiles(ranges, kBK).part_of(split, args.num_splits);
  auto load_k = [&](int64_t kt) {
    const int64_t j0 = kt * kBK;
    load_tile_async<T, kBK, kD, kThreads>(sK, kLd, k_bh, p.k_stride_s, j0, min64(kBK, p.seqlen_k - j0),
                                          p.head_dim_qk, args.k_vec);
  };
  auto load_v = [&](int64_t kt) {
    const int64_t j0 = kt * kBK;
    load_tile_async<T, kBK, kD, kThreads>(sV, kLd, v_bh, p.v_stride_s, j0, min64(kBK, p.seqlen_k - j0),
                                          p.head_dim_v, args.v_vec);
  };

  // Prologue: Q and the first K tile in one group.
  load_tile_async<T, kBQ, kD, kThreads>(sQ, kLd, q_bh, p.q_stride_s, i0, i1 - i0, p.head_dim_qk,
                                        args.q_vec);
  if (tiles.first() < tiles.end) load_k(tiles.first());
  cp_async_commit();

  int parity = 0;
  for (int64_t kt = tiles.first(); kt < tiles.end; kt = tiles.next(kt), parity ^= 1) {
    const int64_t j0 = kt * kBK;
    if (p.has_mask() && !mask_tile_visible<kBQ, kBK, kThreads>(p, b, h, i0, j0)) {
      // attn_mask hides the whole tile: it adds nothing. Its K (in flight) must land before the
      // next tile's K is issued into the same buffer; the vote's barrier has already seen
      // every warp through the previous tile's P V.
      cp_async_wait<0>();
      __syncthreads();
      const int64_t next = tiles.next(kt);
      if (next < tiles.end) load_k(next);
      cp_async_commit();
      continue;
    }
    // This tile's logit table, in the half no warp reads any more (every warp has passed the
    // barrier below for the previous tile, so none is still on the tile before it).
    float tile_bias;  // the common bias of a uniform tile (base 2)
    int64_t tile_bias_row;
    const bool uniform =
        tile_is_uniform(p, b, h, i0, i0 + kBQ, j0, j0 + kBK, &tile_bias, &tile_bias_row);
    const TileRules rules = tile_rules<kBQ, kBK>(p, b, i0, j0);
    float* table = s_tables + parity * kTableFloats;
    if (!uniform) fill_tile_table<kBQ, kBK, kThreads>(p, b, h, i0, j0, rules.has_global(), table);

    cp_async_wait<0>();
    __syncthreads();  // K (and Q) landed; every warp is done with the previous V and P
    load_v(kt);
    cp_async_commit();

    float acc_s[kM][kTilesS][4];
    // S = Q K^T for this warp's rows (zero for a warp without rows: its softmax runs on
    // zeros, cheaper than branching around it, and its rows are never written).
    zero_acc(acc_s);
    if (warp_has_rows) {
      warp_tile_mma<T, kM, kTilesS, kD, false, BLayout::kNK>(acc_s, sQ + row0 * kLd, kLd, sK, kLd);
    }
    // Logits in base-2 units (soft-capped first when asked: ScoreRule); -inf where masked.
#pragma unroll
    for (int m = 0; m < kM; ++m) {
#pragma unroll
      for (int n = 0; n < kTilesS; ++n) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float score = rule.score(acc_s[m][n][r]);
          acc_s[m][n][r] = uniform ? fmaf(score, rule.logit_log2, tile_bias)
                                   : tile_logit_log2<kBQ, kBK>(rules, table, row0 + m * 16 + g + 8 * (r / 2),
                                                               n * 8 + 2 * t + (r % 2), score,
                                                               rule.logit_log2);
          if (p.has_mask()) {  // attn_mask, read where the pair lies inside the sequences
            const int64_t i = i0 + row0 + m * 16 + g + 8 * (r / 2), j = j0 + n * 8 + 2 * t + (r % 2);
            if (i < p.seqlen_q && j < p.seqlen_k) acc_s[m][n][r] = mask_logit_log2(p, b, h, i, j, acc_s[m][n][r]);
          }
        }
      }
    }

    // Online softmax, rescaling lazily (as FlashAttention-4): exp2 subtracts a reference max
    // per row, which only moves (rescaling O and the row sum) when a logit of this tile
    // exceeds it by more than rescale_slack (8), so P stays <= 2^8 (fine for fp16 P and
    // fp32 sums) and most tiles of a long row skip the kTilesO * 4 multiplies per row tile.
    // The result is the same up to rounding: O and the sum are relative to the same reference,
    // and lse = reference + log2(sum). One vote per warp keeps the branch uniform; a NaN max
    // forces the rescale (the comparison is false), so NaN still propagates.
    float tile_row_max[kM][2];
    bool needs_rescale = false;
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      float thread_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kTilesS; ++n) {
#pragma unroll
        for (int r = 0; r < 4; ++r) thread_max[r / 2] = max_nan(thread_max[r / 2], acc_s[m][n][r]);
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        tile_row_max[m][hf] = quad_max(thread_max[hf]);
        needs_rescale |= !(tile_row_max[m][hf] <= row_max[m][hf] + args.rescale_slack);
      }
    }
    const bool rescale = __any_sync(0xffffffffu, needs_rescale) != 0;
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      float base[2];  // what exp2 subtracts: the reference max, or 0 while the row has seen only -inf
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        if (rescale) {
          const float new_max = max_nan(row_max[m][hf], tile_row_max[m][hf]);
          base[hf] = new_max == -INFINITY ? 0.f : new_max;
          const float alpha = exp2f(row_max[m][hf] - base[hf]);  // 0 when the old max was -inf
          row_max[m][hf] = new_max;
          row_sum[m][hf] *= alpha;
#pragma unroll
          for (int n = 0; n < kTilesO; ++n) {
            acc_o[m][n][2 * hf] *= alpha;
            acc_o[m][n][2 * hf + 1] *= alpha;
          }
        } else {
          base[hf] = row_max[m][hf] == -INFINITY ? 0.f : row_max[m][hf];
        }
      }
      // P = exp2(logit - base), summed into the row sums (in fp32, before rounding).
#pragma unroll
      for (int n = 0; n < kTilesS; ++n) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          acc_s[m][n][r] = exp2f(acc_s[m][n][r] - base[r / 2]);
          row_sum[m][r / 2] += acc_s[m][n][r];
        }
      }
      // Dropout (common/dropout.h) acts on the weights that reach V, after the row sums took
      // them undropped: keys 2t and 2t + 1 share one Philox call (their 8-key group, by position).
      if (p.dropout) {
#pragma unroll
        for (int n = 0; n < kTilesS; ++n) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            float z0, z1;
            dropout_pair_factors(p, drop_seed, b, h, i0 + row0 + m * 16 + g + 8 * hf, j0 + n * 8 + 2 * t, &z0, &z1);
            acc_s[m][n][2 * hf] *= z0;
            acc_s[m][n][2 * hf + 1] *= z1;
          }
        }
      }
    }
    if constexpr (!Cfg::kTensorCores) {
      // float32: P goes through this warp's own rows of sP.
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        T* sP_tile = sP + (row0 + m * 16) * kLdP;
#pragma unroll
        for (int n = 0; n < kTilesS; ++n) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            store_pair(sP_tile + (g + 8 * hf) * kLdP + n * 8 + 2 * t, acc_s[m][n][2 * hf], acc_s[m][n][2 * hf + 1]);
          }
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V landed; every warp is done with K
    int64_t next = tiles.next(kt);
    if (next < tiles.end) load_k(next);
    cp_async_commit();

    if (warp_has_rows) {  // O += P V
      if constexpr (Cfg::kTensorCores) {
        uint32_t p_frag[kM][kBK / 16][4];
#pragma unroll
        for (int m = 0; m < kM; ++m) accumulator_to_a_fragments<T, kTilesS>(p_frag[m], acc_s[m]);
        warp_mma_nn_areg<T, kM, kTilesO, kBK>(acc_o, p_frag, sV, kLd);
      } else {
        warp_tile_mma<T, kM, kTilesO, kBK, false, BLayout::kKN>(acc_o, sP + row0 * kLdP, kLdP, sV, kLd);
      }
    }
  }
  cp_async_wait<0>();  // nothing may still be in flight into shared memory at exit

  // Normalize, write lse and stage O in sQ (free now) for wide, coalesced stores; or, as one
  // part of a split-KV row, write this part's O and lse as fp32 partials (rows of
  // out_partial / lse_partial: split * B * Hq * Sq + bh * Sq + i).
  __syncthreads();  // no warp reads sQ any more
  const bool split_kv = args.num_splits > 1;
  const int64_t row_base = (split_kv ? split * p.batch * p.heads_q + bh : bh) * p.seqlen_q + i0;
  float* lse_rows = (split_kv ? args.lse_partial : args.lse) + row_base;
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float total = quad_sum(row_sum[m][hf]);
      const bool empty = row_max[m][hf] == -INFINITY;  // no visible key, or only -inf logits
      const float inv = empty ? 0.f : 1.f / total;
      const int row = row0 + m * 16 + g + 8 * hf;
      const bool valid_row = i0 + row < p.seqlen_q;
      if (split_kv) {
        float* o_row = args.out_partial + (row_base + row) * p.head_dim_v;
#pragma unroll
        for (int n = 0; n < kTilesO; ++n) {
          const int col = n * 8 + 2 * t;
          if (valid_row && col < p.head_dim_v) o_row[col] = acc_o[m][n][2 * hf] * inv;
          if (valid_row && col + 1 < p.head_dim_v) o_row[col + 1] = acc_o[m][n][2 * hf + 1] * inv;
        }
      } else {
#pragma unroll
        for (int n = 0; n < kTilesO; ++n) {
          store_pair(sQ + row * kLd + n * 8 + 2 * t, acc_o[m][n][2 * hf] * inv,
                     acc_o[m][n][2 * hf + 1] * inv);
        }
      }
      if (t == 0 && valid_row) {
        lse_rows[row] = empty ? -INFINITY : (row_max[m][hf] + log2f(total)) * kLn2;
      }
    }
  }
  if (split_kv) return;  // (the same for the whole block)
  __syncthreads();
  T* o_bh = args.out + b * p.o_stride_b + h * p.o_stride_h;
  store_tile<T, kBQ, kD, kThreads>(sQ, kLd, o_bh, p.o_stride_s, i0, i1 - i0, p.head_dim_v,
                                   args.out_vec);
}

// ---------------------------------------------------------------------------------------------
// Split-KV: merge the parts of each row, in split order
// ---------------------------------------------------------------------------------------------
template <typename T>
struct FwdCombineArgs {
  const float* out_partial;  // (num_splits, rows, Dv) fp32, each part normalized by its own sum
  const float* lse_partial;  // (num_splits, rows) fp32, ln of each part's sum; -inf when empty
  T* out;                    // (B, Hq, Sq, Dv), strides below
  float* lse;                // (B, Hq, Sq) contiguous
  int64_t rows;              // B * Hq * Sq
  int64_t num_splits, heads, seqlen, head_dim;
  int64_t o_stride_b, o_stride_h, o_stride_s;
};

// With the parts' lse l_s and outputs O_s: lse = m + ln(sum_s exp(l_s - m)), m = max_s l_s, and
// O = sum_s exp(l_s - lse) O_s, both summed in ascending s. A row no part saw (every l_s = -inf)
// gets O = 0 and lse = -inf, as the single-block kernel gives it.
template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32) attention_fwd_combine_kernel(const FwdCombineArgs<T> a) {
  const WarpRow r = warp_row(a.rows, a.heads, a.seqlen);
  const int lane = threadIdx.x % 32;
  if (!r.valid) return;  // (no barrier in this kernel)
  const float* lse_parts = a.lse_partial + r.row;  // part s at lse_parts[s * rows]
  float max_lse = -INFINITY;
  for (int64_t s = 0; s < a.num_splits; ++s) max_lse = fmaxf(max_lse, lse_parts[s * a.rows]);
  const bool empty = max_lse == -INFINITY;
  float total = 0.f;
  if (!empty) {
    for (int64_t s = 0; s < a.num_splits; ++s) total += expf(lse_parts[s * a.rows] - max_lse);
  }
  const float lse = empty ? -INFINITY : max_lse + logf(total);
  T* out_row = a.out + r.b * a.o_stride_b + r.h * a.o_stride_h + r.i * a.o_stride_s;
  for (int64_t d = lane; d < a.head_dim; d += 32) {
    float o = 0.f;
    if (!empty) {
      for (int64_t s = 0; s < a.num_splits; ++s) {
        const float w = expf(lse_parts[s * a.rows] - lse);  // 0 for an empty part
        o += w * a.out_partial[(s * a.rows + r.row) * a.head_dim + d];
      }
    }
    out_row[d] = from_float<T>(o);
  }
  if (lane == 0) a.lse[r.row] = lse;
}

}  // namespace cuda_attn
}  // namespace fastattn
