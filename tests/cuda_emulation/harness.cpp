// Registers the CUDA attention implementation, run on the CPU emulator, as the ops
// fastattn_emu::attention / attention_backward (CPU tensors stand in for device memory), and
// attention_varlen / attention_varlen_backward on them as CUDA registers it, with
// the same schemas (common/attention_args.cpp: define_attention_ops) and the same autograd
// function (common/autograd.cpp) as fastattn::attention.
#include "cuda/attention_api.cu"

#include <torch/library.h>

#include "common/attention_args.h"
#include "common/attention_varlen.h"
#include "common/cuda_tuning.h"

TORCH_LIBRARY(fastattn_emu, m) {
  fastattn::define_attention_ops(m);
  fastattn::define_attention_varlen_ops(m);
  fastattn::define_cuda_tuning_ops(m);
  m.def("launches() -> int", [] { return fastattn::cuda_attn::g_launches; });
  m.def("blocks() -> int", [] { return fastattn::cuda_attn::g_blocks; });
  m.def("barriers() -> int", [] { return fastattn_emulation::g_barriers; });
  m.def("mmas() -> int", [] { return fastattn_emulation::g_mmas; });
}

TORCH_LIBRARY_IMPL(fastattn_emu, CPU, m) {
  fastattn::register_attention_kernels<&fastattn::cuda_attn::attention_cuda,
                                       &fastattn::cuda_attn::attention_backward_cuda>(m);
  // attention_varlen as registered for CUDA: the packed views go to the kernels as they are
  fastattn::register_attention_varlen_kernels(m, /*cpu_kernels=*/false);
}

TORCH_LIBRARY_IMPL(fastattn_emu, Autograd, m) {
  fastattn::register_attention_autograd(m);
  fastattn::register_attention_varlen_autograd(m);
}
