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

namespace fastattn {

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name) {
  TORCH_CHECK(t.dim() == rank, "fastattn: ", name, " must have ", rank,
              " dimensions, got ", t.dim(), " (shape ", t.sizes(), ")");
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "fastattn: ", name,
              " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "fastattn: ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastattn: ", name,
              " must have the same dtype as ", ref_name, " (", ref.scalar_type(), "), got ",
              t.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "fastattn: ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, "fastattn: ", name, " dimension ", dim, " (", what,
              ") must be ", expected, ", got ", t.size(dim), " (shape ", t.sizes(), ")");
}

// Small parameter tensors (bias tables, slopes, spans) are read by the kernels as contiguous
// fp32 whatever their storage dtype: they are tiny next to q/k/v, and the math is fp32.
inline at::Tensor as_fp32_contiguous(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous();
}

// An optional tensor that is present and non-empty.
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace fastattn
