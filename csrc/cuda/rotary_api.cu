// CUDA side of the rotary op: the four device passes the device-generic op logic in
// csrc/cpu/rotary.cpp hands over (apply, backward_partials, reduce_freq, scatter_table), and
// the CUDA registration of the three ops. Kernels: csrc/cuda/rotary_kernel.cuh.
//
// float32, float16 and bfloat16 (fp32 math); float64 is rejected before anything runs here.
// The table gradients are deterministic: per-(b, s, pair) sums over heads in head order, then
// a two-stage fixed-order reduction (inv_freq) or a sorted, run-by-run sum (cos/sin tables).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/rotary_ops.h"
#include "cuda/rotary_kernel.cuh"

namespace fastattn {

namespace rotary_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535;

// The kernels' view of the angle sources: inv_freq, or the cos/sin tables (both fp32 and
// contiguous, as rotary.cpp's argument normalization leaves them), and the positions: a tensor,
// or (pos undefined) pos_offset + s.
AngleSource angle_source(const at::Tensor& inv_freq, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& pos, int64_t pos_offset) {
  AngleSource a{};
  if (inv_freq.defined()) {
    a.inv_freq = inv_freq.const_data_ptr<float>();
  } else {
    a.cos = cos.const_data_ptr<float>();
    a.sin = sin.const_data_ptr<float>();
    a.rows = cos.size(0);
  }
  if (pos.defined()) {
    a.pos = pos.const_data_ptr<int64_t>();
    a.per_batch = pos.size(0) != 1;
  } else {
    a.pos = nullptr;
    a.pos_offset = pos_offset;
  }
  return a;
}

RowStrides row_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

// Can a (B, H, S, D) tensor be read in packs of n elements from every row start + k * n?
bool packable(const at::Tensor& t, int64_t n, int64_t elem_bytes) {
  return aligned(t.data_ptr(), n * elem_bytes) && t.stride(0) % n == 0 && t.stride(1) % n == 0 &&
         t.stride(2) % n == 0;
}

// Threads per row = chunks (a power of two up to 64), the rest of the 256 over rows of s.
dim3 block_for(int n_chunks) {
  int tx = 1;
  while (tx < n_chunks && tx < 64) tx *= 2;
  return dim3(tx, kThreads / tx);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename src_t, typename dst_t, int N, bool VEC, bool INTERLEAVED>
void launch_apply(ApplyParams p) {
  using C = Chunking<N, VEC, INTERLEAVED>;
  const int n_chunks = p.half / C::kPairs + (p.copy_rest ? (p.D - p.rd) / C::kPass : 0);
  if (n_chunks == 0 || p.S == 0 || p.B * p.H == 0) return;
  const dim3 block = block_for(n_chunks);
  const int64_t s_tiles = std::min<int64_t>(ceil_div(p.S, block.y), std::numeric_limits<int>::max());
  const int64_t b_blocks = std::min(p.B, kMaxGrid);
  // Split the heads into groups (blockIdx.z) until there are about 16 blocks per SM: fewer
  // groups means each thread's angles serve more heads, more means enough blocks in flight.
  const int64_t want_blocks = 16 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  int64_t groups = std::clamp<int64_t>(ceil_div(want_blocks, s_tiles * b_blocks), 1, p.H);
  p.heads_per_block = ceil_div(p.H, groups);
  if (p.heads_per_block > kHeadBatch) {  // whole batches of heads per group where there are several
    p.heads_per_block = ceil_div(p.heads_per_block, kHeadBatch) * kHeadBatch;
  }
  groups = ceil_div(p.H, p.heads_per_block);
  while (groups > kMaxGrid) {
    p.heads_per_block *= 2;
    groups = ceil_div(p.H, p.heads_per_block);
  }
  const dim3 grid(static_cast<unsigned>(s_tiles), static_cast<unsigned>(b_blocks),
                  static_cast<unsigned>(groups));
  rope_apply_kernel<src_t, dst_t, N, VEC, INTERLEAVED>
      <<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename src_t, typename dst_t>
void apply_typed(const at::Tensor& src, const at::Tensor& dst, ApplyParams p, bool interleaved) {
  // 16-byte packs of the wider of the two types.
  constexpr int N = static_cast<int>(16 / std::max(sizeof(src_t), sizeof(dst_t)));
  const bool vec = packable(src, N, sizeof(src_t)) && packable(dst, N, sizeof(dst_t)) &&
                   (interleaved ? p.rd % N == 0 : p.half % N == 0) &&
                   (!p.copy_rest || (p.D - p.rd) % N == 0);
  p.src = src.data_ptr();
  p.dst = dst.data_ptr();
  if (interleaved) {
    if (vec) {
      launch_apply<src_t, dst_t, N, true, true>(p);
    } else {
      launch_apply<src_t, dst_t, 2, false, true>(p);
    }
  } else if (vec) {
    launch_apply<src_t, dst_t, N, true, false>(p);
  } else {
    launch_apply<src_t, dst_t, 1, false, false>(p);
  }
}

template <typename g_t, typename x_t, typename gx_t, int N, bool VEC, bool INTERLEAVED>
void launch_backward(const BackwardParams& p) {
  using C = Chunking<N, VEC, INTERLEAVED>;
  const int n_chunks = p.half / C::kPairs + (p.gx != nullptr ? (p.D - p.rd) / C::kPass : 0);
  if (n_chunks == 0 || p.S == 0 || p.B == 0) return;
  const dim3 block = block_for(n_chunks);
  const dim3 grid(static_cast<unsigned>(std::min(ceil_div(p.S, block.y), kMaxGrid)),
                  static_cast<unsigned>(std::min(p.B, kMaxGrid)));
  rope_backward_kernel<g_t, x_t, gx_t, N, VEC, INTERLEAVED>
      <<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename g_t, typename x_t, typename gx_t>
void backward_typed(const at::Tensor& grad, const at::Tensor& xsrc, const at::Tensor& gx,
                    BackwardParams p, bool interleaved) {
  constexpr int N =
      static_cast<int>(16 / std::max(sizeof(g_t), std::max(sizeof(x_t), sizeof(gx_t))));
  const bool vec = packable(grad, N, sizeof(g_t)) && packable(xsrc, N, sizeof(x_t)) &&
                   (!gx.defined() || packable(gx, N, sizeof(gx_t))) &&
                   (interleaved ? p.rd % N == 0 : p.half % N == 0) &&
                   (!gx.defined() || (p.D - p.rd) % N == 0);
  p.grad = grad.data_ptr();
  p.x = xsrc.data_ptr();
  p.gx = gx.defined() ? gx.data_ptr() : nullptr;
  if (interleaved) {
    if (vec) {
      launch_backward<g_t, x_t, gx_t, N, true, true>(p);
    } else {
      launch_backward<g_t, x_t, gx_t, 2, false, true>(p);
    }
  } else if (vec) {
    launch_backward<g_t, x_t, gx_t, N, true, false>(p);
  } else {
    launch_backward<g_t, x_t, gx_t, 1, false, false>(p);
  }
}

// Without a positions tensor the kernels compute position pos_offset + s in int64. The op's
// checks (csrc/cpu/rotary.cpp) keep that from overflowing; checked again here, where it is used.
void check_pos_offset(const at::Tensor& pos, int64_t pos_offset, int64_t S) {
  FA_CHECK_VALUE(pos.defined() || S == 0 ||
                     pos_offset <= std::numeric_limits<int64_t>::max() - (S - 1),
                 "fastattn: positions offset..offset+S-1 (offset = ", pos_offset, ", S = ", S,
                 ") overflow int64");
}

void check_cuda_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "fastattn: rotary's CUDA ",
           "kernel supports float32, float16 and bfloat16; ", name, " is ", dt);
}

}  // namespace

void apply(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& inv_freq,
           const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
           int64_t pos_offset, bool negate_sin, bool interleaved, int64_t rd, bool copy_rest) {
  check_cuda_dtype(src, "x");
  check_cuda_dtype(dst, "the output");
  TORCH_CHECK(src.size(3) <= std::numeric_limits<int>::max(), "fastattn: head dim too large");
  check_pos_offset(pos, pos_offset, src.size(2));
  if (src.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(src.device());
  ApplyParams p{};
  p.src_st = row_strides(src);
  p.dst_st = row_strides(dst);
  p.B = src.size(0);
  p.H = src.size(1);
  p.S = src.size(2);
  p.D = static_cast<int>(src.size(3));
  p.rd = static_cast<int>(rd);
  p.half = static_cast<int>(rd / 2);
  p.angles = angle_source(inv_freq, cos, sin, pos, pos_offset);
  p.negate_sin = negate_sin;
  p.copy_rest = copy_rest;
  const auto st = src.scalar_type(), dt = dst.scalar_type();
  if (st == dt) {
    FASTATTN_DISPATCH_CUDA_FLOATING(dt, "fastattn::rotary (cuda)", [&] {
      apply_typed<scalar_t, scalar_t>(src, dst, p, interleaved);
    });
  } else if (st == at::kFloat) {
    // x @ rotation (float32) into a half/bfloat16 output: the forward with a learned rotation.
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dt, "fastattn::rotary (cuda)", [&] {
      apply_typed<float, scalar_t>(src, dst, p, interleaved);
    });
  } else {
    // A half/bfloat16 gradient into a float32 buffer: the backward with a learned rotation.
    FA_CHECK(dt == at::kFloat, "fastattn: rotary: no CUDA kernel from ", st, " to ", dt);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "fastattn::rotary (cuda)", [&] {
      apply_typed<scalar_t, float>(src, dst, p, interleaved);
    });
  }
}

void backward_partials(const at::Tensor& grad, const at::Tensor& xsrc, const at::Tensor& gx,
                       const at::Tensor& inv_freq, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& pos, int64_t pos_offset, bool interleaved, int64_t rd,
                       const at::Tensor& d_ang, const at::Tensor& d_cos, const at::Tensor& d_sin) {
  check_cuda_dtype(grad, "grad_out");
  TORCH_CHECK(grad.size(3) <= std::numeric_limits<int>::max(), "fastattn: head dim too large");
  check_pos_offset(pos, pos_offset, grad.size(2));
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  BackwardParams p{};
  p.g_st = row_strides(grad);
  p.x_st = row_strides(xsrc);
  p.gx_st = gx.defined() ? row_strides(gx) : p.g_st;
  p.B = grad.size(0);
  p.H = grad.size(1);
  p.S = grad.size(2);
  p.D = static_cast<int>(grad.size(3));
  p.rd = static_cast<int>(rd);
  p.half = static_cast<int>(rd / 2);
  p.angles = angle_source(inv_freq, cos, sin, pos, pos_offset);
  p.d_ang = d_ang.defined() ? d_ang.data_ptr<float>() : nullptr;
  p.d_cos = d_cos.defined() ? d_cos.data_ptr<float>() : nullptr;
  p.d_sin = d_sin.defined() ? d_sin.data_ptr<float>() : nullptr;
  const auto gt = grad.scalar_type();
  FASTATTN_DISPATCH_CUDA_FLOATING(gt, "fastattn::rotary_backward (cuda)", [&] {
    if (xsrc.scalar_type() == gt) {
      // No learned rotation: x and dL/dx are in x's dtype.
      backward_typed<scalar_t, scalar_t, scalar_t>(grad, xsrc, gx, p, interleaved);
    } else {
      // With a learned rotation, x @ rotation and its gradient are float32.
      FA_CHECK(xsrc.scalar_type() == at::kFloat, "fastattn: rotary_backward: unexpected dtype ",
               xsrc.scalar_type());
      backward_typed<scalar_t, float, float>(grad, xsrc, gx, p, interleaved);
    }
  });
}

at::Tensor reduce_freq(const at::Tensor& d_ang, const at::Tensor& pos_flat) {
  const int64_t rows = d_ang.size(0), half = d_ang.size(1);
  auto out = at::zeros({half}, d_ang.options());
  if (rows == 0 || half == 0) return out;
  const c10::cuda::CUDAGuard guard(d_ang.device());
  // Groups of rows depend on the shape only, so the summation order is fixed.
  const int64_t groups = std::min<int64_t>(ceil_div(rows, 1024), 4096);
  const int64_t rows_per_group = ceil_div(rows, groups);
  auto partial = at::empty({groups, half}, d_ang.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid1(static_cast<unsigned>(ceil_div(half, kFreqCols)), static_cast<unsigned>(groups));
  reduce_freq_partial_kernel<<<grid1, dim3(kFreqCols, kFreqRowThreads), 0, stream>>>(
      d_ang.const_data_ptr<float>(), pos_flat.const_data_ptr<int64_t>(), rows,
      static_cast<int>(half), rows_per_group, partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_freq_final_kernel<<<static_cast<unsigned>(ceil_div(half, 128)), 128, 0, stream>>>(
      partial.const_data_ptr<double>(), groups, static_cast<int>(half), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor scatter_table(const at::Tensor& d, const at::Tensor& pos_flat, int64_t rows_table) {
  const int64_t rows = d.size(0), half = d.size(1);
  auto out = at::zeros({rows_table, half}, d.options());
  if (rows == 0 || half == 0 || rows_table == 0) return out;
  const c10::cuda::CUDAGuard guard(d.device());
  // A stable sort keeps equal positions in (b, s) order: the sums below run in that order.
  const auto sorted = at::sort(pos_flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto& sorted_pos = std::get<0>(sorted);
  const auto& order = std::get<1>(sorted);
  const int64_t total = rows * half;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kThreads), kMaxGrid));
  scatter_table_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      d.const_data_ptr<float>(), sorted_pos.const_data_ptr<int64_t>(),
      order.const_data_ptr<int64_t>(), rows, static_cast<int>(half), rows_table,
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace rotary_cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("rotary", &rotary_op);
  m.impl("rotary_", &rotary_inplace_op);
  m.impl("rotary_backward", &rotary_backward_op);
}

}  // namespace fastattn
