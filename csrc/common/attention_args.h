// The attention op's arguments: one schema, one struct, one set of checks, one builder of the
// kernels' parameters. Every device's entry point, the autograd function and the CUDA emulator
// go through here, so an attention option is declared, read, checked and handed to the kernels
// in this file and attention_args.cpp only (docs/ARCHITECTURE.md, "Adding an attention option").
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common/attention_params.h"

// The arguments of fastattn::attention, in order; attention_backward takes them after its own.
// Kept in step with AttentionArgs (from_stack / push_to) and the Python fake kernels, which
// read the argument names from the registered schema.
#define FASTATTN_ATTENTION_ARGS_SCHEMA                                                         \
  "Tensor q, Tensor k, Tensor v, float? scale, Tensor? scale_tensor, bool causal, "            \
  "int window_left, int window_right, Tensor? rel_bias, Tensor? alibi_slopes, Tensor? span, " \
  "float span_ramp, int num_global, Tensor? key_lengths, float softcap, float dropout_p, "     \
  "Tensor? dropout_seed, Tensor? q_offset, Tensor? k_offset, Tensor? attn_mask"

namespace fastattn {

struct AttentionArgs {
  static constexpr size_t kNumArgs = 20;  // the schema's argument count

  at::Tensor q, k, v;                    // (B, Hq, Sq, Dqk), (B, Hkv, Sk, Dqk), (B, Hkv, Sk, Dv)
  std::optional<double> scale;           // default Dqk^-0.5
  std::optional<at::Tensor> scale_tensor;  // 0-dim; overrides scale (a learnable temperature)
  bool causal = false;
  int64_t window_left = -1, window_right = -1;  // -1 = unbounded
  std::optional<at::Tensor> rel_bias;      // (2 * max_dist - 1, Hq)
  std::optional<at::Tensor> alibi_slopes;  // (Hq,) or (B, Hq)
  std::optional<at::Tensor> span;          // (B, Hq) or (Hq,)
  double span_ramp = 32.0;
  int64_t num_global = 0;
  std::optional<at::Tensor> key_lengths;  // (B,) int64 / int32
  double softcap = 0.0;                   // 0 = off
  double dropout_p = 0.0;                 // in [0, 1); 0 = off
  // (2,) int64 [seed, offset] of the dropout mask (common/dropout.h), on the CPU or q's
  // device; read only when dropout_p > 0.
  std::optional<at::Tensor> dropout_seed;
  // (B,) int64 / int32: query i of row b stands at q_offset[b] + i (default Sk - Sq), key j at
  // k_offset[b] + j (default 0); clamped to +-2^60.
  std::optional<at::Tensor> q_offset, k_offset;
  // SDPA's attn_mask: bool (True = may attend) or float (added to the logit), broadcastable to
  // (B, Hq, Sq, Sk) (right-aligned; read through its strides, never expanded).
  std::optional<at::Tensor> attn_mask;

  // Reads the kNumArgs schema arguments that start at stack[first] (copies, the stack is kept).
  static AttentionArgs from_stack(const torch::jit::Stack& stack, size_t first);
  // Pushes them in schema order, e.g. to call an op with these arguments.
  void push_to(torch::jit::Stack& stack) const;

  // Every check of every argument: ranks, shapes, dtypes, devices and option ranges, raising
  // ValueError / TypeError (in Python) that name the argument, the expected and the received
  // value. Reads no tensor data, so it runs on meta and fake tensors too (skipped for symbolic
  // shapes, which only a tracer passes).
  void check() const;
  // The checks that read tensor data (span >= 0): device kernels only.
  void check_values() const;

  double scale_or_default() const;
  bool has_symbolic_shapes() const;
};

// attention_backward's arguments: its own, then the attention arguments.
struct AttentionBackwardArgs {
  static constexpr size_t kNumOwnArgs = 7;

  at::Tensor grad_out, out, lse;        // (B, Hq, Sq, Dv), (B, Hq, Sq, Dv), (B, Hq, Sq)
  std::optional<at::Tensor> grad_lse;   // (B, Hq, Sq): the gradient reaching lse, if used
  bool need_rel_bias_grad = false, need_span_grad = false, need_attn_mask_grad = false;
  AttentionArgs attn;

  static AttentionBackwardArgs from_stack(const torch::jit::Stack& stack, size_t first);
  void check() const;  // attn.check() and check_gradient_inputs()
  // The shapes, dtypes and devices of the tensors above (attn already checked).
  void check_gradient_inputs() const;
};

using AttentionOutputs = std::tuple<at::Tensor, at::Tensor>;  // out, lse
// grad_q, grad_k, grad_v, grad_rel_bias, grad_span, grad_attn_mask (the last three empty
// unless asked for).
using AttentionGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The small tensors AttentionParamsT points to, converted to the kernels' layout (contiguous
// Real, int64 lengths); they must outlive the kernels.
struct ParamTensors {
  at::Tensor scale, rel_bias, alibi_slopes, span, key_lengths, dropout_seed, q_offset, k_offset,
      attn_mask;
};

// The kernels' parameters for `a`, with the output allocated contiguous (B, Hq, Sq, Dv).
// A scale tensor is read on the host when read_scale_tensor is true; otherwise it is left in
// keep.scale (fp32, on its device) for the kernels to read, and p.scale is 1.
template <typename Real>
AttentionParamsT<Real> make_attention_params(const AttentionArgs& a, ParamTensors& keep,
                                             bool read_scale_tensor);

// The sum of x along `dim` (dropped), in float64, in one fixed order: a running sum (cumsum runs
// sequentially along its dim), since at::sum on the CPU splits a large reduction by the thread
// count and the gradients must be bitwise the same on any number of threads.
at::Tensor ordered_sum(const at::Tensor& x, int64_t dim);

// The attn_mask's gradient in its own shape: `full` (B, Hq, Sq, Sk), the gradient of every
// pair's logit, summed over the dims the mask broadcasts along, in a fixed order (on the CPU a
// running sum in float64, whatever the thread count), in the mask's dtype.
at::Tensor reduce_to_mask_shape(const at::Tensor& full, const at::Tensor& mask);

// Registers device entry points written against the structs as the boxed kernels of
// `ns::attention` and `ns::attention_backward` for the library's dispatch key.
using AttentionForwardFn = AttentionOutputs (*)(const AttentionArgs&);
using AttentionBackwardFn = AttentionGrads (*)(const AttentionBackwardArgs&);

namespace detail {
template <AttentionForwardFn F>
void boxed_forward(const c10::OperatorHandle&, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const auto args = AttentionArgs::from_stack(*stack, stack->size() - AttentionArgs::kNumArgs);
  auto [out, lse] = F(args);
  torch::jit::drop(*stack, AttentionArgs::kNumArgs);
  torch::jit::push(*stack, std::move(out), std::move(lse));
}
template <AttentionBackwardFn F>
void boxed_backward(const c10::OperatorHandle&, c10::DispatchKeySet, torch::jit::Stack* stack) {
  constexpr size_t n = AttentionBackwardArgs::kNumOwnArgs + AttentionArgs::kNumArgs;
  const auto args = AttentionBackwardArgs::from_stack(*stack, stack->size() - n);
  auto [gq, gk, gv, gb, gs, gm] = F(args);
  torch::jit::drop(*stack, n);
  torch::jit::push(*stack, std::move(gq), std::move(gk), std::move(gv), std::move(gb),
                   std::move(gs), std::move(gm));
}
}  // namespace detail

template <AttentionForwardFn Forward, AttentionBackwardFn Backward>
void register_attention_kernels(torch::Library& m) {
  m.impl("attention", torch::CppFunction::makeFromBoxedFunction<&detail::boxed_forward<Forward>>());
  m.impl("attention_backward",
         torch::CppFunction::makeFromBoxedFunction<&detail::boxed_backward<Backward>>());
}

// Defines `attention` and `attention_backward` in a library (fastattn, and the CUDA emulator's).
void define_attention_ops(torch::Library& m);
// Registers the autograd function of those ops (autograd.cpp) in a library of the Autograd key.
void register_attention_autograd(torch::Library& m);

// fastattn::attention through the dispatcher, for C++ callers: (out, lse).
AttentionOutputs attention(const AttentionArgs& args);

}  // namespace fastattn
