// Input checks shared by the CPU and CUDA implementations.
//
// The Python layer (fastattn/functional.py) validates user input first and raises
// ValueError/TypeError; these TORCH_CHECKs guard direct torch.ops.fastattn.* calls so that
// no kernel ever runs on a shape it would read out of bounds. Every message names the
// argument, what was expected and what was received.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstddef>
#include <cstdint>
#include <optional>

namespace fastattn {

// The checks are defined in checks.cpp, which the host C++ compiler builds: the formatting of
// their messages (iostreams) then never runs in nvcc-compiled code, where a toolchain whose
// host libstdc++ differs from the one loaded at run time crashed formatting an int64 (seen on
// an H100 build machine).
void check_rank(const at::Tensor& t, int64_t rank, const char* name);
void check_last_dim_contiguous(const at::Tensor& t, const char* name);
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name);
void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                      const char* ref_name);
void check_floating(const at::Tensor& t, const char* name);
void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name,
                const char* what);

// fastattn::attention's arguments (schema in fastattn.cpp), for every device: ranks, shapes,
// dtypes, devices and option ranges. Device-specific limits are checked by the device code.
void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& scale_tensor, int64_t window_left,
                          int64_t window_right, const std::optional<at::Tensor>& rel_bias,
                          const std::optional<at::Tensor>& alibi_slopes,
                          const std::optional<at::Tensor>& span, double span_ramp,
                          int64_t num_global, const std::optional<at::Tensor>& key_lengths);

// attention_backward's extra arguments: grad_out and out (B, Hq, Sq, Dv) like q's dtype and
// device, lse and grad_lse (B, Hq, Sq).
void check_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& out,
                                   const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
                                   const at::Tensor& q, const at::Tensor& v);

// What the CUDA attention kernels support: a CUDA q (unless emulated), float32/16/bfloat16
// (16-bit types on sm_80+), head dims up to max_head_dim.
void check_cuda_attention_support(const at::Tensor& q, const at::Tensor& v, int64_t max_head_dim,
                                  int cc_major, int cc_minor, bool emulation);

// A kernel launch's grid and shared memory fit the device.
void check_launch_limits(const char* kernel, int64_t blocks, size_t smem_bytes,
                         size_t max_smem_bytes);

// Small parameter tensors (bias tables, slopes, spans) are read by the kernels as contiguous
// fp32 whatever their storage dtype: they are tiny next to q/k/v, and the math is fp32.
inline at::Tensor as_fp32_contiguous(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous();
}

// An optional tensor that is present and non-empty.
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace fastattn
