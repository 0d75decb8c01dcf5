// Attention dropout's keep/drop decisions, shared by the CPU and CUDA kernels.
//
// The decision for the weight of (batch b, query head h, query row i, key j) is a pure function
// of (seed, offset, b, h) and the pair's positions P = q_offset[b] + i, K = k_offset[b] + j
// (attention_params.h; the defaults Sk - Sq and 0), drawn with the counter-based generator
// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011; the
// generator of cuRAND and PyTorch):
//   key     = (seed mod 2^32, seed >> 32)                        (seed, offset taken as uint64)
//   counter = (K >> 3, P, b * Hq + h, offset)                    (each word mod 2^32)
//   word    = philox(counter, key)[(K >> 1) & 3]
//   draw    = the high 16 bits of word for odd K, the low 16 bits for even K
// Positions rather than indices: a chunk of a sequence called with its offsets (chunked
// prefill, a shard of context parallelism, a packed sequence) draws the chunk of the whole
// sequence's mask.
//   keep    = draw < threshold,  threshold = round((1 - p) * 65536)
// so one Philox call gives the draws of eight consecutive keys of one row. Kept weights are
// multiplied by 1 / (1 - p); the keep probability threshold / 65536 is within 2^-17 of 1 - p
// (FlashAttention resolves it to 8 bits). Nothing is stored: the backward draws the same
// decisions again. reference.py implements the same function independently in PyTorch.
#pragma once

#include <cstdint>

#include "common/attention_params.h"

namespace fastattn {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr uint32_t kDropoutOne = 65536;  // the threshold of p = 0 (16-bit draws)

FA_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
#endif
}

// Philox-4x32-10 of counter c (in place) under key (k0, k1).
FA_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c[0], &hi0, &lo0);
    mulhilo32(kPhiloxM1, c[2], &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// The four words of the Philox call that holds the draws of key positions 8g .. 8g + 7 of the
// query at position qpos of head bh.
FA_HD void dropout_words(uint64_t seed, uint64_t offset, int64_t bh, int64_t qpos, int64_t g,
                         uint32_t words[4]) {
  words[0] = static_cast<uint32_t>(g);
  words[1] = static_cast<uint32_t>(qpos);
  words[2] = static_cast<uint32_t>(bh);
  words[3] = static_cast<uint32_t>(offset);
  philox4x32_10(words, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Key position kpos's 16-bit draw from the words of its group of eight.
FA_HD uint32_t dropout_draw(const uint32_t words[4], int64_t kpos) {
  const uint32_t w = words[(kpos >> 1) & 3];
  return (kpos & 1) ? (w >> 16) : (w & 0xFFFFu);
}

// The factor a weight is multiplied by: 1 / (1 - p) when kept, 0 when dropped.
template <typename Real>
FA_HD Real dropout_factor(const AttentionParamsT<Real>& p, uint32_t draw) {
  return draw < p.dropout_threshold ? p.dropout_scale : Real(0);
}

// The seed and offset of a call: from the parameters, or read from the GPU (dropout_seed_ptr).
struct DropoutSeed {
  uint64_t seed = 0, offset = 0;
};
template <typename Real>
FA_HD DropoutSeed dropout_seed_of(const AttentionParamsT<Real>& p) {
  DropoutSeed s{p.dropout_seed, p.dropout_offset};
  if (p.dropout_seed_ptr != nullptr) {
    s.seed = static_cast<uint64_t>(p.dropout_seed_ptr[0]);
    s.offset = static_cast<uint64_t>(p.dropout_seed_ptr[1]);
  }
  return s;
}

// The factors of keys j and j + 1 of row i of head (b, h): one Philox call when their
// positions share a group of eight (always, with an even key offset and an even j).
template <typename Real>
FA_HD void dropout_pair_factors(const AttentionParamsT<Real>& p, const DropoutSeed& s, int64_t b,
                                int64_t h, int64_t i, int64_t j, Real* z0, Real* z1) {
  const int64_t bh = b * p.heads_q + h, qpos = p.query_pos(b, i) + p.key_offset(b);
  const int64_t k0 = p.key_offset(b) + j;
  uint32_t words[4];
  dropout_words(s.seed, s.offset, bh, qpos, k0 >> 3, words);
  *z0 = dropout_factor(p, dropout_draw(words, k0));
  if (((k0 + 1) >> 3) != (k0 >> 3)) dropout_words(s.seed, s.offset, bh, qpos, (k0 + 1) >> 3, words);
  *z1 = dropout_factor(p, dropout_draw(words, k0 + 1));
}

// The factor of key j of row i of head (b, h).
template <typename Real>
FA_HD Real dropout_factor_at(const AttentionParamsT<Real>& p, const DropoutSeed& s, int64_t b,
                             int64_t h, int64_t i, int64_t j) {
  const int64_t kpos = p.key_offset(b) + j;
  uint32_t words[4];
  dropout_words(s.seed, s.offset, b * p.heads_q + h, p.query_pos(b, i) + p.key_offset(b), kpos >> 3, words);
  return dropout_factor(p, dropout_draw(words, kpos));
}

}  // namespace fastattn
