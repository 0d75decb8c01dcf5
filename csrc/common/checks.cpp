// Definitions of the input checks declared in checks.h. Their messages go through FA_CHECK
// (fa_message), never iostreams: see checks.h.
#include "common/checks.h"

#include <limits>

namespace fastattn {

void check_rank(const at::Tensor& t, int64_t rank, const char* name) {
  FA_CHECK(t.dim() == rank, "fastattn: ", name, " must have ", rank,
           " dimensions, got ", t.dim(), " (shape ", t.sizes(), ")");
}

void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  FA_CHECK(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "fastattn: ", name,
           " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  FA_CHECK(t.device() == ref.device(), "fastattn: ", name, " must be on the same device as ",
           ref_name, " (", ref.device(), "), got ", t.device());
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                      const char* ref_name) {
  FA_CHECK(t.scalar_type() == ref.scalar_type(), "fastattn: ", name,
           " must have the same dtype as ", ref_name, " (", ref.scalar_type(), "), got ",
           t.scalar_type());
}

void check_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
           "fastattn: ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name,
                const char* what) {
  FA_CHECK(t.size(dim) == expected, "fastattn: ", name, " dimension ", dim, " (", what,
           ") must be ", expected, ", got ", t.size(dim), " (shape ", t.sizes(), ")");
}

void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& scale_tensor, int64_t window_left,
                          int64_t window_right, const std::optional<at::Tensor>& rel_bias,
                          const std::optional<at::Tensor>& alibi_slopes,
                          const std::optional<at::Tensor>& span, double span_ramp,
                          int64_t num_global, const std::optional<at::Tensor>& key_lengths) {
  check_rank(q, 4, "q");
  check_rank(k, 4, "k");
  check_rank(v, 4, "v");
  check_floating(q, "q");
  check_same_dtype(k, q, "k", "q");
  check_same_dtype(v, q, "v", "q");
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  const int64_t B = q.size(0), Hq = q.size(1), Dqk = q.size(3);
  check_size(k, 0, B, "k", "batch");
  check_size(v, 0, B, "v", "batch");
  check_size(k, 3, Dqk, "k", "head dim, must equal q's");
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  check_size(v, 1, Hkv, "v", "heads, must equal k's");
  check_size(v, 2, Sk, "v", "sequence length, must equal k's");
  FA_CHECK(Hkv > 0 && Hq % Hkv == 0, "fastattn: q's heads (", Hq,
           ") must be a multiple of k/v's heads (", Hkv, ")");
  if (present(scale_tensor)) {
    FA_CHECK(scale_tensor->numel() == 1, "fastattn: scale_tensor must hold one value, got shape ",
             scale_tensor->sizes());
    check_floating(*scale_tensor, "scale_tensor");
    // A CPU scale is read on the host (no device sync); elsewhere it must sit with q.
    if (!scale_tensor->is_cpu()) check_same_device(*scale_tensor, q, "scale_tensor", "q");
  }
  FA_CHECK(window_left >= -1 && window_right >= -1,
           "fastattn: window entries must be >= -1 (-1 = unbounded), got (", window_left, ", ",
           window_right, ")");
  if (present(rel_bias)) {
    check_rank(*rel_bias, 2, "rel_bias");
    check_floating(*rel_bias, "rel_bias");
    check_same_device(*rel_bias, q, "rel_bias", "q");
    FA_CHECK(rel_bias->size(0) % 2 == 1, "fastattn: rel_bias must be (2 * max_dist - 1, Hq): ",
             "its first dim must be odd, got shape ", rel_bias->sizes());
    check_size(*rel_bias, 1, Hq, "rel_bias", "one column per query head");
  }
  if (present(alibi_slopes)) {
    check_rank(*alibi_slopes, 1, "alibi_slopes");
    check_floating(*alibi_slopes, "alibi_slopes");
    check_same_device(*alibi_slopes, q, "alibi_slopes", "q");
    check_size(*alibi_slopes, 0, Hq, "alibi_slopes", "query heads");
  }
  if (present(span)) {
    check_floating(*span, "span");
    check_same_device(*span, q, "span", "q");
    const bool per_batch = span->dim() == 2 && span->size(0) == B && span->size(1) == Hq;
    const bool per_head = span->dim() == 1 && span->size(0) == Hq;
    FA_CHECK(per_batch || per_head, "fastattn: span must be (B, Hq) = (", B, ", ", Hq,
             ") or (Hq,) = (", Hq, ",), got shape ", span->sizes());
    FA_CHECK(span_ramp > 0, "fastattn: span_ramp must be > 0, got ", span_ramp);
  }
  FA_CHECK(num_global >= 0 && num_global <= Sk, "fastattn: num_global must be in [0, Sk=", Sk,
           "], got ", num_global);
  if (present(key_lengths)) {
    check_rank(*key_lengths, 1, "key_lengths");
    check_same_device(*key_lengths, q, "key_lengths", "q");
    FA_CHECK(key_lengths->scalar_type() == at::kLong || key_lengths->scalar_type() == at::kInt,
             "fastattn: key_lengths must be int64 or int32, got ", key_lengths->scalar_type());
    check_size(*key_lengths, 0, B, "key_lengths", "batch");
  }
}

void check_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& out,
                                   const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
                                   const at::Tensor& q, const at::Tensor& v) {
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  const std::vector<int64_t> lse_shape{q.size(0), q.size(1), q.size(2)};
  check_rank(grad_out, 4, "grad_out");
  check_rank(out, 4, "out");
  FA_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape), "fastattn: grad_out must have shape ",
           at::IntArrayRef(out_shape), " (B, Hq, Sq, Dv), got ", grad_out.sizes());
  FA_CHECK(out.sizes() == at::IntArrayRef(out_shape), "fastattn: out must have shape ",
           at::IntArrayRef(out_shape), " (B, Hq, Sq, Dv), got ", out.sizes());
  check_same_dtype(grad_out, q, "grad_out", "q");
  check_same_dtype(out, q, "out", "q");
  check_same_device(grad_out, q, "grad_out", "q");
  check_same_device(out, q, "out", "q");
  FA_CHECK(lse.sizes() == at::IntArrayRef(lse_shape), "fastattn: lse must have shape ",
           at::IntArrayRef(lse_shape), " (B, Hq, Sq), got ", lse.sizes());
  check_floating(lse, "lse");
  check_same_device(lse, q, "lse", "q");
  if (present(grad_lse)) {
    FA_CHECK(grad_lse->sizes() == at::IntArrayRef(lse_shape), "fastattn: grad_lse must have shape ",
             at::IntArrayRef(lse_shape), " (B, Hq, Sq), got ", grad_lse->sizes());
    check_floating(*grad_lse, "grad_lse");
    check_same_device(*grad_lse, q, "grad_lse", "q");
  }
}

void check_cuda_attention_support(const at::Tensor& q, const at::Tensor& v, int64_t max_head_dim,
                                  int cc_major, int cc_minor, bool emulation) {
  FA_CHECK(q.is_cuda() || emulation, "fastattn: q must be a CUDA tensor here, got ", q.device());
  FA_CHECK(q.scalar_type() != at::kDouble,
           "fastattn: float64 attention is CPU-only; on CUDA use float32, float16 or "
           "bfloat16 (got q of dtype ", q.scalar_type(), ")");
  if (q.scalar_type() != at::kFloat) {
    FA_CHECK(cc_major >= 8, "fastattn: float16/bfloat16 attention on CUDA uses sm_80 "
             "tensor-core instructions and needs compute capability 8.0 or newer; this GPU is "
             "sm_", cc_major, cc_minor, ". Use float32 inputs or the CPU.");
  }
  const int64_t Dqk = q.size(3), Dv = v.size(3);
  FA_CHECK(Dqk <= max_head_dim && Dv <= max_head_dim,
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
