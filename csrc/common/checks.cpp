// Definitions of the input checks declared in checks.h. Their messages go through FA_CHECK
// (fa_message), never iostreams: see checks.h.
#include "common/checks.h"

#include <limits>

namespace fastattn {

void check_rank(const at::Tensor& t, int64_t rank, const char* name) {
  FA_CHECK_VALUE(t.dim() == rank, "fastattn: ", name, " must have ", rank,
           " dimensions, got ", t.dim(), " (shape ", t.sizes(), ")");
}

void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  FA_CHECK_VALUE(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "fastattn: ", name,
           " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  FA_CHECK_VALUE(t.device() == ref.device(), "fastattn: ", name, " must be on the same device as ",
           ref_name, " (", ref.device(), "), got ", t.device());
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                      const char* ref_name) {
  FA_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "fastattn: ", name,
           " must have the same dtype as ", ref_name, " (", ref.scalar_type(), "), got ",
           t.scalar_type());
}

void check_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  FA_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
           "fastattn: ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name,
                const char* what) {
  FA_CHECK_VALUE(t.size(dim) == expected, "fastattn: ", name, " dimension ", dim, " (", what,
           ") must be ", expected, ", got ", t.size(dim), " (shape ", t.sizes(), ")");
}

void check_cuda_attention_support(const at::Tensor& q, const at::Tensor& v, int64_t max_head_dim,
                                  int cc_major, int cc_minor, bool emulation) {
  FA_CHECK(q.is_cuda() || emulation, "fastattn: q must be a CUDA tensor here, got ", q.device());
  FA_CHECK_TYPE(q.scalar_type() != at::kDouble,
           "fastattn: float64 attention is CPU-only; on CUDA use float32, float16 or "
           "bfloat16 (got q of dtype ", q.scalar_type(), ")");
  if (q.scalar_type() != at::kFloat) {
    FA_CHECK(cc_major >= 8, "fastattn: float16/bfloat16 attention on CUDA uses sm_80 "
             "tensor-core instructions and needs compute capability 8.0 or newer; this GPU is "
             "sm_", cc_major, cc_minor, ". Use float32 inputs or the CPU.");
  }
  const int64_t Dqk = q.size(3), Dv = v.size(3);
  FA_CHECK_VALUE(Dqk <= max_head_dim && Dv <= max_head_dim,
           "fastattn: the CUDA attention kernels support head dims up to ", max_head_dim,
           " (any size, padded to 32, 64, 96, 128 or 256), got Dqk = ", Dqk, " and Dv = ", Dv);
}

void check_launch_limits(const char* kernel, int64_t blocks, size_t smem_bytes,
                         size_t max_smem_bytes) {
  FA_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fastattn: ", kernel, " needs ",
           blocks, " thread blocks, more than CUDA allows (2^31 - 1); split the batch");
  FA_CHECK(smem_bytes <= max_smem_bytes, "fastattn: ", kernel, " needs ", smem_bytes,
           " bytes of shared memory per block and this GPU allows ", max_smem_bytes,
           "; use a smaller head dim, or float16/bfloat16 instead of float32");
}

}  // namespace fastattn
