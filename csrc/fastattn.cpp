// The one list of fastattn's ops. Each device registers its kernels in its own file
// (csrc/cpu/*.cpp: CPU, csrc/cuda/*_api.cu: CUDA); fake (meta) kernels are registered from
// Python in fastattn/ops.py, autograd in C++ (common/autograd.cpp, registered below).
//
// Conventions:
//  - Backward kernels are ops of their own (`*_backward`), so torch.compile and opcheck see
//    them; gradients that are not requested come back as empty (numel 0) tensors.
//  - Optional inputs are `Tensor?`; scalars that may be learnable come as a float plus an
//    optional 0-dim tensor that, when given, overrides the float.
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/attention_args.h"
#include "common/attention_varlen.h"
#include "common/build_info.h"
#include "common/cuda_tuning.h"
#include "cpu/output_buffers.h"

TORCH_LIBRARY(fastattn, m) {
  // ---- rotary embedding -------------------------------------------------------------------
  // y = rope(x @ rotation) (rotation optional). Angles: positions * inv_freq, or cos/sin tables
  // (S_max, rotary_dim / 2) indexed by position. positions: (S,) or (B, S) int64; when absent,
  // offset + arange(S).
  m.def(
      "rotary(Tensor x, Tensor? inv_freq, Tensor? cos, Tensor? sin, Tensor? positions, "
      "Tensor? rotation, int offset, bool interleaved, int rotary_dim) -> Tensor");
  // In-place variant: writes the result into x (nothing may require grad; it bumps x's version).
  m.def(
      "rotary_(Tensor(a!) x, Tensor? inv_freq, Tensor? cos, Tensor? sin, Tensor? positions, "
      "Tensor? rotation, int offset, bool interleaved, int rotary_dim) -> ()");
  // Returns (grad_x, grad_inv_freq, grad_cos, grad_sin, grad_rotation).
  // output_mask = [x, inv_freq, cos/sin, rotation].
  m.def(
      "rotary_backward(Tensor grad_out, Tensor x, Tensor? inv_freq, Tensor? cos, Tensor? sin, "
      "Tensor? positions, Tensor? rotation, int offset, bool interleaved, int rotary_dim, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- attention --------------------------------------------------------------------------
  // attention(<args>) -> (out, lse) and attention_backward: their schemas, argument struct and
  // checks are in common/attention_args.{h,cpp}.
  fastattn::define_attention_ops(m);
  // attention_varlen(<cu_seqlens, max_seqlen>, <args>) -> (out, lse) over packed sequences, and
  // its backward: common/attention_varlen.{h,cpp}.
  fastattn::define_attention_varlen_ops(m);
  // The CUDA kernels' switches for tests and profiling (common/cuda_tuning.h).
  fastattn::define_cuda_tuning_ops(m);

  // ---- the CPU output-buffer cache (cpu/output_buffers.h) ------------------------------------
  // Frees the buffers it holds (fastattn.empty_cache()).
  m.def("_empty_cpu_cache() -> ()", [] { fastattn::cpu::empty_output_cache(); });
  // (buffers held, bytes held, the most bytes it may hold now): for tests and diagnostics.
  m.def("_cpu_cache_stats() -> int[]", [] {
    const fastattn::cpu::OutputCacheStats s = fastattn::cpu::output_cache_stats();
    return std::vector<int64_t>{s.buffers, s.bytes, s.cap_bytes};
  });

  // ---- build information ------------------------------------------------------------------
  m.def("build_info() -> str", [] { return std::string(fastattn::build_info_string()); });
}

namespace fastattn {
void register_rotary_autograd(torch::Library& m);
void register_rotary_inplace_or_view(torch::Library& m);
}

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  fastattn::register_rotary_autograd(m);
  fastattn::register_attention_autograd(m);
  fastattn::register_attention_varlen_autograd(m);
}

// attention_varlen's kernels call the attention op's: one device-generic pair, registered here
// for the CPU and in cuda/attention_api.cu for CUDA.
TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  fastattn::register_attention_varlen_kernels(m, /*cpu_kernels=*/true);
}

// rotary_ bumps x's version counter and refuses inference tensors outside inference mode, as
// PyTorch's in-place ops do (common/autograd.cpp).
TORCH_LIBRARY_IMPL(fastattn, ADInplaceOrView, m) { fastattn::register_rotary_inplace_or_view(m); }
