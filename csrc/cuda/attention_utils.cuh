// Building blocks shared by the CUDA attention kernels (attention_fwd_kernel.cuh,
// attention_bwd_kernel.cuh): element conversions, warp-level matrix products with a known
// register layout, shared-memory tile copies and the tile-level mask shortcuts.
//
// Register layout. Every matrix product in these kernels is done by one warp on a 16-row
// slab, and its fp32 result lives in registers in the layout of the tensor-core instruction
// mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"): with lane = 4 * g + t,
// accumulator acc[n][r] of a 16 x (8 * N) result holds
//     row  g + 8 * (r / 2),   column  8 * n + 2 * t + (r % 2).
// Because that mapping is explicit, the softmax, mask and bias code can address each element
// by its (query, key) position. The float32 kernels use the *same* layout with plain FMAs on
// CUDA cores (warp_mma_* below), so one kernel body serves float, half and bfloat16.
//
// Everything that decides which pairs are visible and what is added to their logit comes from
// common/attention_params.h (pair_bias, span_logit_grad, local_key_range, ...). The tile-level
// helpers here only decide which tiles can be skipped or need no per-element work; they are
// conservative (a skipped tile has no visible pair; a "uniform" tile has only visible pairs
// with one common bias), so the per-element rule stays the single source of truth.
//
// Emulation hook: when FASTATTN_CUDA_EMULATION is defined, these headers are compiled by a host
// C++ compiler together with a small CPU emulator of CUDA thread blocks (used to run the kernels
// on machines without a GPU during development). The hook replaces only the mma instruction and
// the dynamic shared memory symbol; production builds never define it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/attention_params.h"
#include "common/dropout.h"

#if defined(FASTATTN_CUDA_EMULATION)
#include "fastattn_cuda_emulation.h"
#endif

#define FA_DEVICE __device__ __forceinline__

namespace fastattn {
namespace cuda_attn {

constexpr float kLog2e = 1.4426950408889634f;  // log2(e): softmax runs in base 2 (exp2f)
constexpr float kLn2 = 0.6931471805599453f;    // ln(2): converts a base-2 log back to natural

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------
FA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FA_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FA_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T>
constexpr bool is_float32() {
  return std::is_same<T, float>::value;
}

// The dynamic shared memory of the running block (16-byte aligned).
#if !defined(FASTATTN_CUDA_EMULATION)
FA_DEVICE unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char fastattn_dynamic_smem[];
  return fastattn_dynamic_smem;
}
#else
FA_DEVICE unsigned char* dynamic_smem() { return fastattn_emulation::dynamic_smem(); }
#endif

// max() that propagates NaN (fmaxf drops it), so a NaN logit makes its row NaN, as in the
// reference, instead of being silently ignored.
FA_DEVICE float max_nan(float a, float b) { return (isnan(a) || isnan(b)) ? a + b : fmaxf(a, b); }

// Sum / max over the 4 lanes (t = 0..3) that share a row of an mma accumulator. The butterfly
// order is fixed, so the result is deterministic and identical in the 4 lanes.
FA_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}
FA_DEVICE float quad_max(float x) {
  x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}
FA_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Row kernels (the backward's delta, the split-KV combine) give one warp to each row
// b * (H * S) + h * S + i of a (B, H, S) grid, kWarps rows a block: the warp's row and its
// coordinates (launch ceil(rows / kRowWarps) blocks of kRowWarps * 32 threads). `valid` is
// false for the idle warps of the last block.
struct WarpRow {
  int64_t row, b, h, i;
  bool valid;
};

constexpr int kRowWarps = 8;  // rows (warps) per block of a row kernel

FA_DEVICE WarpRow warp_row(int64_t rows, int64_t heads, int64_t seqlen) {
  WarpRow r;
  r.row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  r.valid = r.row < rows;
  r.b = r.row / (heads * seqlen);
  r.h = (r.row / seqlen) % heads;
  r.i = r.row % seqlen;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Element conversions. T is float, __half or __nv_bfloat16.
// ---------------------------------------------------------------------------------------------
template <typename T>
FA_DEVICE float to_float(T x);
template <>
FA_DEVICE float to_float<float>(float x) {
  return x;
}
template <>
FA_DEVICE float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
FA_DEVICE float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
FA_DEVICE T from_float(float x);
template <>
FA_DEVICE float from_float<float>(float x) {
  return x;
}
template <>
FA_DEVICE __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
FA_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The 16 raw bits of a half / bfloat16 element.
template <typename T>
FA_DEVICE uint32_t bits16(T x);
template <>
FA_DEVICE uint32_t bits16<__half>(__half x) {
  return __half_as_ushort(x);
}
template <>
FA_DEVICE uint32_t bits16<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat16_as_ushort(x);
}

// Writes two adjacent elements dst[0] = a, dst[1] = b (dst is 4-byte aligned for 16-bit T,
// 8-byte aligned for float).
template <typename T>
FA_DEVICE void store_pair(T* dst, float a, float b) {
  if constexpr (is_float32<T>()) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  } else {
    const uint32_t packed = bits16<T>(from_float<T>(a)) | (bits16<T>(from_float<T>(b)) << 16);
    *reinterpret_cast<uint32_t*>(dst) = packed;
  }
}

// Two adjacent 16-bit elements as one 32-bit register (the first in the low half, which is the
// order mma fragments use).
template <typename T>
FA_DEVICE uint32_t load_pair_bits(const T* src) {
  return *reinterpret_cast<const uint32_t*>(src);
}
// Two 16-bit elements from different addresses packed the same way.
template <typename T>
FA_DEVICE uint32_t pack_bits(const T* lo, const T* hi) {
  const unsigned short* l = reinterpret_cast<const unsigned short*>(lo);
  const unsigned short* h = reinterpret_cast<const unsigned short*>(hi);
  return static_cast<uint32_t>(*l) | (static_cast<uint32_t>(*h) << 16);
}

// Two floats rounded to T and packed as one 32-bit register (first in the low half).
template <typename T>
FA_DEVICE uint32_t pack_float2(float a, float b) {
  return bits16<T>(from_float<T>(a)) | (bits16<T>(from_float<T>(b)) << 16);
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: four 8x8 matrices of 16-bit elements, the
// rows of matrix m addressed by lanes 8m..8m+7 (`row_addr`, 16-byte aligned). Lane 4g+t gets
// in r[m] the elements (g, 2t), (g, 2t+1) of matrix m, or with .trans (2t, g), (2t+1, g):
// exactly the register layout of mma.m16n8k16's A and B fragments (see warp_mma_*).
template <bool kTrans = false>
FA_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
#if defined(FASTATTN_CUDA_EMULATION)
  fastattn_emulation::ldmatrix_x4(r, row_addr, kTrans);
#elif defined(__CUDA_ARCH__)
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_addr));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  }
#endif
}

// cp.async: a 16-byte global -> shared copy that completes asynchronously (cached in L2 only),
// or 16 zero bytes when !valid (src-size 0: nothing is read). Completion: cp_async_commit()
// closes a group, cp_async_wait<N>() waits until at most N groups are pending; a barrier then
// makes the data visible to the other threads. (The emulator models the groups, with NaN
// bytes in a destination until its copy completes.)
FA_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
#if defined(FASTATTN_CUDA_EMULATION)
  fastattn_emulation::cp_async_16(smem_dst, gmem_src, valid);
#elif defined(__CUDA_ARCH__)
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes));
#endif
}
FA_DEVICE void cp_async_commit() {
#if defined(FASTATTN_CUDA_EMULATION)
  fastattn_emulation::cp_async_commit();
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int kPending>
FA_DEVICE void cp_async_wait() {
#if defined(FASTATTN_CUDA_EMULATION)
  fastattn_emulation::cp_async_wait(kPending);
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// ---------------------------------------------------------------------------------------------
// Warp-level matrix products (fp32 accumulators in the mma.m16n8k16 layout, see the top).
// ---------------------------------------------------------------------------------------------

// d = a * b + d for one 16x8x16 tile: a 16x16 (row-major fragment), b 16x8 (column fragment).
template <typename T>
FA_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(FASTATTN_CUDA_EMULATION)
  fastattn_emulation::mma_m16n8k16(d, a, b, std::is_same<T, __nv_bfloat16>::value);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same<T, __nv_bfloat16>::value, "mma_m16n8k16: half or bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDA_ARCH__)
  // The half/bfloat16 kernels need sm_80+ (the host refuses older GPUs before launching).
  __trap();
#endif
}

// The A fragment of a row-major 16 x K slab at column k0, by ldmatrix: matrices (rows 0-7,
// cols k0..), (rows 8-15, k0..), (rows 0-7, k0+8..), (rows 8-15, k0+8..) are a[0..3].
template <typename T>
FA_DEVICE void load_a_fragment_ldmatrix(uint32_t (&af)[4], const T* a, int lda, int k0, int lane) {
  ldmatrix_x4(af, a + ((lane & 7) + ((lane >> 3) & 1) * 8) * lda + k0 + (lane >> 4) * 8);
}

// How a B operand (K x N) is stored in shared memory.
enum class BLayout {
  kNK,  // as its transpose, N x K row-major: B(k, n) = b[n * ldb + k] (K in S = Q K^T)
  kKN,  // row-major K x N: B(k, n) = b[k * ldb + n] (V in O = P V)
};

// One warp's tile product acc += A * B, with acc a (16 kM) x (8 kN) fp32 result held as kM x kN
// mma accumulator tiles (acc[m][n] is the 16 x 8 tile of rows 16m.., columns 8n..). Operands
// in shared memory:
//   A (16 kM x kK): row-major, A(r, k) = a[r * lda + k]; or with kATrans stored transposed,
//                   A(r, k) = a[k * lda + r] (dS in dQ = dS K, kept as dS^T);
//   B (kK x 8 kN):  see BLayout.
// Each A fragment is loaded once per 16-wide k step and used for all kN column tiles, each B
// fragment once and used for all kM row tiles: a 32 x 32 warp tile reads half the shared
// memory per mma of a 16 x 64 one. float32 runs the same layout on CUDA-core FMAs.
template <typename T, int kM, int kN, int kK, bool kATrans, BLayout kB>
FA_DEVICE void warp_tile_mma(float (&acc)[kM][kN][4], const T* a, int lda, const T* b, int ldb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if constexpr (is_float32<T>()) {
#pragma unroll 2
    for (int k = 0; k < kK; ++k) {
      float a_lo[kM], a_hi[kM];
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        const int r = m * 16 + g;
        a_lo[m] = kATrans ? a[k * lda + r] : a[r * lda + k];
        a_hi[m] = kATrans ? a[k * lda + r + 8] : a[(r + 8) * lda + k];
      }
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        const int c = n * 8 + 2 * t;
        float b0, b1;
        if constexpr (kB == BLayout::kNK) {
          b0 = b[c * ldb + k];
          b1 = b[(c + 1) * ldb + k];
        } else {
          const float2 bb = *reinterpret_cast<const float2*>(b + k * ldb + c);
          b0 = bb.x;
          b1 = bb.y;
        }
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          acc[m][n][0] = fmaf(a_lo[m], b0, acc[m][n][0]);
          acc[m][n][1] = fmaf(a_lo[m], b1, acc[m][n][1]);
          acc[m][n][2] = fmaf(a_hi[m], b0, acc[m][n][2]);
          acc[m][n][3] = fmaf(a_hi[m], b1, acc[m][n][3]);
        }
      }
    }
  } else {
    static_assert(kK % 16 == 0, "warp_tile_mma: K must be a multiple of 16");
#pragma unroll
    for (int k0 = 0; k0 < kK; k0 += 16) {
      uint32_t af[kM][4];
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        if constexpr (kATrans) {
          // The four 8x8 matrices of A's fragment are 8x8 blocks of the stored A^T, read
          // transposed: (k0.., r0..), (k0.., r0+8..), (k0+8.., r0..), (k0+8.., r0+8..).
          ldmatrix_x4</*kTrans=*/true>(af[m], a + (k0 + (lane & 7) + ((lane >> 4) & 1) * 8) * lda + m * 16 + ((lane >> 3) & 1) * 8);
        } else {
          load_a_fragment_ldmatrix(af[m], a + m * 16 * lda, lda, k0, lane);
        }
      }
#pragma unroll
      for (int n = 0; n < kN; n += 2) {
        if (n + 1 < kN) {
          // Four 8x8 matrices: the b0, b1 fragments of column tiles n and n + 1.
          uint32_t bf4[4];
          if constexpr (kB == BLayout::kNK) {
            ldmatrix_x4(bf4, b + (n * 8 + (lane & 7) + (lane >> 4) * 8) * ldb + k0 + ((lane >> 3) & 1) * 8);
          } else {
            ldmatrix_x4</*kTrans=*/true>(bf4, b + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ldb + n * 8 + (lane >> 4) * 8);
          }
          const uint32_t b_lo[2] = {bf4[0], bf4[1]}, b_hi[2] = {bf4[2], bf4[3]};
#pragma unroll
          for (int m = 0; m < kM; ++m) {
            mma_m16n8k16<T>(acc[m][n], af[m], b_lo);
            mma_m16n8k16<T>(acc[m][n + 1], af[m], b_hi);
          }
        } else {
          // An odd last tile. B fragment: rows (k) 2t, 2t+1 and 2t+8, 2t+9 of column n*8+g.
          uint32_t bf[2];
          if constexpr (kB == BLayout::kNK) {
            const T* brow = b + (n * 8 + g) * ldb + k0 + 2 * t;  // the k-pairs are contiguous
            bf[0] = load_pair_bits(brow);
            bf[1] = load_pair_bits(brow + 8);
          } else {
            const T* bcol = b + (k0 + 2 * t) * ldb + n * 8 + g;
            bf[0] = pack_bits(bcol, bcol + ldb);
            bf[1] = pack_bits(bcol + 8 * ldb, bcol + 9 * ldb);
          }
#pragma unroll
          for (int m = 0; m < kM; ++m) mma_m16n8k16<T>(acc[m][n], af[m], bf);
        }
      }
    }
  }
}

// acc ((16 kM) x 8N) += A * B with A given as mma A fragments in registers (a[m][k0 / 16] for
// row tile m, e.g. P converted from an accumulator by accumulator_to_a_fragments) and B a
// K x 8N row-major slab in shared memory; each B fragment is read once for all kM row tiles.
// Tensor-core types only.
template <typename T, int kM, int kNTiles, int kK>
FA_DEVICE void warp_mma_nn_areg(float (&acc)[kM][kNTiles][4], const uint32_t (&a)[kM][kK / 16][4],
                                const T* b, int ldb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    const int k0 = kk * 16;
#pragma unroll
    for (int n = 0; n < kNTiles; n += 2) {
      if (n + 1 < kNTiles) {
        uint32_t bf4[4];
        ldmatrix_x4</*kTrans=*/true>(bf4, b + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ldb + n * 8 + (lane >> 4) * 8);
        const uint32_t b_lo[2] = {bf4[0], bf4[1]}, b_hi[2] = {bf4[2], bf4[3]};
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          mma_m16n8k16<T>(acc[m][n], a[m][kk], b_lo);
          mma_m16n8k16<T>(acc[m][n + 1], a[m][kk], b_hi);
        }
      } else {
        const T* bcol = b + (k0 + 2 * t) * ldb + n * 8 + g;
        const uint32_t bf[2] = {pack_bits(bcol, bcol + ldb), pack_bits(bcol + 8 * ldb, bcol + 9 * ldb)};
#pragma unroll
        for (int m = 0; m < kM; ++m) mma_m16n8k16<T>(acc[m][n], a[m][kk], bf);
      }
    }
  }
}

// The accumulator of a 16 x kK product (fp32, mma C layout) as A fragments of T for the next
// product along kK: tiles 2kk and 2kk + 1 (keys 16kk..16kk+15) form fragment kk.
template <typename T, int kNTiles>
FA_DEVICE void accumulator_to_a_fragments(uint32_t (&a)[kNTiles / 2][4], const float (&acc)[kNTiles][4]) {
#pragma unroll
  for (int kk = 0; kk < kNTiles / 2; ++kk) {
    a[kk][0] = pack_float2<T>(acc[2 * kk][0], acc[2 * kk][1]);
    a[kk][1] = pack_float2<T>(acc[2 * kk][2], acc[2 * kk][3]);
    a[kk][2] = pack_float2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[kk][3] = pack_float2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
  }
}

template <int kNTiles>
FA_DEVICE void zero_acc(float (&acc)[kNTiles][4]) {
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[n][r] = 0.f;
  }
}

template <int kM, int kN>
FA_DEVICE void zero_acc(float (&acc)[kM][kN][4]) {
#pragma unroll
  for (int m = 0; m < kM; ++m) zero_acc(acc[m]);
}

// ---------------------------------------------------------------------------------------------
// Ordered accumulation across thread blocks (the backward's dQ, see attention_bwd_kernel.cuh)
// ---------------------------------------------------------------------------------------------
// Blocks that add into one buffer take turns in a fixed order: a block whose turn is number
// `turn` (0, 1, ...) calls wait_for_turn(counter, turn) in every thread, adds (atomics, which
// the turns serialize, so the float sums always run in the same order), then every thread
// calls __threadfence(), the block synchronizes and one thread calls pass_turn(counter). A
// block only ever waits for blocks with a lower index (the caller's ordering guarantees it),
// and the index is a ticket taken when the block starts (take_ticket), so those blocks have
// started and the wait always ends. The emulator runs blocks one after
// the other in index order, so there the turn must already have come: it checks that instead,
// which tests the callers' turn numbering.
FA_DEVICE void wait_for_turn(const int* counter, int turn) {
#if defined(FASTATTN_CUDA_EMULATION)
  fastattn_emulation::check_turn(*counter, turn);
#elif defined(__CUDA_ARCH__)
  // A legitimate wait lasts a few query blocks' work of the blocks before. If the turn has not
  // come after 2^28 sleeps (over 10 s), the turn numbering is wrong: fail the launch loudly
  // rather than hang the process.
  for (unsigned int sleeps = 0; *reinterpret_cast<const volatile int*>(counter) < turn; ++sleeps) {
    if (sleeps == (1u << 28)) __trap();
    __nanosleep(40);
  }
  __threadfence();  // what the previous blocks added is seen after their counter increment
#endif
}
// The next number of a counter, for the block's one calling thread: with it as the block's
// work index, blocks that start earlier get lower indices (see the backward kernel).
FA_DEVICE int take_ticket(int* counter) {
#if defined(FASTATTN_CUDA_EMULATION)
  return (*counter)++;
#elif defined(__CUDA_ARCH__)
  return atomicAdd(counter, 1);
#else
  return 0;
#endif
}
FA_DEVICE void pass_turn(int* counter) {
#if defined(FASTATTN_CUDA_EMULATION)
  ++*counter;
#elif defined(__CUDA_ARCH__)
  atomicAdd(counter, 1);
#endif
}
// dst += value, from one thread, atomically (plain in the emulator, which runs one fiber at a time).
FA_DEVICE void atomic_add_f32(float* dst, float value) {
#if defined(FASTATTN_CUDA_EMULATION)
  *dst += value;
#elif defined(__CUDA_ARCH__)
  atomicAdd(dst, value);
#endif
}
FA_DEVICE void thread_fence() {
#if !defined(FASTATTN_CUDA_EMULATION) && defined(__CUDA_ARCH__)
  __threadfence();
#endif
}

// ---------------------------------------------------------------------------------------------
// Shared-memory tiles
// ---------------------------------------------------------------------------------------------

// Row padding of shared-memory tiles: 16 bytes, which keeps rows 16-byte aligned (vector
// copies) and makes the 32-bit fragment loads of 8 consecutive rows hit distinct banks.
template <typename T>
constexpr int smem_pad() {
  return 16 / static_cast<int>(sizeof(T));
}

// Copies rows [row0, row0 + kRows) x columns [0, kCols) of a global matrix with row stride
// `row_stride` (elements, last dim contiguous) into shared memory (leading dimension ld).
// Rows >= valid_rows and columns >= valid_cols are written as zeros: padded head dims and
// rows past the sequence end then contribute nothing to the products. `vectorized` says that
// the base and every row start are 16-byte aligned (checked on the host).
//
// kAsync: whole 16-byte chunks (data or zero padding) go by cp.async, complete after
// cp_async_commit / cp_async_wait<> and a barrier; chunks that straddle valid_cols, and all of
// a tensor whose rows are not 16-byte aligned, by ordinary stores (visible after that barrier).
template <typename T, int kRows, int kCols, int kThreads, bool kAsync = false>
FA_DEVICE void load_tile(T* smem, int ld, const T* gmem, int64_t row_stride, int64_t row0,
                         int64_t valid_rows, int64_t valid_cols, bool vectorized) {
  constexpr int kChunk = 16 / static_cast<int>(sizeof(T));
  static_assert(kCols % kChunk == 0, "load_tile: columns must be a multiple of 16 bytes");
  constexpr int kChunksPerRow = kCols / kChunk;
  for (int idx = threadIdx.x; idx < kRows * kChunksPerRow; idx += kThreads) {
    const int r = idx / kChunksPerRow;
    const int c = (idx % kChunksPerRow) * kChunk;
    T* dst = smem + r * ld + c;
    const bool row_ok = r < valid_rows;
    const bool full = row_ok && c + kChunk <= valid_cols;  // a whole chunk of data
    if (vectorized && (full || !row_ok || c >= valid_cols)) {  // data or zeros, 16 bytes
      const T* src = full ? gmem + (row0 + r) * row_stride + c : gmem;
      if constexpr (kAsync) {
        cp_async_16(dst, src, full);
      } else {
        *reinterpret_cast<uint4*>(dst) = full ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
      }
    } else {
      const T* src = gmem + (row0 + r) * row_stride;
#pragma unroll
      for (int e = 0; e < kChunk; ++e) dst[e] = row_ok && c + e < valid_cols ? src[c + e] : from_float<T>(0.f);
    }
  }
}

template <typename T, int kRows, int kCols, int kThreads>
FA_DEVICE void load_tile_async(T* smem, int ld, const T* gmem, int64_t row_stride, int64_t row0,
                               int64_t valid_rows, int64_t valid_cols, bool vectorized) {
  load_tile<T, kRows, kCols, kThreads, true>(smem, ld, gmem, row_stride, row0, valid_rows, valid_cols,
                                             vectorized);
}

// The reverse copy: rows [0, valid_rows) x columns [0, valid_cols) of a shared-memory tile
// into global rows [row0, row0 + valid_rows).
template <typename T, int kRows, int kCols, int kThreads>
FA_DEVICE void store_tile(const T* smem, int ld, T* gmem, int64_t row_stride, int64_t row0,
                          int64_t valid_rows, int64_t valid_cols, bool vectorized) {
  constexpr int kChunk = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunksPerRow = kCols / kChunk;
  for (int idx = threadIdx.x; idx < kRows * kChunksPerRow; idx += kThreads) {
    const int r = idx / kChunksPerRow;
    const int c = (idx % kChunksPerRow) * kChunk;
    if (r >= valid_rows || c >= valid_cols) continue;
    const T* src = smem + r * ld + c;
    T* dst = gmem + (row0 + r) * row_stride + c;
    if (c + kChunk <= valid_cols && vectorized) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; c + e < valid_cols && e < kChunk; ++e) dst[e] = src[e];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Masks at tile granularity (built on common/attention_params.h)
// ---------------------------------------------------------------------------------------------

// Keys a query block [i0, i1) of head (b, h) can see lie in [0, global_end) (global keys, or
// every key when the block holds a global query) union [local_begin, local_end) (window/span).
struct KeyRanges {
  int64_t global_end;
  int64_t local_begin, local_end;
};

FA_DEVICE KeyRanges visible_key_ranges(const AttentionParams& p, int64_t b, int64_t h, int64_t i0,
                                       int64_t i1) {
  // No key past key_len, and with causal none past the last query's position.
  int64_t cap = p.key_len(b);
  if (p.causal) cap = min64(cap, max64(int64_t(0), p.query_pos(b, i1 - 1) + 1));
  KeyRanges r;
  if (query_block_has_global_query(p, b, i0)) {
    // A global query sees every key (causal still applies): one range covers the block.
    r.global_end = cap;
    r.local_begin = r.local_end = 0;
    return r;
  }
  r.global_end = p.num_global > 0 ? max64(int64_t(0), min64(p.global_limit(b), cap)) : 0;
  local_key_range(p, b, h, i0, i1, &r.local_begin, &r.local_end);
  return r;
}

// Whether the key tile [j0, j1) intersects the ranges (may hold a visible key).
FA_DEVICE bool key_tile_in_ranges(const KeyRanges& r, int64_t j0, int64_t j1) {
  return j0 < r.global_end || (r.local_begin < r.local_end && j0 < r.local_end && j1 > r.local_begin);
}

// The key tiles (of width kBc) that intersect KeyRanges, visited in ascending order:
//   for (int64_t kt = tiles.first(); kt < tiles.end; kt = tiles.next(kt)) ...
// i.e. tiles [begin, end) minus the gap [gap_begin, gap_end) between global and local keys.
struct KeyTiles {
  int64_t begin, gap_begin, gap_end, end;
  FA_DEVICE int64_t first() const { return begin; }
  FA_DEVICE int64_t next(int64_t kt) const { return kt + 1 == gap_begin ? gap_end : kt + 1; }
  // How many tiles are visited, and the n-th of them (n < count()), for tiles [0, end).
  FA_DEVICE int64_t count() const { return end - (gap_end - gap_begin); }
  FA_DEVICE int64_t nth(int64_t n) const { return n < gap_begin ? n : gap_end + (n - gap_begin); }
  // Part `part` of `parts` consecutive, near-equal parts of the visited tiles (split-KV: each
  // part is one block's share); an empty part has first() == end. For tiles [0, end) only.
  FA_DEVICE KeyTiles part_of(int64_t part, int64_t parts) const {
    const int64_t n = count(), lo = n * part / parts, hi = n * (part + 1) / parts;
    KeyTiles t = *this;
    if (lo >= hi) {
      t.begin = t.end = 0;
      return t;
    }
    t.begin = nth(lo);
    t.end = nth(hi - 1) + 1;
    return t;
  }
};

FA_DEVICE KeyTiles key_tiles(const KeyRanges& r, int64_t tile) {
  const int64_t global_tiles = ceil_div(r.global_end, tile);
  KeyTiles kt;
  if (r.local_end <= r.local_begin) {  // only global keys
    kt.gap_begin = kt.gap_end = kt.end = global_tiles;
  } else {
    const int64_t local_first = r.local_begin / tile, local_end = ceil_div(r.local_end, tile);
    if (local_first <= global_tiles) {  // the two ranges touch: no gap
      kt.end = max64(global_tiles, local_end);
      kt.gap_begin = kt.gap_end = kt.end;
    } else {
      kt.gap_begin = global_tiles;
      kt.gap_end = local_first;
      kt.end = local_end;
    }
  }
  kt.begin = kt.gap_begin == 0 ? kt.gap_end : 0;
  return kt;
}

// A conservative "no per-element work" test for the tile of queries [i0, i1) and keys
// [j0, j1) (unclipped tile bounds) of head (b, h): true only when every pair is visible and
// gets the same additive logit term. Then *bias_log2 holds that term in base-2 units (what
// fill_tile_table would store for each of the tile's distances) and *bias_row the rel_bias
// table row it comes from (-1 without a table). The tile must lie inside the sequences and
// key_lengths; the distance rule is uniform_distance_bias (common/attention_params.h, shared
// with the CPU kernels). Such tiles cost what a tile without any bias costs.
FA_DEVICE bool tile_is_uniform(const AttentionParams& p, int64_t b, int64_t h, int64_t i0,
                               int64_t i1, int64_t j0, int64_t j1, float* bias_log2,
                               int64_t* bias_row) {
  if (i1 > p.seqlen_q || j1 > p.key_len(b)) return false;
  const int64_t d_min = p.query_pos(b, i0) - (j1 - 1), d_max = p.query_pos(b, i1 - 1) - j0;
  float bias = 0.f;
  if (!uniform_distance_bias(p, h, d_min, d_max, &bias, bias_row)) return false;
  *bias_log2 = bias * kLog2e;  // as distance_bias + fill_tile_table
  return true;
}

// The attn_mask rule (common/attention_params.h: apply_mask) on a base-2 logit x of pair
// (b, h, i, j) inside the sequences: plus the float mask's value in base-2 units, or -inf.
FA_DEVICE float mask_logit_log2(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j,
                                float x) {
  const int64_t at = p.mask_index(b, h, i, j);
  if (p.mask_bool != nullptr) return p.mask_bool[at] ? x : -INFINITY;
  const float m = p.mask[at];
  return m == -INFINITY ? m : fmaf(m, kLog2e, x);
}

// Whether the attn_mask leaves any pair of the kBQ x kBK tile at (i0, j0) visible (pairs inside
// the sequences only). A block vote (a barrier: every thread must call it, and all get the same
// answer), so a tile the mask hides entirely is skipped by the whole block; the threads read the
// tile row by row, consecutive threads consecutive keys, and stop at the first visible pair.
template <int kBQ, int kBK, int kThreads>
FA_DEVICE bool mask_tile_visible(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t j0) {
  int visible = 0;
  for (int e = threadIdx.x; e < kBQ * kBK && !visible; e += kThreads) {
    const int64_t i = i0 + e / kBK, j = j0 + e % kBK;
    if (i < p.seqlen_q && j < p.seqlen_k) visible = mask_logit_log2(p, b, h, i, j, 0.f) != -INFINITY;
  }
  return __syncthreads_or(visible) != 0;
}

// ---------------------------------------------------------------------------------------------
// Per-tile logit tables: the per-element mask and bias rule as an index and a lookup
// ---------------------------------------------------------------------------------------------
// In a kBQ x kBK tile at (i0, j0), row r (query i0 + r) and column c (key j0 + c) lie at
// distance d = pos_q(i0) - j0 + r - c, i.e. on diagonal slot s = r - c + kBK - 1. Everything
// distance_bias decides depends only on d and on whether the pair is global, so a tile needs
// two tables of kBQ + kBK - 1 values (local and global pairs), filled by the block before use;
// the rest of pair_bias (key_lengths, rows past Sq, which pairs are global) is a per-tile
// rectangle test. Values are base-2 bias terms, -inf where the distance is masked.
template <int kBQ, int kBK>
struct TileTable {
  static constexpr int kSlots = kBQ + kBK - 1;
  static constexpr int kFloats = 2 * kSlots;  // local, then global
};

// The per-tile rectangles (in registers; every thread computes the same).
struct TileRules {
  int rows_valid;   // rows r < rows_valid are queries < Sq
  int cols_valid;   // columns c < cols_valid are keys < key_len(b)
  int global_rows;  // rows r < global_rows are global queries (pos_q < G)
  int global_cols;  // columns c < global_cols are global keys (j < G)
  FA_DEVICE bool has_global() const { return global_rows > 0 || global_cols > 0; }
};

template <int kBQ, int kBK>
FA_DEVICE TileRules tile_rules(const AttentionParams& p, int64_t b, int64_t i0, int64_t j0) {
  auto clamp_to = [](int64_t x, int hi) { return static_cast<int>(x < 0 ? 0 : (x > hi ? hi : x)); };
  TileRules r;
  r.rows_valid = clamp_to(p.seqlen_q - i0, kBQ);
  r.cols_valid = clamp_to(p.key_len(b) - j0, kBK);
  r.global_rows = p.num_global > 0 ? clamp_to(p.global_limit(b) - p.query_pos(b, i0), kBQ) : 0;
  r.global_cols = p.num_global > 0 ? clamp_to(p.global_limit(b) - j0, kBK) : 0;
  return r;
}

// Fills table[0, kSlots) (local pairs) and, when the tile has global pairs, table[kSlots, 2 *
// kSlots) by all threads of the block; a barrier must follow before any thread reads it.
template <int kBQ, int kBK, int kThreads>
FA_DEVICE void fill_tile_table(const AttentionParams& p, int64_t b, int64_t h, int64_t i0,
                               int64_t j0, bool with_global, float* table) {
  constexpr int kSlots = TileTable<kBQ, kBK>::kSlots;
  const int64_t d_first = p.query_pos(b, i0) - (j0 + kBK - 1);
  for (int s = threadIdx.x; s < kSlots; s += kThreads) {
    float bias = 0.f;
    table[s] = distance_bias(p, b, h, d_first + s, false, &bias) ? bias * kLog2e : -INFINITY;
    if (with_global) {
      table[kSlots + s] = distance_bias(p, b, h, d_first + s, true, &bias) ? bias * kLog2e : -INFINITY;
    }
  }
}

// The base-2 logit of tile element (r, c): score * logit_log2 + log2(e) * bias (ScoreRule:
// log2(e) * (scale * q.k + bias) without soft-capping), or -inf when the pair is masked
// (including rows past Sq, which tiles pad with zeros), bit for bit what pair_bias gives.
template <int kBQ, int kBK>
FA_DEVICE float tile_logit_log2(const TileRules& rules, const float* table, int r, int c, float score,
                                float logit_log2) {
  constexpr int kSlots = TileTable<kBQ, kBK>::kSlots;
  if (r >= rules.rows_valid || c >= rules.cols_valid) return -INFINITY;
  const int slot = r - c + kBK - 1;
  const float bias = (r < rules.global_rows || c < rules.global_cols) ? table[kSlots + slot] : table[slot];
  return bias == -INFINITY ? -INFINITY : fmaf(score, logit_log2, bias);
}

// The scale: the 0-dim scale tensor's value when given (read on the device, so a learnable
// temperature costs no host sync), else the float argument.
FA_DEVICE float read_scale(const AttentionParams& p, const float* scale_ptr) {
  return scale_ptr != nullptr ? *scale_ptr : p.scale;
}

// How a product q.k enters the base-2 logit rule (tile_logit_log2 and the uniform-tile fmaf):
// as `score(qk)` times `logit_log2`. Without soft-capping that is qk times scale * log2(e);
// with it (p.softcap = c > 0), tanh(scale * qk / c) times c * log2(e), i.e. the capped score
// c * tanh(scale * q.k / c) in base 2, before any bias. `grad(score(qk))` is the cap's
// derivative 1 - tanh^2 by which the backward multiplies dS for dK and dQ.
struct ScoreRule {
  bool capped;
  float in_scale;    // scale / c
  float logit_log2;  // c * log2(e), or scale * log2(e)
  FA_DEVICE float score(float qk) const { return capped ? tanhf(qk * in_scale) : qk; }
  FA_DEVICE float grad(float score) const { return capped ? 1.f - score * score : 1.f; }
};

FA_DEVICE ScoreRule score_rule(const AttentionParams& p, float scale) {
  ScoreRule r;
  r.capped = p.softcap > 0.f;
  r.in_scale = r.capped ? scale / p.softcap : 0.f;
  r.logit_log2 = (r.capped ? p.softcap : scale) * kLog2e;
  return r;
}

}  // namespace cuda_attn
}  // namespace fastattn
