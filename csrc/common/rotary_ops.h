// Declarations shared by the rotary op's two files: csrc/cpu/rotary.cpp defines the
// device-generic op bodies (argument checks, autograd-facing outputs) and the CPU passes;
// csrc/cuda/rotary_api.cu defines the CUDA passes and registers the op bodies for CUDA.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace fastattn {

// The op bodies (schemas in csrc/fastattn.cpp), for tensors of either device.
at::Tensor rotary_op(const at::Tensor& x, const std::optional<at::Tensor>& inv_freq,
                     const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                     const std::optional<at::Tensor>& positions,
                     const std::optional<at::Tensor>& rotation, int64_t offset, bool interleaved,
                     int64_t rotary_dim);
void rotary_inplace_op(const at::Tensor& x, const std::optional<at::Tensor>& inv_freq,
                       const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                       const std::optional<at::Tensor>& positions,
                       const std::optional<at::Tensor>& rotation, int64_t offset,
                       bool interleaved, int64_t rotary_dim);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rotary_backward_op(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& inv_freq,
    const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
    const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& rotation,
    int64_t offset, bool interleaved, int64_t rotary_dim, std::array<bool, 4> output_mask);

// The CUDA passes (the arguments of the rotary_cpu ones in csrc/cpu/rotary.cpp, except that
// `pos` may be undefined: the positions are then pos_offset + s, with no tensor to launch for).
namespace rotary_cuda {
void apply(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& inv_freq,
           const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
           int64_t pos_offset, bool negate_sin, bool interleaved, int64_t rd, bool copy_rest);
void backward_partials(const at::Tensor& grad, const at::Tensor& xsrc, const at::Tensor& gx,
                       const at::Tensor& inv_freq, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& pos, int64_t pos_offset, bool interleaved, int64_t rd,
                       const at::Tensor& d_ang, const at::Tensor& d_cos, const at::Tensor& d_sin);
at::Tensor reduce_freq(const at::Tensor& d_ang, const at::Tensor& pos_flat);
at::Tensor scatter_table(const at::Tensor& d, const at::Tensor& pos_flat, int64_t rows_table);
}  // namespace rotary_cuda

}  // namespace fastattn
