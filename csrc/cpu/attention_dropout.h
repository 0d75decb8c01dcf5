// Attention dropout on a CPU score tile: the decisions of common/dropout.h, drawn for eight
// query lanes at once (the same Philox rounds on eight counters side by side, a loop the
// compiler turns into vector multiplies), each call giving the draws of eight keys.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "common/attention_params.h"
#include "common/dropout.h"
#include "cpu/attention_tiles.h"

namespace fastattn {
namespace cpu {

constexpr int kDropLanes = 8;

#if defined(CPU_CAPABILITY_AVX2)
// (hi, lo) 32-bit halves of the eight products a[l] * m (vpmuludq multiplies the even lanes;
// the odd ones are shifted down first).
inline void mulhilo32_avx2(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// philox4x32_10_lanes in AVX2 registers (aligned arrays of eight).
inline void philox4x32_10_avx2(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, uint32_t k0,
                               uint32_t k1) {
  __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(c0));
  __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(c1));
  __m256i x2 = _mm256_load_si256(reinterpret_cast<const __m256i*>(c2));
  __m256i x3 = _mm256_load_si256(reinterpret_cast<const __m256i*>(c3));
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
  const __m256i w0 = _mm256_set1_epi32(static_cast<int>(kPhiloxW0));
  const __m256i w1 = _mm256_set1_epi32(static_cast<int>(kPhiloxW1));
  for (int r = 0; r < 10; ++r) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo32_avx2(x0, m0, &hi0, &lo0);
    mulhilo32_avx2(x2, m1, &hi1, &lo1);
    x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), key0);
    x1 = lo1;
    x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), key1);
    x3 = lo0;
    key0 = _mm256_add_epi32(key0, w0);
    key1 = _mm256_add_epi32(key1, w1);
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(c0), x0);
  _mm256_store_si256(reinterpret_cast<__m256i*>(c1), x1);
  _mm256_store_si256(reinterpret_cast<__m256i*>(c2), x2);
  _mm256_store_si256(reinterpret_cast<__m256i*>(c3), x3);
}
#endif

// Philox-4x32-10 of eight counters (c0[l], c1[l], c2[l], c3[l]) under one key, in place.
inline void philox4x32_10_lanes(uint32_t* __restrict c0, uint32_t* __restrict c1,
                                uint32_t* __restrict c2, uint32_t* __restrict c3, uint32_t k0,
                                uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
#pragma GCC ivdep
    for (int l = 0; l < kDropLanes; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0[l];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c0[l] = n0;
      c1[l] = static_cast<uint32_t>(p1);
      c2[l] = n2;
      c3[l] = static_cast<uint32_t>(p0);
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// row[0, 8) *= (draw < threshold ? keep : 0), the draws being the 16-bit halves of words at
// `shift` (the draws are below 2^16 and the threshold at most 2^16: a signed compare is exact).
inline void scale_row_avx2(float* row, const uint32_t* words, int shift, uint32_t threshold, float keep) {
  const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(words));
  const __m256i draw = shift ? _mm256_srli_epi32(w, 16) : _mm256_and_si256(w, _mm256_set1_epi32(0xFFFF));
  const __m256i kept = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(threshold)), draw);
  const __m256 factor = _mm256_and_ps(_mm256_castsi256_ps(kept), _mm256_set1_ps(keep));
  _mm256_storeu_ps(row, _mm256_mul_ps(_mm256_loadu_ps(row), factor));
}
#endif

// tile[jj * ld + x] *= the dropout factor of row lanes.i[x] of head lanes.bh[x] (of batch row
// b) and key j0 + jj, for jj < nk and lanes x < num_lanes (<= kBlockQ): 1 / (1 - p) when
// kept, 0 when dropped. The draws go by position (common/dropout.h). Multiplying (not
// assigning) keeps a NaN weight NaN, as the reference's product does.
template <typename acc_t>
void apply_dropout(const AttentionParamsT<acc_t>& p, int64_t b, const LaneRows& lanes,
                   int64_t num_lanes, int64_t j0, int64_t nk, acc_t* tile, int64_t ld) {
  const uint32_t k0 = static_cast<uint32_t>(p.dropout_seed);
  const uint32_t k1 = static_cast<uint32_t>(p.dropout_seed >> 32);
  const uint32_t offset = static_cast<uint32_t>(p.dropout_offset);
  const uint32_t threshold = p.dropout_threshold;
  const acc_t keep = p.dropout_scale;
  const int64_t ko = p.key_offset(b);  // key j stands at ko + j
  alignas(32) uint32_t qpos[kBlockQ];
  for (int64_t x = 0; x < kBlockQ; ++x) qpos[x] = static_cast<uint32_t>(p.query_pos(b, lanes.i[x]) + ko);
  for (int64_t g = (ko + j0) >> 3; g <= (ko + j0 + nk - 1) >> 3; ++g) {
    const int64_t ja = std::max(j0, g * 8 - ko), jb = std::min(j0 + nk, g * 8 + 8 - ko);
    for (int64_t x0 = 0; x0 < num_lanes; x0 += kDropLanes) {
      alignas(32) uint32_t w[4][kDropLanes];
      for (int l = 0; l < kDropLanes; ++l) {
        w[0][l] = static_cast<uint32_t>(g);
        w[1][l] = qpos[x0 + l];
        w[2][l] = static_cast<uint32_t>(lanes.bh[x0 + l]);
        w[3][l] = offset;
      }
#if defined(CPU_CAPABILITY_AVX2)
      philox4x32_10_avx2(w[0], w[1], w[2], w[3], k0, k1);
#else
      philox4x32_10_lanes(w[0], w[1], w[2], w[3], k0, k1);
#endif
      const int64_t n = std::min<int64_t>(kDropLanes, num_lanes - x0);
      for (int64_t j = ja; j < jb; ++j) {
        const int64_t kpos = ko + j;
        const uint32_t* words = w[(kpos >> 1) & 3];
        const int shift = (kpos & 1) ? 16 : 0;
        acc_t* row = tile + (j - j0) * ld + x0;
#if defined(CPU_CAPABILITY_AVX2)
        if constexpr (std::is_same_v<acc_t, float>) {
          if (n == kDropLanes) {  // eight lanes: compare and select in one vector
            scale_row_avx2(row, words, shift, threshold, keep);
            continue;
          }
        }
#endif
        for (int64_t l = 0; l < n; ++l) {
          row[l] *= ((words[l] >> shift) & 0xFFFFu) < threshold ? keep : acc_t(0);
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace fastattn
