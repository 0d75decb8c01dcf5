// CUDA kernels of the rotary op (the math and the passes are described in csrc/cpu/rotary.cpp;
// these mirror the CPU kernels there). Launched from csrc/cuda/rotary_api.cu.
//
// Design: rotary is memory-bound (a few flops per element), so the kernels are about moving
// bytes: each thread handles a chunk of one (b, s) row with one 16-byte load/store per operand
// (VEC = true) when pointers, strides and sizes allow it, else element by element. The thread
// computes (or gathers) the chunk's cos/sin once, in registers, and applies them to that chunk
// in every head it covers, so no angle table is built or re-read per head. Rows are covered by
// grid-stride loops (blockIdx.x / threadIdx.y over s, blockIdx.y over b), heads are split into
// groups over blockIdx.z when (b, s) alone gives too few blocks; offsets are int64. fp32 math.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

namespace fastattn {
namespace rotary_cuda {

// N elements of T moved as one aligned transaction (4, 8 or 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The unsigned word as wide as a pack. Packs go to and from memory as that word, and stores go
// through __stwb: assigning a Pack (or even a uint4) compiled to one store per element or per
// 4 bytes (checked in the PTX: st.global.u16 / st.global.u32), eight 2-byte stores per 16 bytes
// for half / bfloat16, while the loads were single 16-byte ones.
template <int kBytes>
struct PackWord;
template <>
struct PackWord<16> {
  using type = uint4;
};
template <>
struct PackWord<8> {
  using type = uint2;
};
template <>
struct PackWord<4> {
  using type = uint32_t;
};

// Load N consecutive elements as float: one vector load when VEC (p aligned to the pack),
// else N scalar loads.
template <int N, bool VEC, typename T>
__device__ __forceinline__ void load_as_float(const T* p, float (&out)[N]) {
  if constexpr (VEC) {
    using Word = typename PackWord<sizeof(T) * N>::type;
    const Word w = *reinterpret_cast<const Word*>(p);
    Pack<T, N> pk;
    memcpy(&pk, &w, sizeof(w));
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = static_cast<float>(pk.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = static_cast<float>(p[i]);
  }
}

template <int N, bool VEC, typename T>
__device__ __forceinline__ void store_from_float(T* p, const float (&in)[N]) {
  if constexpr (VEC) {
    using Word = typename PackWord<sizeof(T) * N>::type;
    Pack<T, N> pk;
#pragma unroll
    for (int i = 0; i < N; ++i) pk.v[i] = static_cast<T>(in[i]);
    Word w;
    memcpy(&w, &pk, sizeof(w));
    __stwb(reinterpret_cast<Word*>(p), w);  // one st.global.v4/v2 (a plain assignment was split)
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = static_cast<T>(in[i]);
  }
}

// Element strides of a (B, H, S, D) tensor's first three dims.
struct RowStrides {
  int64_t b, h, s;
};

// Where a row's angles come from: inv_freq, or the cos/sin tables at the row's position (the
// same sources the CPU kernels read; nothing is precomputed on the host).
struct AngleSource {
  const float* inv_freq;  // (half,) fp32 contiguous, or nullptr
  const float* cos;       // (rows, half) fp32 contiguous, or nullptr (then so is sin)
  const float* sin;
  int64_t rows;           // the tables' rows
  const int64_t* pos;     // (Bp, S) positions, or nullptr: position = pos_offset + s
  bool per_batch;         // Bp == B (else 1)
  int64_t pos_offset;
};

// sin and cos of an fp32 angle, to about 4e-7 absolute for any angle a position times a
// frequency gives. The build uses --use_fast_math, under which sincosf is the hardware
// approximation __sincosf, whose error grows with |angle| (positions reach 1e5 radians); so the
// angle is first reduced to [-pi, pi] in double (a rounding of k * 2pi, k < 2^31, costs
// nothing next to fp32's precision), where __sincosf is accurate. That is a few instructions,
// where a full double-precision sincos inlines a long routine for every pair.
__device__ __forceinline__ void sincos_reduced(float angle, float* s, float* c) {
  const double a = static_cast<double>(angle);
  const double k = rint(a * 0.15915494309189533577);  // 1 / (2 pi)
  __sincosf(static_cast<float>(fma(-k, 6.28318530717958647693, a)), s, c);
}

// cos and sin of pairs t0 .. t0+P-1 of row (b, s). With inv_freq the angle is
// float(position) * inv_freq[t], the fp32 product reference.rotary_angles forms. A row's
// values are computed once and reused for every head the thread handles.
// Positions outside the tables give NaN: the host does not range-check CUDA positions (that
// would need a device sync), nothing is read out of bounds, and the error shows in the output.
template <int P>
__device__ __forceinline__ void row_angles(const AngleSource& a, int64_t S, int half, int64_t b,
                                           int64_t s, int t0, bool negate_sin, float (&c)[P],
                                           float (&sn)[P]) {
  const int64_t p = a.pos != nullptr ? __ldg(a.pos + (a.per_batch ? b * S : 0) + s) : a.pos_offset + s;
  if (a.inv_freq != nullptr) {
    const float pf = static_cast<float>(p);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      sincos_reduced(pf * __ldg(a.inv_freq + t0 + j), &sn[j], &c[j]);
    }
  } else if (p >= 0 && p < a.rows) {
#pragma unroll
    for (int j = 0; j < P; ++j) {
      c[j] = __ldg(a.cos + p * half + t0 + j);
      sn[j] = __ldg(a.sin + p * half + t0 + j);
    }
  } else {
#pragma unroll
    for (int j = 0; j < P; ++j) c[j] = sn[j] = __int_as_float(0x7fc00000);  // NaN
  }
  if (negate_sin) {
#pragma unroll
    for (int j = 0; j < P; ++j) sn[j] = -sn[j];
  }
}

// A row's work is cut into chunks: first the rotated ones, then (when the pass-through dims
// are written) chunks of the dims past rotary_dim.
//  - half-split: a rotated chunk is N pairs t..t+N-1, read from both halves;
//  - interleaved: a rotated chunk is N consecutive elements = N/2 pairs (N even).
// Pass-through chunks are N elements with VEC, single elements without.
template <int N, bool VEC, bool INTERLEAVED>
struct Chunking {
  static constexpr int kPairs = INTERLEAVED ? N / 2 : N;
  static constexpr int kPass = VEC ? N : 1;
  static_assert(!INTERLEAVED || N % 2 == 0, "interleaved chunks hold whole pairs");
};

// Heads whose loads a thread issues before it stores any: several independent 16-byte loads
// in flight per thread is what keeps a memory-bound kernel at full bandwidth.
constexpr int kHeadBatch = 4;

struct ApplyParams {
  const void* src;
  void* dst;
  RowStrides src_st, dst_st;
  int64_t B, H, S;
  int half, rd, D;
  int64_t heads_per_block;  // blockIdx.z picks heads [z * heads_per_block, ...)
  AngleSource angles;
  bool negate_sin;  // rotate by -angle (the input gradient)
  bool copy_rest;   // write dims [rd, D) too (false in place: they already hold the input)
};

// dst = rope(src). Grid: x over tiles of threadIdx.y rows of s, y over b, z over head groups;
// a thread takes one chunk of one (b, s) row, computes its angles once and applies them to the
// chunk in every head of its group, kHeadBatch heads at a time. All of a batch's loads come
// before its stores and different heads are disjoint rows, so src == dst (in place) is fine.
template <typename src_t, typename dst_t, int N, bool VEC, bool INTERLEAVED>
__global__ void __launch_bounds__(256) rope_apply_kernel(const ApplyParams p) {
  using C = Chunking<N, VEC, INTERLEAVED>;
  constexpr int P = C::kPairs;
  const src_t* src = static_cast<const src_t*>(p.src);
  dst_t* dst = static_cast<dst_t*>(p.dst);
  const int n_rot = p.half / P;
  const int n_chunks = n_rot + (p.copy_rest ? (p.D - p.rd) / C::kPass : 0);
  const int64_t h_begin = static_cast<int64_t>(blockIdx.z) * p.heads_per_block;
  const int64_t h_end = h_begin + p.heads_per_block < p.H ? h_begin + p.heads_per_block : p.H;
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; s < p.S;
         s += static_cast<int64_t>(gridDim.x) * blockDim.y) {
      const src_t* in_row = src + b * p.src_st.b + s * p.src_st.s;
      dst_t* out_row = dst + b * p.dst_st.b + s * p.dst_st.s;
      for (int c = threadIdx.x; c < n_chunks; c += blockDim.x) {
        if (c >= n_rot) {
          // Pass-through dims: copied.
          const int e = p.rd + (c - n_rot) * C::kPass;
          for (int64_t h = h_begin; h < h_end; ++h) {
            float v[C::kPass];
            load_as_float<C::kPass, VEC>(in_row + h * p.src_st.h + e, v);
            store_from_float<C::kPass, VEC>(out_row + h * p.dst_st.h + e, v);
          }
          continue;
        }
        const int t0 = c * P;
        float cs[P], sn[P];
        row_angles<P>(p.angles, p.S, p.half, b, s, t0, p.negate_sin, cs, sn);
        // Element offsets of the chunk's two parts: interleaved, one run of N elements (pairs
        // side by side); half-split, N elements in each half.
        const int first = INTERLEAVED ? 2 * t0 : t0;
        for (int64_t h0 = h_begin; h0 < h_end; h0 += kHeadBatch) {
          float v1[kHeadBatch][N], v2[kHeadBatch][N];
#pragma unroll
          for (int k = 0; k < kHeadBatch; ++k) {
            if (h0 + k < h_end) {
              const src_t* in = in_row + (h0 + k) * p.src_st.h;
              load_as_float<N, VEC>(in + first, v1[k]);
              if constexpr (!INTERLEAVED) load_as_float<N, VEC>(in + p.half + first, v2[k]);
            }
          }
#pragma unroll
          for (int k = 0; k < kHeadBatch; ++k) {
            if (h0 + k < h_end) {
              dst_t* out = out_row + (h0 + k) * p.dst_st.h;
              if constexpr (INTERLEAVED) {
#pragma unroll
                for (int j = 0; j < P; ++j) {
                  const float x1 = v1[k][2 * j], x2 = v1[k][2 * j + 1];
                  v1[k][2 * j] = x1 * cs[j] - x2 * sn[j];
                  v1[k][2 * j + 1] = x1 * sn[j] + x2 * cs[j];
                }
                store_from_float<N, VEC>(out + first, v1[k]);
              } else {
#pragma unroll
                for (int j = 0; j < N; ++j) {
                  const float x1 = v1[k][j], x2 = v2[k][j];
                  v1[k][j] = x1 * cs[j] - x2 * sn[j];
                  v2[k][j] = x1 * sn[j] + x2 * cs[j];
                }
                store_from_float<N, VEC>(out + first, v1[k]);
                store_from_float<N, VEC>(out + p.half + first, v2[k]);
              }
            }
          }
        }
      }
    }
  }
}

struct BackwardParams {
  const void* grad;
  const void* x;   // the rope input (x, or x @ rotation); read when d_ang or d_cos is set
  void* gx;        // dL/d(rope input), or nullptr when not wanted
  RowStrides g_st, x_st, gx_st;
  int64_t B, H, S;
  int half, rd, D;
  AngleSource angles;  // the forward's angles (sin not negated)
  float* d_ang;  // (B, S, half): sum over heads of dL/dangle, or nullptr
  float* d_cos;  // (B, S, half): sums of dL/dcos and dL/dsin, or nullptr
  float* d_sin;
};

// The backward when table or frequency gradients are wanted (with only dL/dx, the host runs
// rope_apply_kernel with -sin instead). One thread per (b, s, chunk) loops over the heads in
// order: it writes the chunk's dL/dx for every head (when gx is set) and the per-(b, s, pair)
// sums over heads, each written once, by one thread, in a fixed order (deterministic).
template <typename g_t, typename x_t, typename gx_t, int N, bool VEC, bool INTERLEAVED>
__global__ void __launch_bounds__(256) rope_backward_kernel(const BackwardParams p) {
  using C = Chunking<N, VEC, INTERLEAVED>;
  constexpr int P = C::kPairs;
  const g_t* grad = static_cast<const g_t*>(p.grad);
  const x_t* xs = static_cast<const x_t*>(p.x);
  gx_t* gxs = static_cast<gx_t*>(p.gx);
  const bool need_x = p.d_ang != nullptr || p.d_cos != nullptr;
  const int n_rot = p.half / P;
  const int n_chunks = n_rot + (gxs != nullptr ? (p.D - p.rd) / C::kPass : 0);
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; s < p.S;
         s += static_cast<int64_t>(gridDim.x) * blockDim.y) {
      for (int c = threadIdx.x; c < n_chunks; c += blockDim.x) {
        if (c >= n_rot) {
          // Pass-through dims: their gradient is the incoming one.
          const int e = p.rd + (c - n_rot) * C::kPass;
          for (int64_t h = 0; h < p.H; ++h) {
            float v[C::kPass];
            load_as_float<C::kPass, VEC>(grad + b * p.g_st.b + h * p.g_st.h + s * p.g_st.s + e, v);
            store_from_float<C::kPass, VEC>(gxs + b * p.gx_st.b + h * p.gx_st.h + s * p.gx_st.s + e, v);
          }
          continue;
        }
        const int t0 = c * P;
        float cs[P], sn[P], acc_ang[P], acc_c[P], acc_s[P];
        row_angles<P>(p.angles, p.S, p.half, b, s, t0, /*negate_sin=*/false, cs, sn);
#pragma unroll
        for (int j = 0; j < P; ++j) acc_ang[j] = acc_c[j] = acc_s[j] = 0.f;
        for (int64_t h = 0; h < p.H; ++h) {
          const g_t* g = grad + b * p.g_st.b + h * p.g_st.h + s * p.g_st.s;
          const x_t* x = xs + b * p.x_st.b + h * p.x_st.h + s * p.x_st.s;
          float g1[P], g2[P], x1[P], x2[P];
          if constexpr (INTERLEAVED) {
            float v[N];
            load_as_float<N, VEC>(g + 2 * t0, v);
#pragma unroll
            for (int j = 0; j < P; ++j) {
              g1[j] = v[2 * j];
              g2[j] = v[2 * j + 1];
            }
            if (need_x) {
              load_as_float<N, VEC>(x + 2 * t0, v);
#pragma unroll
              for (int j = 0; j < P; ++j) {
                x1[j] = v[2 * j];
                x2[j] = v[2 * j + 1];
              }
            }
          } else {
            load_as_float<N, VEC>(g + t0, g1);
            load_as_float<N, VEC>(g + p.half + t0, g2);
            if (need_x) {
              load_as_float<N, VEC>(x + t0, x1);
              load_as_float<N, VEC>(x + p.half + t0, x2);
            }
          }
          if (gxs != nullptr) {
            // The rotation by -angle: dL/dx1 = c g1 + s g2, dL/dx2 = c g2 - s g1.
            float o1[P], o2[P];
#pragma unroll
            for (int j = 0; j < P; ++j) {
              o1[j] = cs[j] * g1[j] + sn[j] * g2[j];
              o2[j] = cs[j] * g2[j] - sn[j] * g1[j];
            }
            gx_t* gx = gxs + b * p.gx_st.b + h * p.gx_st.h + s * p.gx_st.s;
            if constexpr (INTERLEAVED) {
              float v[N];
#pragma unroll
              for (int j = 0; j < P; ++j) {
                v[2 * j] = o1[j];
                v[2 * j + 1] = o2[j];
              }
              store_from_float<N, VEC>(gx + 2 * t0, v);
            } else {
              store_from_float<N, VEC>(gx + t0, o1);
              store_from_float<N, VEC>(gx + p.half + t0, o2);
            }
          }
          if (need_x) {
#pragma unroll
            for (int j = 0; j < P; ++j) {
              if (p.d_ang != nullptr) {
                const float y1 = x1[j] * cs[j] - x2[j] * sn[j];
                const float y2 = x1[j] * sn[j] + x2[j] * cs[j];
                acc_ang[j] += g2[j] * y1 - g1[j] * y2;
              }
              if (p.d_cos != nullptr) {
                acc_c[j] += g1[j] * x1[j] + g2[j] * x2[j];
                acc_s[j] += g2[j] * x1[j] - g1[j] * x2[j];
              }
            }
          }
        }
        const int64_t row = (b * p.S + s) * p.half + t0;
#pragma unroll
        for (int j = 0; j < P; ++j) {
          if (p.d_ang != nullptr) p.d_ang[row + j] = acc_ang[j];
          if (p.d_cos != nullptr) {
            p.d_cos[row + j] = acc_c[j];
            p.d_sin[row + j] = acc_s[j];
          }
        }
      }
    }
  }
}

// grad_inv_freq, stage 1: block (32, 8) sums d_ang[r, t] * pos[r] over its group of rows for 32
// columns; the 8 row-strided partial sums are combined in a fixed order (deterministic).
constexpr int kFreqCols = 32;
constexpr int kFreqRowThreads = 8;

__global__ void reduce_freq_partial_kernel(const float* __restrict__ d_ang,
                                           const int64_t* __restrict__ pos, int64_t rows,
                                           int half, int64_t rows_per_group,
                                           double* __restrict__ partial) {
  __shared__ double sums[kFreqRowThreads][kFreqCols];
  const int t = blockIdx.x * kFreqCols + threadIdx.x;
  const int64_t group = blockIdx.y;
  const int64_t r0 = group * rows_per_group;
  const int64_t r1 = r0 + rows_per_group < rows ? r0 + rows_per_group : rows;
  double acc = 0.0;
  if (t < half) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kFreqRowThreads) {
      acc += static_cast<double>(d_ang[r * half + t]) * static_cast<double>(pos[r]);
    }
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && t < half) {
    double total = 0.0;
#pragma unroll
    for (int k = 0; k < kFreqRowThreads; ++k) total += sums[k][threadIdx.x];
    partial[group * half + t] = total;
  }
}

// Stage 2: one thread per column sums the groups in order.
__global__ void reduce_freq_final_kernel(const double* __restrict__ partial, int64_t groups,
                                         int half, float* __restrict__ out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= half) return;
  double total = 0.0;
  for (int64_t g = 0; g < groups; ++g) total += partial[g * half + t];
  out[t] = static_cast<float>(total);
}

// Table gradient: rows sorted by position (stably, so equal positions keep their (b, s)
// order). The first row of each run of equal positions sums the run, in order, and writes the
// table row: every table row is written by one thread in a fixed order (deterministic).
__global__ void scatter_table_kernel(const float* __restrict__ d,
                                     const int64_t* __restrict__ sorted_pos,
                                     const int64_t* __restrict__ order, int64_t rows, int half,
                                     int64_t table_rows, float* __restrict__ out) {
  const int64_t total = rows * half;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / half;
    const int t = static_cast<int>(i - r * half);
    const int64_t p = sorted_pos[r];
    if (r > 0 && sorted_pos[r - 1] == p) continue;  // not the first row of its run
    if (p < 0 || p >= table_rows) continue;         // out of range: the forward gave NaN
    float acc = 0.f;
    for (int64_t k = r; k < rows && sorted_pos[k] == p; ++k) acc += d[order[k] * half + t];
    out[p * half + t] = acc;
  }
}

}  // namespace rotary_cuda
}  // namespace fastattn
