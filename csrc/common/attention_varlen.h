// fastattn::attention_varlen: attention over packed sequences of different lengths
// (FlashAttention's varlen layout), one op with a fake kernel, so that torch.compile keeps it in
// its graph (fullgraph=True). Its backward, attention_varlen_backward, is an op too.
//
// The arguments are cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, then the attention
// op's own (attention_args.h) on packed tensors: q (total_q, Hq, Dqk), k (total_k, Hkv, Dqk),
// v (total_k, Hkv, Dv); alibi_slopes and span (Hq,) or (n_seq, Hq); sequence s draws the
// dropout mask of a call with [seed, offset + s]; key_lengths, q_offset, k_offset and attn_mask
// are None (each sequence is aligned bottom-right within itself).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <cstdint>

#include "common/attention_args.h"

#define FASTATTN_VARLEN_ARGS_SCHEMA                                                        \
  "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, " \
  FASTATTN_ATTENTION_ARGS_SCHEMA

namespace fastattn {

struct VarlenArgs {
  static constexpr size_t kNumOwnArgs = 4;
  static constexpr size_t kNumArgs = kNumOwnArgs + AttentionArgs::kNumArgs;

  at::Tensor cu_seqlens_q, cu_seqlens_k;  // (n_seq + 1,) int32 / int64 on q's device
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  AttentionArgs attn;  // on the packed tensors (above)

  static VarlenArgs from_stack(const torch::jit::Stack& stack, size_t first);
  int64_t num_sequences() const { return cu_seqlens_q.size(0) - 1; }
  // The checks that read no tensor data: the packed layout, then the attention op's checks of
  // the options (as one call over all the tokens). Raises ValueError / TypeError naming the
  // argument. The values of cu_seqlens and max_seqlen_* are checked by the kernels.
  void check() const;
};

// Defines attention_varlen and attention_varlen_backward (fastattn.cpp).
void define_attention_varlen_ops(torch::Library& m);
// Registers their device-generic kernels (which call the attention op of the same library)
// for a library's device key: the CPU (fastattn.cpp, cpu_kernels: each sequence's rows copied
// head-major first, which the CPU kernels read faster, and decode-sized sequences run side by
// side on the threads), CUDA (cuda/attention_api.cu) and the CUDA emulator (both without).
void register_attention_varlen_kernels(torch::Library& m, bool cpu_kernels);
// Registers attention_varlen's autograd function (common/autograd.cpp).
void register_attention_varlen_autograd(torch::Library& m);

}  // namespace fastattn
