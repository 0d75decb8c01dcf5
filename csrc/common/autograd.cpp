// Autograd-key kernels, device-generic: how gradients flow through fastattn's ops, in C++.
//
// The formulas live here rather than in Python (torch.library.register_autograd) because
// per-call host time matters for these ops: on the development machine the Python autograd
// layer alone cost ~20 us per rotary call and ~25 us per attention call, about as much as a
// CUDA rotary kernel at training shapes and more than a decoding step's attention kernel. Here
// it costs a C++ Function::apply, and a call that autograd will not record (no input requires
// grad, or grad mode is off: inference, decoding) skips even that and goes straight to the
// kernel. Each backward is the op's own *_backward kernel, asked only for the gradients
// autograd needs. C++ users of the library (CMakeLists.txt) get the same gradients through
// the dispatcher.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <initializer_list>
#include <optional>

namespace fastattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// Whether autograd records a call with these tensor inputs (what Function::apply would decide).
// When it does not, the Autograd kernels below call the op directly: no Function node, no
// context, no saved data (the map of saved options costs a few microseconds per call).
bool records_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}
const at::Tensor& or_undefined(const OptTensor& t) {
  static const at::Tensor undefined;
  return t.has_value() ? *t : undefined;
}

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

// ---- rotary -----------------------------------------------------------------------------------
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
  if (!records_grad({&x, &or_undefined(inv_freq), &or_undefined(cos), &or_undefined(sin),
                     &or_undefined(rotation)})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_rotary(x, inv_freq, cos, sin, positions, rotation, offset, interleaved, rotary_dim);
  }
  return RotaryFunction::apply(x, inv_freq, cos, sin, positions, rotation, offset, interleaved,
                               rotary_dim);
}


// ---- attention --------------------------------------------------------------------------------
using AttentionOut = std::tuple<at::Tensor, at::Tensor>;
using AttentionGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

AttentionOut call_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double scale, const OptTensor& scale_tensor, bool causal,
                            int64_t window_left, int64_t window_right, const OptTensor& rel_bias,
                            const OptTensor& alibi_slopes, const OptTensor& span, double span_ramp,
                            int64_t num_global, const OptTensor& key_lengths) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn::attention", "")
          .typed<AttentionOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                              const OptTensor&, bool, int64_t, int64_t, const OptTensor&,
                              const OptTensor&, const OptTensor&, double, int64_t,
                              const OptTensor&)>();
  return op.call(q, k, v, scale, scale_tensor, causal, window_left, window_right, rel_bias,
                 alibi_slopes, span, span_ramp, num_global, key_lengths);
}

AttentionGrads call_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OptTensor& grad_lse, double scale,
    const OptTensor& scale_tensor, bool causal, int64_t window_left, int64_t window_right,
    const OptTensor& rel_bias, const OptTensor& alibi_slopes, const OptTensor& span,
    double span_ramp, int64_t num_global, const OptTensor& key_lengths, bool need_rel_bias_grad,
    bool need_span_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn::attention_backward", "")
          .typed<AttentionGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const OptTensor&, double, const OptTensor&, bool, int64_t,
                                int64_t, const OptTensor&, const OptTensor&, const OptTensor&,
                                double, int64_t, const OptTensor&, bool, bool)>();
  return op.call(grad_out, q, k, v, out, lse, grad_lse, scale, scale_tensor, causal, window_left,
                 window_right, rel_bias, alibi_slopes, span, span_ramp, num_global, key_lengths,
                 need_rel_bias_grad, need_span_grad);
}

// Inputs, in schema order: q, k, v, scale, scale_tensor, causal, window_left, window_right,
// rel_bias, alibi_slopes, span, span_ramp, num_global, key_lengths. Outputs: out and lse, both
// differentiable (a caller may use lse). Gradients flow to q, k, v, scale_tensor, rel_bias and
// span; alibi slopes are fixed (no gradient) and key_lengths are integers.
class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, double scale, const OptTensor& scale_tensor,
                               bool causal, int64_t window_left, int64_t window_right,
                               const OptTensor& rel_bias, const OptTensor& alibi_slopes,
                               const OptTensor& span, double span_ramp, int64_t num_global,
                               const OptTensor& key_lengths) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = call_attention(q, k, v, scale, scale_tensor, causal, window_left,
                                     window_right, rel_bias, alibi_slopes, span, span_ramp,
                                     num_global, key_lengths);
    // An unused output's gradient stays undefined: no zeros for an lse nobody used.
    ctx->set_materialize_grads(false);
    const at::Tensor none;
    ctx->save_for_backward({q, k, v, out, lse, scale_tensor.value_or(none),
                            rel_bias.value_or(none), alibi_slopes.value_or(none),
                            span.value_or(none), key_lengths.value_or(none)});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["span_ramp"] = span_ramp;
    ctx->saved_data["num_global"] = num_global;
    return {out, lse};
  }

  // sum(a * b), in `acc`. On the CPU the products are added in one fixed order (a running
  // sum: cumsum runs sequentially along its dim) because at::sum splits a large reduction by
  // the thread count, and every other gradient of the backward is bitwise the same on any
  // number of threads. CUDA's sum is already the same from run to run on a device.
  static at::Tensor sum_of_products(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
    if (!a.device().is_cpu()) return (a.to(acc) * b.to(acc)).sum();
    // (a leading 0 makes the last entry of the running sum exist for empty inputs too)
    const at::Tensor products = at::constant_pad_nd((a.to(at::kDouble) * b.to(at::kDouble)).reshape({-1}), {1, 0});
    return products.cumsum(0).select(0, -1).to(acc);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3],
                     &lse = saved[4], &scale_tensor = saved[5];
    // needs_input_grad counts the tensors that were given (absent optional ones have no edge).
    size_t edge = 0;
    const auto need = [&](const at::Tensor& input) {
      return input.defined() && ctx->needs_input_grad(edge++);
    };
    need(q);
    need(k);
    need(v);
    const bool need_scale = need(scale_tensor);
    const bool need_table = need(saved[6]);
    need(saved[7]);  // alibi slopes: fixed
    const bool need_span = need(saved[8]);
    const at::Tensor grad_out = grad_outputs[0].defined() ? grad_outputs[0] : at::zeros_like(out);
    auto [gq, gk, gv, g_table, g_span] = call_attention_backward(
        grad_out, q, k, v, out, lse, optional_of(grad_outputs[1]),
        ctx->saved_data["scale"].toDouble(), optional_of(scale_tensor),
        ctx->saved_data["causal"].toBool(), ctx->saved_data["window_left"].toInt(),
        ctx->saved_data["window_right"].toInt(), optional_of(saved[6]), optional_of(saved[7]),
        optional_of(saved[8]), ctx->saved_data["span_ramp"].toDouble(),
        ctx->saved_data["num_global"].toInt(), optional_of(saved[9]), need_table, need_span);
    at::Tensor g_scale;
    if (need_scale) {
      // logits = s * q.k + ...  =>  dL/ds = sum_ij dS_ij q_i.k_j = sum(q * dq) / s (undefined
      // at s == 0, where it comes out inf/nan). functional.attention runs fp16/bf16 inputs in
      // fp32 when s is learnable: this sum cancels heavily and needs fp32 dq and out.
      const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      g_scale = (sum_of_products(q, gq, acc) / scale_tensor.to(acc)).to(scale_tensor.scalar_type());
    }
    const at::Tensor none;
    return {gq,   gk,   gv,   none, g_scale, none, none, none, need_table ? g_table : none,
            none, need_span ? g_span : none, none, none, none};
  }
};

AttentionOut attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                double scale, const OptTensor& scale_tensor, bool causal,
                                int64_t window_left, int64_t window_right,
                                const OptTensor& rel_bias, const OptTensor& alibi_slopes,
                                const OptTensor& span, double span_ramp, int64_t num_global,
                                const OptTensor& key_lengths) {
  if (!records_grad({&q, &k, &v, &or_undefined(scale_tensor), &or_undefined(rel_bias),
                     &or_undefined(alibi_slopes), &or_undefined(span)})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_attention(q, k, v, scale, scale_tensor, causal, window_left, window_right,
                          rel_bias, alibi_slopes, span, span_ramp, num_global, key_lengths);
  }
  const variable_list outs =
      AttentionFunction::apply(q, k, v, scale, scale_tensor, causal, window_left, window_right,
                               rel_bias, alibi_slopes, span, span_ramp, num_global, key_lengths);
  return {outs[0], outs[1]};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  m.impl("rotary", &fastattn::rotary_autograd);
  m.impl("attention", &fastattn::attention_autograd);
}
