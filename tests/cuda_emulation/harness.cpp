// Registers the CUDA attention implementation, run on the CPU emulator, as the ops
// fastattn_emu::attention / attention_backward (CPU tensors stand in for device memory).
#include "cuda/attention_api.cu"

#include <torch/library.h>

TORCH_LIBRARY(fastattn_emu, m) {
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? scale_tensor, bool causal, "
      "int window_left, int window_right, Tensor? rel_bias, Tensor? alibi_slopes, Tensor? span, "
      "float span_ramp, int num_global, Tensor? key_lengths) -> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? grad_lse, float scale, Tensor? scale_tensor, bool causal, int window_left, "
      "int window_right, Tensor? rel_bias, Tensor? alibi_slopes, Tensor? span, float span_ramp, "
      "int num_global, Tensor? key_lengths, bool need_rel_bias_grad, bool need_span_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("launches() -> int", [] { return fastattn::cuda_attn::g_launches; });
  m.def("blocks() -> int", [] { return fastattn::cuda_attn::g_blocks; });
  m.def("barriers() -> int", [] { return fastattn_emulation::g_barriers; });
}

TORCH_LIBRARY_IMPL(fastattn_emu, CPU, m) {
  m.impl("attention", &fastattn::cuda_attn::attention_cuda);
  m.impl("attention_backward", &fastattn::cuda_attn::attention_backward_cuda);
}
