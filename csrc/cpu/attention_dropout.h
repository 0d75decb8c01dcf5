// Attention dropout on a CPU score tile: the decisions of common/dropout.h, drawn for eight
// query lanes at once (the same Philox rounds on eight counters side by side, a loop the
// compiler turns into vector multiplies), each call giving the draws of eight keys.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/attention_params.h"
#include "common/dropout.h"
#include "cpu/attention_tiles.h"

namespace fastattn {
namespace cpu {

constexpr int kDropLanes = 8;

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

// The rows a tile's lanes belong to: lane x is query row i[x] of head bh[x] = b * Hq + h.
// Sized kBlockQ (a multiple of kDropLanes); lanes past the tile's hold any value.
struct DropoutLanes {
  int64_t bh[kBlockQ];
  int64_t i[kBlockQ];
};

// tile[jj * ld + x] *= the dropout factor of (lanes.bh[x], lanes.i[x], j0 + jj) for keys
// jj < nk and lanes x < num_lanes (<= kBlockQ): 1 / (1 - p) when kept, 0 when dropped.
// Multiplying (not assigning) keeps a NaN weight NaN, as the reference's product does.
template <typename acc_t>
void apply_dropout(const AttentionParamsT<acc_t>& p, const DropoutLanes& lanes, int64_t num_lanes,
                   int64_t j0, int64_t nk, acc_t* tile, int64_t ld) {
  const uint32_t k0 = static_cast<uint32_t>(p.dropout_seed);
  const uint32_t k1 = static_cast<uint32_t>(p.dropout_seed >> 32);
  const uint32_t offset = static_cast<uint32_t>(p.dropout_offset);
  const uint32_t threshold = p.dropout_threshold;
  const acc_t keep = p.dropout_scale;
  for (int64_t g = j0 >> 3; g <= (j0 + nk - 1) >> 3; ++g) {
    const int64_t ja = std::max(j0, g * 8), jb = std::min(j0 + nk, g * 8 + 8);
    for (int64_t x0 = 0; x0 < num_lanes; x0 += kDropLanes) {
      alignas(32) uint32_t w[4][kDropLanes];
      for (int l = 0; l < kDropLanes; ++l) {
        w[0][l] = static_cast<uint32_t>(g);
        w[1][l] = static_cast<uint32_t>(lanes.i[x0 + l]);
        w[2][l] = static_cast<uint32_t>(lanes.bh[x0 + l]);
        w[3][l] = offset;
      }
      philox4x32_10_lanes(w[0], w[1], w[2], w[3], k0, k1);
      const int64_t n = std::min<int64_t>(kDropLanes, num_lanes - x0);
      for (int64_t j = ja; j < jb; ++j) {
        const uint32_t* words = w[(j >> 1) & 3];
        const int shift = (j & 1) ? 16 : 0;
        acc_t* row = tile + (j - j0) * ld + x0;
        for (int64_t l = 0; l < n; ++l) {
          row[l] *= ((words[l] >> shift) & 0xFFFFu) < threshold ? keep : acc_t(0);
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace fastattn
