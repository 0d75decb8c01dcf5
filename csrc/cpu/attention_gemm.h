// The block matrix product used by every contraction of the CPU attention kernels.
//
//   C[m][n] (=|+=) sum_k A(m, k) * B[k][n]      A(m, k) = a[m * a_rs + k * a_ks]
//
// B (and C) are row-major with a contiguous n dimension; A is read one scalar at a time and
// broadcast, so it can have any strides: the same kernel serves K·Qᵀ (A = key rows), P·V with
// the output kept transposed (A = Vᵀ, read through V's strides), dS·K (A = dSᵀ read
// transposed), and so on, without ever transposing a tile in memory.
//
// Register blocking: 3 rows of A times four vectors of B (32 floats / 16 doubles on AVX2) per
// micro-tile: 12 accumulators + 3 broadcasts + 1 B vector = 16 ymm registers. Per k step:
// 4 vector loads (folded into the FMAs), 3 broadcasts, 12 FMAs. Measured on a 2-core AMD EPYC
// VM (AVX2 executed as 128-bit halves) this 3x4 shape runs ~15% faster than the
// classic 6x2 (6 broadcasts per 12 FMAs: broadcasts compete with the FMAs for FP ports);
// column tails use 6x2 and 8x1 tiles.
//
// Why our own kernel and not at::mm_out: ATen's internal cpublas::gemm is not exported, and on
// a 2-core AMD EPYC VM (AVX2, torch linked against MKL) at::mm_out on attention
// tiles (256x64 @ 64x512 and 64x64 @ 64x64, one thread) runs at ~15 GFLOP/s, 35 us per 64^3
// call including the dispatcher, while this micro-kernel runs the 128x64 @ 64x32 tiles of the
// kernels at ~36 GFLOP/s of CPU time (the machine's measured FMA peak: 38.6 GFLOP/s per core).
// It also takes float64 and arbitrary A strides natively (no tile copies).
//
// Sums over k longer than kSumBlock are taken in blocks, each block summed on its own and then
// added to C: one sequential float sum of K terms loses up to ~K * eps of relative accuracy (at
// a head dim of 2^20 the float32 backward lost half its digits), a blocked one
// ~(kSumBlock + K / kSumBlock) * eps. Up to kSumBlock terms (every usual head dim) the sum is
// one sequence.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#if defined(_MSC_VER)
#define FASTATTN_NOINLINE __declspec(noinline)
#else
#define FASTATTN_NOINLINE __attribute__((noinline))
#endif

namespace fastattn {
namespace cpu {

using at::vec::Vectorized;

constexpr int64_t kSumBlock = 256;

// How a product meets C: C = A·B (kStore), C += A·B summed onto C's values (kAccumulate), or
// C += (A·B summed on its own) (kAddBlock: one block of a blocked sum).
enum GemmMode { kStore, kAccumulate, kAddBlock };

// One micro-tile: ROWS rows x NV vectors of columns, full vectors (no column tail). Kept out of
// line so that the register allocation of its loop never competes with a caller's.
template <typename T, int ROWS, int NV, GemmMode MODE>
FASTATTN_NOINLINE void gemm_micro_tile(int64_t K, const T* a, int64_t a_rs, int64_t a_ks,
                                       const T* b, int64_t ldb, T* c, int64_t ldc) {
  using Vec = Vectorized<T>;
  constexpr int W = Vec::size();
  Vec acc[ROWS][NV];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = MODE == kAccumulate ? Vec::loadu(c + r * ldc + v * W) : Vec(T(0));
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* b_row = b + k * ldb;
    const T* a_col = a + k * a_ks;
    if constexpr (NV >= 4) {
      // Few rows, many vectors: keep the ROWS broadcasts in registers, stream B.
      Vec ar[ROWS];
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) ar[r] = Vec(a_col[r * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const Vec bv = Vec::loadu(b_row + v * W);
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; ++r) acc[r][v] = at::vec::fmadd(ar[r], bv, acc[r][v]);
      }
    } else {
      // Many rows, few vectors: keep the B vectors in registers, stream the broadcasts.
      Vec bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b_row + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        const Vec ar(a_col[r * a_rs]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, bv[v], acc[r][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if constexpr (MODE == kAddBlock) acc[r][v] = acc[r][v] + Vec::loadu(c + r * ldc + v * W);
      acc[r][v].store(c + r * ldc + v * W);
    }
  }
}

// Columns [n0, N) with fewer than one full vector left: plain scalar loops (only reached for
// head dims that are not a multiple of the vector width; never on the hot path).
template <typename T, GemmMode MODE>
inline void gemm_scalar_cols(int64_t M, int64_t n0, int64_t N, int64_t K, const T* a, int64_t a_rs,
                             int64_t a_ks, const T* b, int64_t ldb, T* c, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < N; ++n) {
      T sum = MODE == kAccumulate ? c[m * ldc + n] : T(0);
      for (int64_t k = 0; k < K; ++k) sum += a[m * a_rs + k * a_ks] * b[k * ldb + n];
      c[m * ldc + n] = MODE == kAddBlock ? c[m * ldc + n] + sum : sum;
    }
  }
}

// Rows [0, M) for one column block of NV full vectors starting at b / c: micro-tiles of
// R = 12 / NV rows (12 accumulators), then one tile for the remaining M % R rows.
template <typename T, int NV, GemmMode MODE>
inline void gemm_column_block(int64_t M, int64_t K, const T* a, int64_t a_rs, int64_t a_ks,
                              const T* b, int64_t ldb, T* c, int64_t ldc) {
  constexpr int R = NV >= 4 ? 3 : (NV == 2 ? 6 : 8);
  int64_t m = 0;
  for (; m + R <= M; m += R) {
    gemm_micro_tile<T, R, NV, MODE>(K, a + m * a_rs, a_rs, a_ks, b, ldb, c + m * ldc, ldc);
  }
  const T* a_m = a + m * a_rs;
  T* c_m = c + m * ldc;
  switch (M - m) {
    case 7: if constexpr (R > 7) gemm_micro_tile<T, 7, NV, MODE>(K, a_m, a_rs, a_ks, b, ldb, c_m, ldc); break;
    case 6: if constexpr (R > 6) gemm_micro_tile<T, 6, NV, MODE>(K, a_m, a_rs, a_ks, b, ldb, c_m, ldc); break;
    case 5: if constexpr (R > 5) gemm_micro_tile<T, 5, NV, MODE>(K, a_m, a_rs, a_ks, b, ldb, c_m, ldc); break;
    case 4: if constexpr (R > 4) gemm_micro_tile<T, 4, NV, MODE>(K, a_m, a_rs, a_ks, b, ldb, c_m, ldc); break;
    case 3: if constexpr (R > 3) gemm_micro_tile<T, 3, NV, MODE>(K, a_m, a_rs, a_ks, b, ldb, c_m, ldc); break;
    case 2: gemm_micro_tile<T, 2, NV, MODE>(K, a_m, a_rs, a_ks, b, ldb, c_m, ldc); break;
    case 1: gemm_micro_tile<T, 1, NV, MODE>(K, a_m, a_rs, a_ks, b, ldb, c_m, ldc); break;
    default: break;
  }
}

// One sequential sum over k for every element of C (gemm_bcast's whole product, or one block of
// a blocked sum).
template <typename T, GemmMode MODE>
inline void gemm_pass(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_ks,
                      const T* b, int64_t ldb, T* c, int64_t ldc) {
  constexpr int W = Vectorized<T>::size();
  int64_t n = 0;
  // Column blocks of four vectors: the hot path (N is the padded query block, or a head dim).
  for (; n + 4 * W <= N; n += 4 * W) {
    gemm_column_block<T, 4, MODE>(M, K, a, a_rs, a_ks, b + n, ldb, c + n, ldc);
  }
  if (n + 2 * W <= N) {
    gemm_column_block<T, 2, MODE>(M, K, a, a_rs, a_ks, b + n, ldb, c + n, ldc);
    n += 2 * W;
  }
  if (n + W <= N) {
    gemm_column_block<T, 1, MODE>(M, K, a, a_rs, a_ks, b + n, ldb, c + n, ldc);
    n += W;
  }
  if (n < N) gemm_scalar_cols<T, MODE>(M, n, N, K, a, a_rs, a_ks, b, ldb, c, ldc);
}

// C (M x N) = or += A (M x K) * B (K x N); see the file comment for the operand layouts.
// K == 0 gives C = 0 (or leaves C unchanged when accumulating).
template <typename T, bool ACCUM>
inline void gemm_bcast(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_ks,
                       const T* b, int64_t ldb, T* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= kSumBlock) {
    gemm_pass<T, ACCUM ? kAccumulate : kStore>(M, N, K, a, a_rs, a_ks, b, ldb, c, ldc);
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kSumBlock) {
    const int64_t kb = std::min(kSumBlock, K - k0);
    const T* a_k = a + k0 * a_ks;
    const T* b_k = b + k0 * ldb;
    if (k0 == 0 && !ACCUM) {
      gemm_pass<T, kStore>(M, N, kb, a_k, a_rs, a_ks, b_k, ldb, c, ldc);
    } else {
      gemm_pass<T, kAddBlock>(M, N, kb, a_k, a_rs, a_ks, b_k, ldb, c, ldc);
    }
  }
}

}  // namespace cpu
}  // namespace fastattn
