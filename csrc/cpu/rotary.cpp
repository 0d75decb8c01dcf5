// Rotary position embedding: y = rope(x @ rotation), forward, in-place and backward.
//
// This file holds two things:
//  1. The op logic, written once for every device in plain ATen: input checks, the learned
//     rotation's matrix products and the choice of which gradients to compute. It is
//     registered for the CPU here and for CUDA in csrc/cuda/rotary_api.cu.
//  2. The CPU versions of the four memory-bound passes that logic hands to a device kernel:
//       apply              dst = rope(src), row by row (dims past rotary_dim copied through)
//       backward_partials  grad wrt src (optional), plus per-(b, s, pair) sums over heads of
//                          dL/dangle (for inv_freq) or dL/dcos, dL/dsin (for the tables)
//       reduce_freq        grad_inv_freq[t] = sum over (b, s) of dL/dangle * position
//       scatter_table      grad_table[position(b, s)] += dL/dtable(b, s), in a fixed order
//     The angles reach the kernels as their sources (inv_freq or the cos/sin tables, and the
//     positions); csrc/cuda/rotary_api.cu implements the same four passes for CUDA.
//
// CPU design: one parallel region per pass (the angles are computed inside it, not by extra
// ATen ops), dynamically scheduled tasks of (batch group, block of s, block of heads) whose
// cos/sin rows are computed once and stay in L1 for all their heads, AVX2 vectors through
// at::vec (fp32 math, fp64 for float64), and in-lane shuffles only (interleaved pairs are
// rotated as x * (c0 c0 c1 c1 ..) + swap_pairs(x) * (-s0 s0 -s1 s1 ..)).
//
// The math. Pair t of a row is (t, t + R/2) (half-split, GPT-NeoX) or (2t, 2t+1)
// (interleaved, GPT-J), R = rotary_dim. With c = cos(angle), s = sin(angle):
//     y1 = c x1 - s x2,   y2 = s x1 + c x2.
// Backward, for the gradient g = dL/dy:
//     dL/dx1 =  c g1 + s g2,   dL/dx2 = -s g1 + c g2      (the rotation by -angle)
//     dL/dangle = g2 y1 - g1 y2
//     dL/dc = g1 x1 + g2 x2,   dL/ds = g2 x1 - g1 x2.
// The angle of pair t at position p is p * inv_freq[t], so dL/dinv_freq[t] sums
// dL/dangle * p over (b, h, s); the tables' gradients scatter-add into row p.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/rotary_ops.h"
#include "cpu/output_buffers.h"

namespace fastattn {

// =============================================================================================
// CPU kernels
// =============================================================================================
namespace rotary_cpu {

using at::vec::Vectorized;

// Vectorized<M>::size() elements of T, loaded as (or stored from) a vector of math type M.
// M is float for float/half/bfloat16 data and double for double data.
template <typename M, typename T>
inline Vectorized<M> load_vec(const T* p);
template <>
inline Vectorized<float> load_vec<float, float>(const float* p) {
  return Vectorized<float>::loadu(p);
}
template <>
inline Vectorized<double> load_vec<double, double>(const double* p) {
  return Vectorized<double>::loadu(p);
}
// Half and bfloat16 go through float vectors: ATen's AVX2 converters when compiled for AVX2,
// element by element otherwise (portable builds).
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#define FASTATTN_ROTARY_AVX2 1
#endif

template <typename T>
inline Vectorized<float> load_reduced(const T* p) {
  __at_align__ float buf[Vectorized<float>::size()];
  for (int64_t i = 0; i < Vectorized<float>::size(); ++i) buf[i] = static_cast<float>(p[i]);
  return Vectorized<float>::loadu(buf);
}
template <typename T>
inline void store_reduced(T* p, const Vectorized<float>& v) {
  __at_align__ float buf[Vectorized<float>::size()];
  v.store(buf);
  for (int64_t i = 0; i < Vectorized<float>::size(); ++i) p[i] = static_cast<T>(buf[i]);
}

template <>
inline Vectorized<float> load_vec<float, c10::BFloat16>(const c10::BFloat16* p) {
#ifdef FASTATTN_ROTARY_AVX2
  Vectorized<float> v;
  at::vec::load_fp32_from_bf16(p, v);
  return v;
#else
  return load_reduced(p);
#endif
}
template <>
inline Vectorized<float> load_vec<float, c10::Half>(const c10::Half* p) {
#ifdef FASTATTN_ROTARY_AVX2
  Vectorized<float> v;
  at::vec::load_fp32_from_fp16(p, v);
  return v;
#else
  return load_reduced(p);
#endif
}

inline void store_vec(float* p, const Vectorized<float>& v) { v.store(p); }
inline void store_vec(double* p, const Vectorized<double>& v) { v.store(p); }
inline void store_vec(c10::BFloat16* p, const Vectorized<float>& v) {
#ifdef FASTATTN_ROTARY_AVX2
  // convert_float_bfloat16 packs two float vectors; only the first half is ours.
  at::vec::convert_float_bfloat16(v, v).store(p, Vectorized<float>::size());
#else
  store_reduced(p, v);
#endif
}
inline void store_vec(c10::Half* p, const Vectorized<float>& v) {
#ifdef FASTATTN_ROTARY_AVX2
  at::vec::convert_float_half(v, v).store(p, Vectorized<float>::size());
#else
  store_reduced(p, v);
#endif
}

// a * b - c, fused where the ISA has it.
template <typename M>
inline Vectorized<M> mul_sub(const Vectorized<M>& a, const Vectorized<M>& b, const Vectorized<M>& c) {
  return a * b - c;
}
#ifdef FASTATTN_ROTARY_AVX2
template <>
inline Vectorized<float> mul_sub(const Vectorized<float>& a, const Vectorized<float>& b,
                                 const Vectorized<float>& c) {
  return _mm256_fmsub_ps(a, b, c);
}
template <>
inline Vectorized<double> mul_sub(const Vectorized<double>& a, const Vectorized<double>& b,
                                  const Vectorized<double>& c) {
  return _mm256_fmsub_pd(a, b, c);
}
#endif

// Copy elements [begin, end) of a row, converting the element type.
template <typename M, typename src_t, typename dst_t>
inline void copy_range(const src_t* in, dst_t* out, int64_t begin, int64_t end) {
  constexpr int64_t V = Vectorized<M>::size();
  int64_t i = begin;
  for (; i + V <= end; i += V) store_vec(out + i, load_vec<M>(in + i));
  for (; i < end; ++i) out[i] = static_cast<dst_t>(static_cast<M>(in[i]));
}

// One half-split row: out = rope(in), pairs (t, t + half). c, s: the row's cos/sin (half
// entries). Every chunk is loaded before it is stored and chunks are disjoint, so in == out
// works (in place).
template <typename M, typename src_t, typename dst_t>
inline void rope_row_half_split(const src_t* in, dst_t* out, const M* c, const M* s, int64_t half,
                                int64_t rd, int64_t D, bool copy_rest) {
  using Vec = Vectorized<M>;
  constexpr int64_t V = Vec::size();
  int64_t t = 0;
  for (; t + V <= half; t += V) {
    const Vec x1 = load_vec<M>(in + t), x2 = load_vec<M>(in + half + t);
    const Vec cv = Vec::loadu(c + t), sv = Vec::loadu(s + t);
    store_vec(out + t, mul_sub(x1, cv, x2 * sv));         // x1 c - x2 s
    store_vec(out + half + t, at::vec::fmadd(x1, sv, x2 * cv));  // x1 s + x2 c
  }
  for (; t < half; ++t) {
    const M x1 = static_cast<M>(in[t]), x2 = static_cast<M>(in[half + t]);
    out[t] = static_cast<dst_t>(x1 * c[t] - x2 * s[t]);
    out[half + t] = static_cast<dst_t>(x1 * s[t] + x2 * c[t]);
  }
  if (copy_rest) copy_range<M>(in, out, rd, D);
}

// (x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...): swaps the members of each interleaved pair
// without crossing 128-bit lanes (one cheap in-lane shuffle on AVX2).
#ifdef FASTATTN_ROTARY_AVX2
inline Vectorized<float> swap_pairs(const Vectorized<float>& v) { return _mm256_permute_ps(v, 0xB1); }
inline Vectorized<double> swap_pairs(const Vectorized<double>& v) { return _mm256_permute_pd(v, 0x5); }
#else
template <typename M>
inline Vectorized<M> swap_pairs(const Vectorized<M>& v) {
  __at_align__ M buf[Vectorized<M>::size()];
  v.store(buf);
  for (int64_t i = 0; i < Vectorized<M>::size(); i += 2) std::swap(buf[i], buf[i + 1]);
  return Vectorized<M>::loadu(buf);
}
#endif

// The interleaved row's tables in element form: cd = (c0, c0, c1, c1, ...) and
// sa = (-s0, s0, -s1, s1, ...), so that out = in * cd + swap_pairs(in) * sa, element-wise.
template <typename M>
inline void element_tables(const M* c, const M* s, int64_t half, M* cd, M* sa) {
  for (int64_t t = 0; t < half; ++t) {
    cd[2 * t] = cd[2 * t + 1] = c[t];
    sa[2 * t] = -s[t];
    sa[2 * t + 1] = s[t];
  }
}

// One interleaved row: out = rope(in), pairs (2t, 2t+1), with the element-form tables.
template <typename M, typename src_t, typename dst_t>
inline void rope_row_interleaved(const src_t* in, dst_t* out, const M* cd, const M* sa, int64_t rd,
                                 int64_t D, bool copy_rest) {
  using Vec = Vectorized<M>;
  constexpr int64_t V = Vec::size();  // even: a vector holds whole pairs
  int64_t e = 0;
  for (; e + V <= rd; e += V) {
    const Vec xv = load_vec<M>(in + e);
    store_vec(out + e, at::vec::fmadd(swap_pairs(xv), Vec::loadu(sa + e), xv * Vec::loadu(cd + e)));
  }
  for (; e < rd; e += 2) {
    const M x1 = static_cast<M>(in[e]), x2 = static_cast<M>(in[e + 1]);
    out[e] = static_cast<dst_t>(x1 * cd[e] + x2 * sa[e]);
    out[e + 1] = static_cast<dst_t>(x2 * cd[e + 1] + x1 * sa[e + 1]);
  }
  if (copy_rest) copy_range<M>(in, out, rd, D);
}

// One row of the backward: gx = rope^T(g) (when gx is given) and, when the accumulators are
// given, d_ang += dL/dangle, d_cos += dL/dcos, d_sin += dL/dsin for this row's pairs.
// x is the rope input (x, or x @ rotation), read only when an accumulator is given.
template <typename M, typename g_t, typename x_t, typename gx_t>
inline void rope_backward_row(const g_t* g, const x_t* x, gx_t* gx, const M* c, const M* s,
                              M* d_ang, M* d_cos, M* d_sin, int64_t half, int64_t rd,
                              int64_t D, bool interleaved) {
  using Vec = Vectorized<M>;
  constexpr int64_t V = Vec::size();
  const bool need_x = d_ang != nullptr || d_cos != nullptr;
  // The vector loop works on (g1, g2, x1, x2) vectors whatever the layout; only how they are
  // read and written differs.
  auto body = [&](const Vec& g1, const Vec& g2, const Vec& x1, const Vec& x2, const Vec& cv,
                  const Vec& sv, int64_t t, Vec* gx1, Vec* gx2) {
    *gx1 = g1 * cv + g2 * sv;
    *gx2 = g2 * cv - g1 * sv;
    if (d_ang != nullptr) {
      const Vec y1 = x1 * cv - x2 * sv, y2 = x1 * sv + x2 * cv;
      (Vec::loadu(d_ang + t) + (g2 * y1 - g1 * y2)).store(d_ang + t);
    }
    if (d_cos != nullptr) {
      (Vec::loadu(d_cos + t) + (g1 * x1 + g2 * x2)).store(d_cos + t);
      (Vec::loadu(d_sin + t) + (g2 * x1 - g1 * x2)).store(d_sin + t);
    }
  };
  auto scalar_body = [&](M g1, M g2, M x1, M x2, M cv, M sv, int64_t t, M* gx1, M* gx2) {
    *gx1 = g1 * cv + g2 * sv;
    *gx2 = g2 * cv - g1 * sv;
    if (d_ang != nullptr) d_ang[t] += g2 * (x1 * cv - x2 * sv) - g1 * (x1 * sv + x2 * cv);
    if (d_cos != nullptr) {
      d_cos[t] += g1 * x1 + g2 * x2;
      d_sin[t] += g2 * x1 - g1 * x2;
    }
  };
  const Vec zero(M(0));
  int64_t t = 0;
  if (!interleaved) {
    for (; t + V <= half; t += V) {
      const Vec g1 = load_vec<M>(g + t), g2 = load_vec<M>(g + half + t);
      const Vec x1 = need_x ? load_vec<M>(x + t) : zero;
      const Vec x2 = need_x ? load_vec<M>(x + half + t) : zero;
      Vec gx1, gx2;
      body(g1, g2, x1, x2, Vec::loadu(c + t), Vec::loadu(s + t), t, &gx1, &gx2);
      if (gx != nullptr) {
        store_vec(gx + t, gx1);
        store_vec(gx + half + t, gx2);
      }
    }
    for (; t < half; ++t) {
      const M x1 = need_x ? static_cast<M>(x[t]) : M(0);
      const M x2 = need_x ? static_cast<M>(x[half + t]) : M(0);
      M gx1, gx2;
      scalar_body(static_cast<M>(g[t]), static_cast<M>(g[half + t]), x1, x2, c[t], s[t], t, &gx1,
                  &gx2);
      if (gx != nullptr) {
        gx[t] = static_cast<gx_t>(gx1);
        gx[half + t] = static_cast<gx_t>(gx2);
      }
    }
  } else {
    for (; t + V <= half; t += V) {
      const auto g12 = at::vec::deinterleave2(load_vec<M>(g + 2 * t), load_vec<M>(g + 2 * t + V));
      std::pair<Vec, Vec> x12(zero, zero);
      if (need_x) x12 = at::vec::deinterleave2(load_vec<M>(x + 2 * t), load_vec<M>(x + 2 * t + V));
      Vec gx1, gx2;
      body(g12.first, g12.second, x12.first, x12.second, Vec::loadu(c + t), Vec::loadu(s + t), t,
           &gx1, &gx2);
      if (gx != nullptr) {
        const auto out = at::vec::interleave2(gx1, gx2);
        store_vec(gx + 2 * t, out.first);
        store_vec(gx + 2 * t + V, out.second);
      }
    }
    for (; t < half; ++t) {
      const M x1 = need_x ? static_cast<M>(x[2 * t]) : M(0);
      const M x2 = need_x ? static_cast<M>(x[2 * t + 1]) : M(0);
      M gx1, gx2;
      scalar_body(static_cast<M>(g[2 * t]), static_cast<M>(g[2 * t + 1]), x1, x2, c[t], s[t], t,
                  &gx1, &gx2);
      if (gx != nullptr) {
        gx[2 * t] = static_cast<gx_t>(gx1);
        gx[2 * t + 1] = static_cast<gx_t>(gx2);
      }
    }
  }
  if (gx != nullptr) copy_range<M>(g, gx, rd, D);  // the pass-through dims' gradient is g
}

// Element strides of a (B, H, S, D) tensor's first three dims.
struct Strides3 {
  int64_t b, h, s;
  explicit Strides3(const at::Tensor& t) : b(t.stride(0)), h(t.stride(1)), s(t.stride(2)) {}
  int64_t offset(int64_t bi, int64_t hi, int64_t si) const { return bi * b + hi * h + si * s; }
};

// Runs task(i) for i in [0, n_tasks) in ONE parallel region, handing tasks out one at a time
// (dynamic scheduling): on a loaded machine a descheduled thread then delays one small task,
// not a static half of the work. Which task computes what does not depend on the threads, so
// results are the same for any thread count. Small jobs (fewer elements than ATen's own
// grain size, 32768, e.g. a decoding step) run inline: waking threads would cost more than the
// work. Inside another parallel region at::parallel_for runs inline and this loop does every
// task.
constexpr int64_t kSerialBelowElems = 32768;
template <typename F>
void parallel_tasks(int64_t n_tasks, int64_t work_elems, const F& task) {
  if (n_tasks <= 0) return;
  if (n_tasks == 1 || work_elems < kSerialBelowElems) {
    for (int64_t i = 0; i < n_tasks; ++i) task(i);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n_tasks; i = next.fetch_add(1)) task(i);
  });
}

// Where the angles come from. The kernels compute each (b, s) row's cos/sin themselves, once
// per task, inside the one parallel region: building whole tables with ATen first would cost
// a few extra parallel regions (and on a busy machine each one waits for its threads).
template <typename M>
struct AngleSource {
  const M* inv_freq = nullptr;                // (half,); or nullptr when tables are given
  const M* cos = nullptr;                     // (table rows, half)
  const M* sin = nullptr;
  const int64_t* pos = nullptr;               // (Bp, S), Bp = B (per-batch positions) or 1
  int64_t S = 0, half = 0;
  bool per_batch = false;
  bool negate_sin = false;                    // the inverse rotation (backward)

  AngleSource(const at::Tensor& inv_freq_t, const at::Tensor& cos_t, const at::Tensor& sin_t,
              const at::Tensor& pos_t, int64_t half_, bool negate)
      : pos(pos_t.const_data_ptr<int64_t>()),
        S(pos_t.size(1)),
        half(half_),
        per_batch(pos_t.size(0) != 1),
        negate_sin(negate) {
    if (inv_freq_t.defined()) {
      inv_freq = inv_freq_t.const_data_ptr<M>();
    } else {
      cos = cos_t.const_data_ptr<M>();
      sin = sin_t.const_data_ptr<M>();
    }
  }

  // cos and sin of row (b, s) into c[0, half), sn[0, half). With inv_freq the angle is
  // M(position) * inv_freq[t], the same product reference.rotary_angles forms.
  void row(int64_t b, int64_t s, M* c, M* sn) const {
    using Vec = Vectorized<M>;
    constexpr int64_t V = Vec::size();
    const int64_t p = pos[(per_batch ? b * S : 0) + s];
    if (inv_freq != nullptr) {
      const Vec pv(static_cast<M>(p));
      int64_t t = 0;
      for (; t + V <= half; t += V) {
        const Vec angle = pv * Vec::loadu(inv_freq + t);
        angle.cos().store(c + t);
        (negate_sin ? angle.sin().neg() : angle.sin()).store(sn + t);
      }
      for (; t < half; ++t) {
        const M angle = static_cast<M>(p) * inv_freq[t];
        c[t] = std::cos(angle);
        sn[t] = negate_sin ? -std::sin(angle) : std::sin(angle);
      }
    } else {
      std::copy(cos + p * half, cos + (p + 1) * half, c);
      if (negate_sin) {
        for (int64_t t = 0; t < half; ++t) sn[t] = -sin[p * half + t];
      } else {
        std::copy(sin + p * half, sin + (p + 1) * half, sn);
      }
    }
  }
};

// Rows of S handled by one task: enough that the task's angle tables (row_values math values
// per row) stay in L1 (~16 KiB) while they are reused for every head.
template <typename M>
int64_t rows_per_task(int64_t row_values) {
  const int64_t bytes_per_row = std::max<int64_t>(1, row_values * static_cast<int64_t>(sizeof(M)));
  return std::clamp<int64_t>((16 * 1024) / bytes_per_row, 1, 64);
}

// How the (b, h, s) rows are cut into tasks. A task is (a batch group, a block of s, a block of
// heads); it computes the angles of its (b, s) rows once and applies them to all its heads.
// The batch group is one b when positions differ per batch, else all of B (shared angles).
struct TaskSplit {
  int64_t B, H, S, rows, s_blocks, b_groups, h_splits, heads_per_task;

  TaskSplit(int64_t B_, int64_t H_, int64_t S_, int64_t rows_, bool per_batch, bool split_heads)
      : B(B_), H(H_), S(S_), rows(rows_) {
    s_blocks = (S + rows - 1) / rows;
    b_groups = per_batch ? B : 1;
    h_splits = 1;
    if (split_heads) {
      // Split the heads too when the other tasks are too few to feed the threads (decoding).
      const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
      h_splits = std::clamp<int64_t>(want / std::max<int64_t>(1, b_groups * s_blocks), 1,
                                     std::max<int64_t>(H, 1));
    }
    heads_per_task = (H + h_splits - 1) / h_splits;
  }
  int64_t tasks() const { return (B == 0 || H == 0) ? 0 : b_groups * s_blocks * h_splits; }

  struct Range {
    int64_t b0, b1, s0, s1, h0, h1;
  };
  Range range(int64_t task) const {
    const int64_t hb = task % h_splits, rest = task / h_splits;
    const int64_t sb = rest % s_blocks, bg = rest / s_blocks;
    Range r;
    r.b0 = b_groups == B ? bg : 0;
    r.b1 = b_groups == B ? bg + 1 : B;
    r.s0 = sb * rows;
    r.s1 = std::min(S, r.s0 + rows);
    r.h0 = hb * heads_per_task;
    r.h1 = std::min(H, r.h0 + heads_per_task);
    return r;
  }
};

// dst = rope(src) over all (b, h, s) rows; src and dst are (B, H, S, D) with a unit last stride.
template <typename M, typename src_t, typename dst_t>
void apply_typed(const at::Tensor& src, const at::Tensor& dst, const AngleSource<M>& angles,
                 bool interleaved, int64_t rd, bool copy_rest) {
  const int64_t B = src.size(0), H = src.size(1), S = src.size(2), D = src.size(3);
  const int64_t half = rd / 2;
  const src_t* in = src.const_data_ptr<src_t>();
  dst_t* out = dst.data_ptr<dst_t>();
  const Strides3 is(src), os(dst);
  // Per row: cos + sin (rd values), plus the element-form pair (2 rd) when interleaved.
  const TaskSplit split(B, H, S, rows_per_task<M>(interleaved ? 3 * rd : rd), angles.per_batch,
                        /*split_heads=*/true);
  parallel_tasks(split.tasks(), src.numel(), [&](int64_t task) {
    const auto r = split.range(task);
    const int64_t n = r.s1 - r.s0;
    const bool shared = !angles.per_batch;  // one angle table for every b of the task
    std::vector<M> buf((interleaved ? 3 : 1) * n * rd);
    M* c = buf.data();            // (n, half)
    M* sn = buf.data() + n * half;  // (n, half)
    M* cd = buf.data() + n * rd;    // (n, rd), interleaved only
    M* sa = cd + n * rd;
    for (int64_t b = r.b0; b < r.b1; ++b) {
      if (b == r.b0 || !shared) {
        for (int64_t s = r.s0; s < r.s1; ++s) {
          const int64_t i = s - r.s0;
          angles.row(b, s, c + i * half, sn + i * half);
          if (interleaved) element_tables(c + i * half, sn + i * half, half, cd + i * rd, sa + i * rd);
        }
      }
      for (int64_t h = r.h0; h < r.h1; ++h) {
        for (int64_t s = r.s0; s < r.s1; ++s) {
          const int64_t i = s - r.s0;
          const src_t* row_in = in + is.offset(b, h, s);
          dst_t* row_out = out + os.offset(b, h, s);
          if (interleaved) {
            rope_row_interleaved<M>(row_in, row_out, cd + i * rd, sa + i * rd, rd, D, copy_rest);
          } else {
            rope_row_half_split<M>(row_in, row_out, c + i * half, sn + i * half, half, rd, D,
                                   copy_rest);
          }
        }
      }
    }
  });
}

template <typename M, typename src_t, typename dst_t>
void apply_angles(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& inv_freq,
                  const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
                  bool negate_sin, bool interleaved, int64_t rd, bool copy_rest) {
  const AngleSource<M> angles(inv_freq, cos, sin, pos, rd / 2, negate_sin);
  apply_typed<M, src_t, dst_t>(src, dst, angles, interleaved, rd, copy_rest);
}

void apply(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& inv_freq,
           const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos, bool negate_sin,
           bool interleaved, int64_t rd, bool copy_rest) {
  const auto st = src.scalar_type(), dt = dst.scalar_type();
  if (st == dt) {
    FASTATTN_DISPATCH_CPU_FLOATING(dt, "fastattn::rotary (cpu)", [&] {
      using M = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      apply_angles<M, scalar_t, scalar_t>(src, dst, inv_freq, cos, sin, pos, negate_sin,
                                          interleaved, rd, copy_rest);
    });
  } else if (st == at::kFloat) {
    // x @ rotation (float32) into a half/bfloat16 output: the forward with a learned rotation.
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dt, "fastattn::rotary (cpu)", [&] {
      apply_angles<float, float, scalar_t>(src, dst, inv_freq, cos, sin, pos, negate_sin,
                                           interleaved, rd, copy_rest);
    });
  } else {
    // A half/bfloat16 gradient into a float32 buffer: the backward with a learned rotation.
    FA_CHECK(dt == at::kFloat, "fastattn: rotary: no kernel from ", st, " to ", dt);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "fastattn::rotary (cpu)", [&] {
      apply_angles<float, scalar_t, float>(src, dst, inv_freq, cos, sin, pos, negate_sin,
                                           interleaved, rd, copy_rest);
    });
  }
}

template <typename M, typename g_t, typename x_t, typename gx_t>
void backward_partials_typed(const at::Tensor& grad, const at::Tensor& xsrc, const at::Tensor& gx,
                             const AngleSource<M>& angles, bool interleaved, int64_t rd,
                             const at::Tensor& d_ang, const at::Tensor& d_cos,
                             const at::Tensor& d_sin) {
  const int64_t B = grad.size(0), H = grad.size(1), S = grad.size(2), D = grad.size(3);
  const int64_t half = rd / 2;
  const g_t* gp = grad.const_data_ptr<g_t>();
  const x_t* xp = xsrc.const_data_ptr<x_t>();
  gx_t* gxp = gx.defined() ? gx.data_ptr<gx_t>() : nullptr;
  M* dap = d_ang.defined() ? d_ang.data_ptr<M>() : nullptr;
  M* dcp = d_cos.defined() ? d_cos.data_ptr<M>() : nullptr;
  M* dsp = d_sin.defined() ? d_sin.data_ptr<M>() : nullptr;
  const Strides3 gs(grad), xs(xsrc);
  const Strides3 gxs = gx.defined() ? Strides3(gx) : gs;
  // A task owns its (b, s) rows and sums all their heads, in head order, into its own rows of
  // d_*: no two tasks touch the same accumulator, and the result does not depend on the number
  // of threads (the split depends on the shape only; heads are never split).
  const TaskSplit split(B, H, S, rows_per_task<M>(rd), angles.per_batch, /*split_heads=*/false);
  parallel_tasks(split.tasks(), grad.numel(), [&](int64_t task) {
    const auto r = split.range(task);
    const int64_t n = r.s1 - r.s0;
    std::vector<M> buf(n * rd);
    M* c = buf.data();
    M* sn = buf.data() + n * half;
    for (int64_t b = r.b0; b < r.b1; ++b) {
      if (b == r.b0 || angles.per_batch) {
        for (int64_t s = r.s0; s < r.s1; ++s) {
          angles.row(b, s, c + (s - r.s0) * half, sn + (s - r.s0) * half);
        }
      }
      for (M* acc : {dap, dcp, dsp}) {
        if (acc != nullptr) std::fill(acc + (b * S + r.s0) * half, acc + (b * S + r.s1) * half, M(0));
      }
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t s = r.s0; s < r.s1; ++s) {
          const int64_t i = s - r.s0;
          const int64_t row = (b * S + s) * half;
          rope_backward_row<M>(gp + gs.offset(b, h, s), xp + xs.offset(b, h, s),
                               gxp == nullptr ? nullptr : gxp + gxs.offset(b, h, s), c + i * half,
                               sn + i * half, dap == nullptr ? nullptr : dap + row,
                               dcp == nullptr ? nullptr : dcp + row,
                               dsp == nullptr ? nullptr : dsp + row, half, rd, D, interleaved);
        }
      }
    }
  });
}

void backward_partials(const at::Tensor& grad, const at::Tensor& xsrc, const at::Tensor& gx,
                       const at::Tensor& inv_freq, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& pos, bool interleaved, int64_t rd, const at::Tensor& d_ang,
                       const at::Tensor& d_cos, const at::Tensor& d_sin) {
  const auto gt = grad.scalar_type();
  FASTATTN_DISPATCH_CPU_FLOATING(gt, "fastattn::rotary_backward (cpu)", [&] {
    using M = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const AngleSource<M> angles(inv_freq, cos, sin, pos, rd / 2, /*negate=*/false);
    if (xsrc.scalar_type() == gt) {
      // No learned rotation: x and the gradient are in x's dtype.
      backward_partials_typed<M, scalar_t, scalar_t, scalar_t>(grad, xsrc, gx, angles, interleaved,
                                                               rd, d_ang, d_cos, d_sin);
    } else {
      // With a learned rotation, x @ rotation and its gradient live in the math dtype.
      backward_partials_typed<M, scalar_t, M, M>(grad, xsrc, gx, angles, interleaved, rd, d_ang,
                                                 d_cos, d_sin);
    }
  });
}

// grad_inv_freq[t] = sum over rows r = (b, s) of d_ang[r, t] * pos[r], summed in row order
// (in double) for each t; threads split the t columns.
at::Tensor reduce_freq(const at::Tensor& d_ang, const at::Tensor& pos_flat) {
  const int64_t rows = d_ang.size(0), half = d_ang.size(1);
  auto out = at::empty({half}, d_ang.options());
  AT_DISPATCH_FLOATING_TYPES(d_ang.scalar_type(), "fastattn::rotary reduce_freq", [&] {
    const scalar_t* d = d_ang.const_data_ptr<scalar_t>();
    const int64_t* pos = pos_flat.const_data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, half, 16, [&](int64_t t0, int64_t t1) {
      std::vector<double> acc(t1 - t0, 0.0);
      for (int64_t r = 0; r < rows; ++r) {
        const double p = static_cast<double>(pos[r]);
        const scalar_t* dr = d + r * half;
        for (int64_t t = t0; t < t1; ++t) acc[t - t0] += static_cast<double>(dr[t]) * p;
      }
      for (int64_t t = t0; t < t1; ++t) o[t] = static_cast<scalar_t>(acc[t - t0]);
    });
  });
  return out;
}

// grad_table (rows_table, half): row pos[r] accumulates d[r] for every r, in row order.
// Positions were checked to lie in the table when the angle tables were built.
at::Tensor scatter_table(const at::Tensor& d, const at::Tensor& pos_flat, int64_t rows_table) {
  const int64_t rows = d.size(0), half = d.size(1);
  auto out = at::zeros({rows_table, half}, d.options());
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "fastattn::rotary scatter_table", [&] {
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const int64_t* pos = pos_flat.const_data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, half, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t p = pos[r];
        if (p < 0 || p >= rows_table) continue;  // unreachable after the checks; never write OOB
        for (int64_t t = t0; t < t1; ++t) o[p * half + t] += dp[r * half + t];
      }
    });
  });
  return out;
}

}  // namespace rotary_cpu


// =============================================================================================
// Device-generic op logic
// =============================================================================================
namespace {

[[noreturn]] void no_cuda_kernels() {
  TORCH_CHECK(false, "fastattn: rotary got CUDA tensors but this build of fastattn has no CUDA "
              "kernels (see fastattn.build_info())");
}

// The checked and normalized arguments of one rotary call.
struct RotaryArgs {
  int64_t B = 0, H = 0, S = 0, D = 0, rd = 0, half = 0;
  bool interleaved = false;
  at::ScalarType math = at::kFloat;  // float64 for float64 x, else float32
  at::Tensor inv_freq;               // (half,) math dtype, contiguous; or undefined
  at::Tensor cos, sin;               // (S_max, half) math dtype, contiguous; or undefined
  at::Tensor pos;                    // (Bp, S) int64 contiguous on x's device; Bp = B or 1.
                                     // Undefined on CUDA when no positions were given: the
                                     // kernels then use offset + s (no arange launch per call)
  int64_t offset = 0;
  at::Tensor rotation;               // (D, D) math dtype, contiguous; or undefined
};

// Each pass runs on the kernel of the tensors' device. Angles are given as their sources
// (inv_freq or the tables, and the positions); the kernels compute or gather them.
void kernel_apply(const at::Tensor& src, const at::Tensor& dst, const RotaryArgs& a,
                  bool negate_sin, bool copy_rest) {
  if (src.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    return rotary_cuda::apply(src, dst, a.inv_freq, a.cos, a.sin, a.pos, a.offset, negate_sin,
                              a.interleaved, a.rd, copy_rest);
#else
    no_cuda_kernels();
#endif
  }
  rotary_cpu::apply(src, dst, a.inv_freq, a.cos, a.sin, a.pos, negate_sin, a.interleaved, a.rd,
                    copy_rest);
}

void kernel_backward_partials(const at::Tensor& grad, const at::Tensor& xsrc, const at::Tensor& gx,
                              const RotaryArgs& a, const at::Tensor& d_ang,
                              const at::Tensor& d_cos, const at::Tensor& d_sin) {
  if (grad.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    return rotary_cuda::backward_partials(grad, xsrc, gx, a.inv_freq, a.cos, a.sin, a.pos, a.offset,
                                          a.interleaved, a.rd, d_ang, d_cos, d_sin);
#else
    no_cuda_kernels();
#endif
  }
  rotary_cpu::backward_partials(grad, xsrc, gx, a.inv_freq, a.cos, a.sin, a.pos, a.interleaved,
                                a.rd, d_ang, d_cos, d_sin);
}

at::Tensor kernel_reduce_freq(const at::Tensor& d_ang, const at::Tensor& pos_flat) {
  if (d_ang.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    return rotary_cuda::reduce_freq(d_ang, pos_flat);
#else
    no_cuda_kernels();
#endif
  }
  return rotary_cpu::reduce_freq(d_ang, pos_flat);
}

at::Tensor kernel_scatter_table(const at::Tensor& d, const at::Tensor& pos_flat, int64_t rows) {
  if (d.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    return rotary_cuda::scatter_table(d, pos_flat, rows);
#else
    no_cuda_kernels();
#endif
  }
  return rotary_cpu::scatter_table(d, pos_flat, rows);
}

// Small parameter tensors are read as contiguous tensors of the math dtype (fp32, or fp64 for
// float64 x), whatever their storage dtype.
at::Tensor as_math(const at::Tensor& t, at::ScalarType math) {
  return math == at::kFloat ? as_fp32_contiguous(t) : t.to(math).contiguous();
}

RotaryArgs check_args(const at::Tensor& x, const std::optional<at::Tensor>& inv_freq,
                      const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                      const std::optional<at::Tensor>& positions,
                      const std::optional<at::Tensor>& rotation, int64_t offset, bool interleaved,
                      int64_t rotary_dim) {
  check_rank(x, 4, "x");
  check_floating(x, "x");
  check_last_dim_contiguous(x, "x");
  TORCH_CHECK_TYPE(!(x.is_cuda() && x.scalar_type() == at::kDouble),
              "fastattn: rotary's CUDA kernel supports float32, float16 and bfloat16; x is float64 "
              "(run float64 on the CPU, or cast x)");
  RotaryArgs a;
  a.B = x.size(0);
  a.H = x.size(1);
  a.S = x.size(2);
  a.D = x.size(3);
  a.interleaved = interleaved;
  a.math = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  FA_CHECK_VALUE(rotary_dim >= 0 && rotary_dim % 2 == 0 && rotary_dim <= a.D,
           "fastattn: rotary_dim must be even and in [0, D = ", a.D, "], got ", rotary_dim);
  a.rd = rotary_dim;
  a.half = rotary_dim / 2;

  const bool has_freq = present(inv_freq), has_cos = present(cos), has_sin = present(sin);
  FA_CHECK_VALUE(has_cos == has_sin, "fastattn: cos and sin must be given together, got cos ",
           has_cos ? "set" : "None", " and sin ", has_sin ? "set" : "None");
  FA_CHECK_VALUE(has_freq != has_cos,
           "fastattn: give exactly one of inv_freq or the cos/sin tables, got ",
           has_freq ? "both" : "neither");
  if (has_freq) {
    check_rank(*inv_freq, 1, "inv_freq");
    check_floating(*inv_freq, "inv_freq");
    check_same_device(*inv_freq, x, "inv_freq", "x");
    check_size(*inv_freq, 0, a.half, "inv_freq", "rotary_dim / 2");
    a.inv_freq = as_math(*inv_freq, a.math);
  } else {
    for (const auto* t : {&*cos, &*sin}) {
      const char* name = t == &*cos ? "cos" : "sin";
      check_rank(*t, 2, name);
      check_floating(*t, name);
      check_same_device(*t, x, name, "x");
      check_size(*t, 1, a.half, name, "rotary_dim / 2");
    }
    FA_CHECK_VALUE(cos->sizes() == sin->sizes(), "fastattn: cos and sin must have the same shape, got ",
             cos->sizes(), " and ", sin->sizes());
    a.cos = as_math(*cos, a.math);
    a.sin = as_math(*sin, a.math);
  }

  if (present(positions)) {
    const at::Tensor& p = *positions;
    check_same_device(p, x, "positions", "x");
    FA_CHECK_TYPE(p.scalar_type() == at::kLong || p.scalar_type() == at::kInt,
             "fastattn: positions must be int64 or int32, got ", p.scalar_type());
    FA_CHECK_VALUE(p.dim() == 1 || p.dim() == 2, "fastattn: positions must be (S,) or (B, S), got ",
             p.dim(), " dimensions (shape ", p.sizes(), ")");
    if (p.dim() == 1) {
      check_size(p, 0, a.S, "positions", "S");
    } else {
      check_size(p, 0, a.B, "positions", "B");
      check_size(p, 1, a.S, "positions", "S");
    }
    a.pos = p.to(at::kLong).reshape({p.dim() == 2 ? a.B : 1, a.S}).contiguous();
    // Table rows are read at these positions: on the CPU check them here (cheap, no sync); the
    // CUDA kernels turn out-of-range positions into NaN outputs instead (no sync either).
    if (has_cos && !x.is_cuda() && a.pos.numel() > 0) {
      const int64_t lo = a.pos.min().item<int64_t>(), hi = a.pos.max().item<int64_t>();
      FA_CHECK_VALUE(lo >= 0 && hi < a.cos.size(0), "fastattn: positions must lie in [0, ",
               a.cos.size(0), ") (the cos/sin table's rows), got values in [", lo, ", ", hi,
                  "]");
    }
  } else {
    // A direct op call may pass any int64 offset: these checks are written so that they cannot
    // overflow (offset + S could wrap around and pass a plain `offset + S <= rows`).
    if (has_cos && a.S > 0) {
      const int64_t rows = a.cos.size(0);
      FA_CHECK_VALUE(offset >= 0 && a.S <= rows && offset <= rows - a.S,
               "fastattn: positions offset..offset+S-1 (offset = ", offset, ", S = ", a.S,
               ") lie past the cos/sin table's ", rows, " rows");
    }
    // With inv_freq any position is valid, but offset + S - 1 must still be an int64 (the
    // reference computes offset + arange(S) and raises rather than wrap around).
    FA_CHECK_VALUE(a.S == 0 || offset <= std::numeric_limits<int64_t>::max() - (a.S - 1),
             "fastattn: positions offset..offset+S-1 (offset = ", offset, ", S = ", a.S,
             ") overflow int64; offset must be at most ",
             std::numeric_limits<int64_t>::max() - (a.S - 1));
    a.offset = offset;
    if (!x.is_cuda() && x.numel() > 0) {
      // Filled directly: cheaper than an ATen op for the short vectors of decoding steps. (An
      // empty x reads no position: none is made, however large S is.)
      a.pos = at::empty({1, a.S}, x.options().dtype(at::kLong));
      int64_t* pos = a.pos.data_ptr<int64_t>();
      for (int64_t s = 0; s < a.S; ++s) pos[s] = offset + s;
    }
  }

  if (present(rotation)) {
    check_rank(*rotation, 2, "rotation");
    check_floating(*rotation, "rotation");
    check_same_device(*rotation, x, "rotation", "x");
    check_size(*rotation, 0, a.D, "rotation", "D");
    check_size(*rotation, 1, a.D, "rotation", "D");
    a.rotation = as_math(*rotation, a.math);
  }
  return a;
}

// The byte range [first, last + 1) that a tensor's elements span in its storage.
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  uintptr_t lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  uintptr_t hi = lo;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const uintptr_t extent = static_cast<uintptr_t>(std::abs(t.stride(d))) *
                             static_cast<uintptr_t>(t.size(d) - 1) * t.itemsize();
    if (t.stride(d) < 0) {
      lo -= extent;
    } else {
      hi += extent;
    }
  }
  return {lo, hi + t.itemsize()};
}

// The in-place op reads `t` while it writes x, so they must not share memory (a table that is a
// view of x would be read after some of it was overwritten). The test is on the byte ranges,
// which covers strided views too (at::assert_no_overlap gives up on non-dense tensors); a call
// it refuses with disjoint interleaved views is rare and works with t.clone().
void check_no_overlap_with_x(const at::Tensor& x, const at::Tensor& t, const char* name) {
  if (!t.defined() || t.numel() == 0 || x.numel() == 0 || !x.has_storage() || !t.has_storage()) {
    return;
  }
  if (!x.storage().is_alias_of(t.storage())) return;
  const auto xs = byte_span(x), ts = byte_span(t);
  FA_CHECK(xs.second <= ts.first || ts.second <= xs.first, "fastattn: rotary_ writes into x, but ",
           name, " shares memory with x (it would be read after it was overwritten); pass ", name,
           ".clone()");
}

// x @ rotation in the math dtype, (B, H, S, D) contiguous.
at::Tensor rotate_first(const at::Tensor& x, const RotaryArgs& a) {
  return at::matmul(x.to(a.math), a.rotation).contiguous();
}

}  // namespace

at::Tensor rotary_op(const at::Tensor& x, const std::optional<at::Tensor>& inv_freq,
                     const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                     const std::optional<at::Tensor>& positions,
                     const std::optional<at::Tensor>& rotation, int64_t offset, bool interleaved,
                     int64_t rotary_dim) {
  const RotaryArgs a =
      check_args(x, inv_freq, cos, sin, positions, rotation, offset, interleaved, rotary_dim);
  // Contiguous, as the fake kernel says; large ones reuse released buffers (output_buffers.h).
  auto out = cpu::empty_output(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const at::Tensor src = a.rotation.defined() ? rotate_first(x, a) : x;
  kernel_apply(src, out, a, /*negate_sin=*/false, /*copy_rest=*/true);
  return out;
}

void rotary_inplace_op(const at::Tensor& x, const std::optional<at::Tensor>& inv_freq,
                       const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                       const std::optional<at::Tensor>& positions,
                       const std::optional<at::Tensor>& rotation, int64_t offset,
                       bool interleaved, int64_t rotary_dim) {
  const RotaryArgs a =
      check_args(x, inv_freq, cos, sin, positions, rotation, offset, interleaved, rotary_dim);
  // Two (b, h, s) rows sharing memory (an expanded tensor) would be written twice.
  at::assert_no_internal_overlap(x);
  // What the kernel reads while it writes x (as the kernel reads them: a converted copy of a
  // table does not share x's memory). The rotation is applied whole before x is written.
  check_no_overlap_with_x(x, a.inv_freq, "inv_freq");
  check_no_overlap_with_x(x, a.cos, "cos");
  check_no_overlap_with_x(x, a.sin, "sin");
  check_no_overlap_with_x(x, a.pos, "positions");
  if (x.numel() == 0) return;
  if (a.rotation.defined()) {
    // x @ rotation is computed whole before x is overwritten; its pass-through dims differ
    // from x's, so they are copied too.
    kernel_apply(rotate_first(x, a), x, a, /*negate_sin=*/false, /*copy_rest=*/true);
  } else {
    // In place: each chunk of a row is read before it is written; the pass-through dims stay.
    kernel_apply(x, x, a, /*negate_sin=*/false, /*copy_rest=*/false);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rotary_backward_op(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& inv_freq,
    const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
    const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& rotation,
    int64_t offset, bool interleaved, int64_t rotary_dim, std::array<bool, 4> output_mask) {
  const RotaryArgs a =
      check_args(x, inv_freq, cos, sin, positions, rotation, offset, interleaved, rotary_dim);
  check_rank(grad_out, 4, "grad_out");
  FA_CHECK_VALUE(grad_out.sizes() == x.sizes(), "fastattn: grad_out must have x's shape ", x.sizes(),
           ", got ", grad_out.sizes());
  check_same_dtype(grad_out, x, "grad_out", "x");
  check_same_device(grad_out, x, "grad_out", "x");
  // Autograd may hand over any strides (even expanded ones); the kernels need a unit last stride.
  const at::Tensor grad =
      (grad_out.size(-1) <= 1 || grad_out.stride(-1) == 1) ? grad_out : grad_out.contiguous();

  const bool need_x = output_mask[0];
  const bool need_freq = output_mask[1] && a.inv_freq.defined();
  const bool need_table = output_mask[2] && a.cos.defined();
  const bool need_rot = output_mask[3] && a.rotation.defined();
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = empty(), grad_freq = empty(), grad_cos = empty(), grad_sin = empty(),
             grad_rot = empty();

  // gsrc = dL/d(rope input): x's dtype without a rotation (it is grad_x), else the math dtype.
  const bool need_gsrc = need_x || need_rot;
  at::Tensor gsrc;
  if (need_gsrc) {
    gsrc = cpu::empty_output(x.sizes(), a.rotation.defined() ? x.options().dtype(a.math) : x.options());
  }
  const bool nonempty = x.numel() > 0;
  if ((need_freq || need_table) && !nonempty) {
    // No element of x: the angle gradients are zero, and no (B, S, half) partial is made.
    if (need_freq) grad_freq = at::zeros({a.half}, inv_freq->options());
    if (need_table) {
      grad_cos = at::zeros({a.cos.size(0), a.half}, cos->options());
      grad_sin = at::zeros({a.cos.size(0), a.half}, sin->options());
    }
  } else if (need_freq || need_table) {
    const at::Tensor xsrc = a.rotation.defined() ? rotate_first(x, a) : x;
    const auto opts = x.options().dtype(a.math);
    // The kernels write every (b, s) row of these.
    const auto make = [&] { return at::empty({a.B, a.S, a.half}, opts); };
    at::Tensor d_ang, d_cos, d_sin;
    if (need_freq) d_ang = make();
    if (need_table) {
      d_cos = make();
      d_sin = make();
    }
    kernel_backward_partials(grad, xsrc, gsrc, a, d_ang, d_cos, d_sin);
    // (arange(S) + offset: offset + S itself may be one past int64's range)
    const at::Tensor pos = a.pos.defined()
        ? a.pos
        : at::arange(a.S, x.options().dtype(at::kLong)).add_(a.offset).view({1, a.S});
    const auto pos_flat = pos.expand({a.B, a.S}).reshape({-1}).contiguous();
    if (need_freq) {
      grad_freq = kernel_reduce_freq(d_ang.view({a.B * a.S, a.half}), pos_flat)
                      .to(inv_freq->scalar_type());
    }
    if (need_table) {
      const int64_t rows = a.cos.size(0);
      grad_cos = kernel_scatter_table(d_cos.view({a.B * a.S, a.half}), pos_flat, rows)
                     .to(cos->scalar_type());
      grad_sin = kernel_scatter_table(d_sin.view({a.B * a.S, a.half}), pos_flat, rows)
                     .to(sin->scalar_type());
    }
  } else if (need_gsrc && nonempty) {
    // Only the input's gradient: the inverse rotation is the forward kernel with -sin.
    kernel_apply(grad, gsrc, a, /*negate_sin=*/true, /*copy_rest=*/true);
  }

  if (a.rotation.defined()) {
    // xr = x2d @ rotation  =>  grad_x2d = grad_xr @ rotation^T, grad_rotation = x2d^T @ grad_xr.
    const auto gsrc2d = need_gsrc ? gsrc.view({-1, a.D}) : at::Tensor();
    if (need_x) grad_x = at::matmul(gsrc2d, a.rotation.t()).view(x.sizes()).to(x.scalar_type());
    if (need_rot) {
      grad_rot =
          at::matmul(x.to(a.math).reshape({-1, a.D}).t(), gsrc2d).to(rotation->scalar_type());
    }
  } else if (need_x) {
    grad_x = gsrc;
  }
  return {grad_x, grad_freq, grad_cos, grad_sin, grad_rot};
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("rotary", &rotary_op);
  m.impl("rotary_", &rotary_inplace_op);
  m.impl("rotary_backward", &rotary_backward_op);
}

}  // namespace fastattn
