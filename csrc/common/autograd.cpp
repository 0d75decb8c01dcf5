// Autograd-key kernels, device-generic: how gradients flow through an op, in C++.
//
// fastattn::rotary's formula lives here rather than in Python (torch.library.register_autograd)
// because the op is cheap: on the development machine the Python autograd layer alone cost
// ~20 us per call, about as much as the whole CUDA kernel at training shapes and far more than
// a decoding step's. Here it costs a C++ Function::apply. The backward is the op's own
// rotary_backward kernel, asked only for the gradients autograd needs (its output_mask).
// C++ users of the library (CMakeLists.txt) get the same gradients through the dispatcher.
//
// fastattn::attention keeps its Python formula (python/fastattn/ops.py): its kernels run for
// milliseconds, and its backward handles grad_lse and a learnable scale.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>

namespace fastattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// The ops below the Autograd key, looked up once.
at::Tensor call_rotary(const at::Tensor& x, const OptTensor& inv_freq, const OptTensor& cos,
                       const OptTensor& sin, const OptTensor& positions, const OptTensor& rotation,
                       int64_t offset, bool interleaved, int64_t rotary_dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::rotary", "")
                             .typed<at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&,
                                               int64_t, bool, int64_t)>();
  return op.call(x, inv_freq, cos, sin, positions, rotation, offset, interleaved, rotary_dim);
}

using RotaryGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

RotaryGrads call_rotary_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                 const OptTensor& inv_freq, const OptTensor& cos,
                                 const OptTensor& sin, const OptTensor& positions,
                                 const OptTensor& rotation, int64_t offset, bool interleaved,
                                 int64_t rotary_dim, std::array<bool, 4> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn::rotary_backward", "")
          .typed<RotaryGrads(const at::Tensor&, const at::Tensor&, const OptTensor&,
                             const OptTensor&, const OptTensor&, const OptTensor&,
                             const OptTensor&, int64_t, bool, int64_t, std::array<bool, 4>)>();
  return op.call(grad_out, x, inv_freq, cos, sin, positions, rotation, offset, interleaved,
                 rotary_dim, output_mask);
}

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Inputs, in schema order: x, inv_freq, cos, sin, positions, rotation, offset, interleaved,
// rotary_dim. Gradients flow to x, inv_freq, cos, sin and rotation.
class RotaryFunction : public torch::autograd::Function<RotaryFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& inv_freq,
                            const OptTensor& cos, const OptTensor& sin, const OptTensor& positions,
                            const OptTensor& rotation, int64_t offset, bool interleaved,
                            int64_t rotary_dim) {
    // Run the device kernel (or the fake one while tracing), not this kernel again.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out =
        call_rotary(x, inv_freq, cos, sin, positions, rotation, offset, interleaved, rotary_dim);
    ctx->save_for_backward({x, inv_freq.value_or(at::Tensor()), cos.value_or(at::Tensor()),
                            sin.value_or(at::Tensor()), positions.value_or(at::Tensor()),
                            rotation.value_or(at::Tensor())});
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["rotary_dim"] = rotary_dim;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    // needs_input_grad counts the tensors that were given (absent optional ones have no edge).
    size_t edge = 0;
    const auto need = [&](const at::Tensor& input) {
      return input.defined() && ctx->needs_input_grad(edge++);
    };
    const bool need_x = need(saved[0]), need_freq = need(saved[1]), need_cos = need(saved[2]),
               need_sin = need(saved[3]);
    need(saved[4]);  // positions: integer, no gradient
    const bool need_rotation = need(saved[5]);
    auto [gx, gf, gc, gs, gr] = call_rotary_backward(
        grad_outputs[0], saved[0], optional_of(saved[1]), optional_of(saved[2]),
        optional_of(saved[3]), optional_of(saved[4]), optional_of(saved[5]),
        ctx->saved_data["offset"].toInt(), ctx->saved_data["interleaved"].toBool(),
        ctx->saved_data["rotary_dim"].toInt(),
        {need_x, need_freq, need_cos || need_sin, need_rotation});
    // Gradients not asked for come back as empty tensors: report them as none.
    const at::Tensor none;
    return {need_x ? gx : none,    need_freq ? gf : none, need_cos ? gc : none,
            need_sin ? gs : none,  none,                  need_rotation ? gr : none,
            none,                  none,                  none};
  }
};

at::Tensor rotary_autograd(const at::Tensor& x, const OptTensor& inv_freq, const OptTensor& cos,
                           const OptTensor& sin, const OptTensor& positions,
                           const OptTensor& rotation, int64_t offset, bool interleaved,
                           int64_t rotary_dim) {
  return RotaryFunction::apply(x, inv_freq, cos, sin, positions, rotation, offset, interleaved,
                               rotary_dim);
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) { m.impl("rotary", &fastattn::rotary_autograd); }
