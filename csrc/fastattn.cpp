// The one list of fastattn's ops. Each device registers its kernels in its own file
// (csrc/cpu/*.cpp: CPU, csrc/cuda/*_api.cu: CUDA); fake (meta) kernels and autograd are
// registered from Python in fastattn/ops.py.
//
// Conventions:
//  - Backward kernels are ops of their own (`*_backward`), so torch.compile and opcheck see
//    them; gradients that are not requested come back as empty (numel 0) tensors.
//  - Optional inputs are `Tensor?`; scalars that may be learnable come as a float plus an
//    optional 0-dim tensor that, when given, overrides the float.
#include <torch/library.h>

#include <string>

#include "common/build_info.h"

TORCH_LIBRARY(fastattn, m) {
  // ---- rotary embedding -------------------------------------------------------------------
  // y = rope(x @ rotation) (rotation optional). Angles: positions * inv_freq, or cos/sin tables
  // (S_max, rotary_dim / 2) indexed by position. positions: (S,) or (B, S) int64; when absent,
  // offset + arange(S).
  m.def(
      "rotary(Tensor x, Tensor? inv_freq, Tensor? cos, Tensor? sin, Tensor? positions, "
      "Tensor? rotation, int offset, bool interleaved, int rotary_dim) -> Tensor");
  // In-place variant: writes the result into x (x must not require grad).
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
  // Returns (out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) fp32; -inf for empty rows).
  // See common/attention_params.h for the mask and bias rules.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? scale_tensor, bool causal, "
      "int window_left, int window_right, Tensor? rel_bias, Tensor? alibi_slopes, Tensor? span, "
      "float span_ramp, int num_global, Tensor? key_lengths) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v, grad_rel_bias, grad_span); grad_rel_bias / grad_span are
  // empty unless asked for. grad_rel_bias is reduced in a fixed order (deterministic).
  // grad_lse (B, Hq, Sq) fp32, optional: the gradient reaching lse when the caller used it
  // (it enters as D_i = rowsum(dO * O) - grad_lse_i).
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? grad_lse, float scale, Tensor? scale_tensor, bool causal, int window_left, "
      "int window_right, Tensor? rel_bias, Tensor? alibi_slopes, Tensor? span, float span_ramp, "
      "int num_global, Tensor? key_lengths, bool need_rel_bias_grad, bool need_span_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- build information ------------------------------------------------------------------
  m.def("build_info() -> str", [] { return std::string(fastattn::build_info_string()); });
}
