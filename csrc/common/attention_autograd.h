// The pieces of the attention op's autograd function (common/autograd.cpp) that the packed
// (varlen) op's autograd and backward (common/attention_varlen.cpp) use too: one call's saved
// arguments and the gradients of that call, whatever its options.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/variable.h>

#include <cstddef>
#include <string>
#include <vector>

namespace fastattn {

// Whether a schema argument is a Tensor or a Tensor?.
bool is_tensor_argument(const c10::Argument& arg);
// The tensor arguments of a call (undefined where an optional one is None), in schema order.
std::vector<at::Tensor> tensor_arguments(const c10::FunctionSchema& schema,
                                         const torch::jit::Stack& call);
// The other arguments of a call, in schema order, with None at the tensor ones.
std::vector<c10::IValue> non_tensor_arguments(const c10::FunctionSchema& schema,
                                              const torch::jit::Stack& call);
// The position among tensor_arguments of the argument called `name`.
size_t tensor_slot(const c10::FunctionSchema& schema, const char* name);
// Whether autograd records a call with these arguments (grad mode on and one requires grad).
bool records_grad(const c10::IValue* args, size_t n);
// Raises for a call whose tensors carry forward-mode tangents (no formula).
void refuse_forward_ad(const c10::IValue* args, size_t n);
// The gradients of a backward that autograd may differentiate again (create_graph=True) get a
// node that raises when a second derivative is asked for.
torch::autograd::variable_list refuse_second_derivative(
    torch::autograd::variable_list grads, const torch::autograd::variable_list& grad_outputs,
    const torch::autograd::variable_list& saved);

// One fastattn::attention call, saved for its backward, and what the backward asks the kernels
// for.
struct SavedCall {
  std::string name;                   // the forward op's name
  const c10::FunctionSchema* schema;  // its schema
  std::vector<c10::IValue> values;    // its non-tensor arguments (None at tensor ones)
  std::vector<at::Tensor> tensors;    // its tensor arguments, in schema order
  at::Tensor grad_out, out, lse, grad_lse;
  bool need_table = false, need_span = false, need_mask = false;

  size_t slot(const char* arg) const { return tensor_slot(*schema, arg); }
};

// The gradients of the call `c` (grad_out, out, lse and grad_lse set; the need_* flags are set
// here from `need`): one per tensor argument, in schema order, defined where need[t] is true
// and the argument has a gradient (q, k, v, scale_tensor, rel_bias, alibi_slopes, span and a
// float attn_mask). Runs the call's backward kernel once (once per batch row for per-batch
// ALiBi slopes); the caller holds a NoGradGuard.
std::vector<at::Tensor> call_gradients(SavedCall c, const std::vector<bool>& need);

}  // namespace fastattn
