// Autograd-key kernels, device-generic: how gradients flow through fastattn's ops, in C++.
//
// The formulas live here rather than in Python (torch.library.register_autograd) because
// per-call host time matters for these ops: a Python autograd layer costs ~20 us per rotary
// call and ~25 us per attention call on a 2-core EPYC VM, about as much as a CUDA rotary kernel
// at training shapes and more than a decoding step's attention kernel. Here
// it costs a C++ Function::apply, and a call that autograd will not record (no input requires
// grad, or grad mode is off: inference, decoding) skips even that and goes straight to the
// kernel. Each backward is the op's own *_backward kernel, asked only for the gradients
// autograd needs. C++ users of the library (CMakeLists.txt) get the same gradients through
// the dispatcher.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/attention_args.h"
#include "common/attention_autograd.h"
#include "common/attention_varlen.h"

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
//
// Higher-order autograd. y = rope(x @ rotation) is linear in x: x's gradient is the op itself
// on grad_out with the angles negated (the inverse rotation), then @ rotation^T. In a backward
// with create_graph=True it is computed that way, through this autograd kernel, so that it can
// be differentiated again (wrt grad_out, inv_freq, the tables and rotation). The gradients of
// inv_freq, cos/sin and rotation come from the backward kernel, which has no derivative: they
// are handed out through a node whose backward raises, never as constants (a silent zero).
// Forward-mode AD: rotary_jvp, below.

const at::Tensor& unit_last_stride(const at::Tensor& t, at::Tensor& storage) {
  if (t.size(-1) <= 1 || t.stride(-1) == 1) return t;
  storage = t.contiguous();
  return storage;
}

// dL/dx = rope(grad_out; -angles) @ rotation^T, with ops that autograd records.
at::Tensor differentiable_x_grad(const at::Tensor& grad_out, const variable_list& saved,
                                 int64_t offset, bool interleaved, int64_t rotary_dim) {
  const at::Tensor &x = saved[0], &inv_freq = saved[1], &cos = saved[2], &sin = saved[3],
                   &positions = saved[4], &rotation = saved[5];
  at::Tensor contiguous;
  at::Tensor g = unit_last_stride(grad_out, contiguous);
  // With a rotation the gradient of x @ rotation is kept in the math dtype, as in the kernel.
  const auto math = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (rotation.defined()) g = g.to(math);
  const at::Tensor gsrc =
      call_rotary(g, optional_of(inv_freq.defined() ? inv_freq.neg() : at::Tensor()),
                  optional_of(cos), optional_of(sin.defined() ? sin.neg() : at::Tensor()),
                  optional_of(positions), std::nullopt, offset, interleaved, rotary_dim);
  if (!rotation.defined()) return gsrc;
  return at::matmul(gsrc, rotation.to(math).t()).to(x.scalar_type());
}

// The gradients of inv_freq, cos, sin and rotation in a backward with create_graph=True. Its
// inputs are what those gradients depend on, so differentiating them reaches this backward.
class RotaryParamGradients : public torch::autograd::Function<RotaryParamGradients> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, at::TensorList /*depends_on*/,
                               const std::function<variable_list()>& compute) {
    return compute();
  }
  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        false,
        "fastattn: double backward through fastattn.rotary is supported for x's gradient only; "
        "the gradients of inv_freq, cos, sin and rotation have no derivative. Differentiate "
        "only x's gradient (detach the others), or use fastattn.reference.rotary for this "
        "computation.");
  }
};

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
    const int64_t offset = ctx->saved_data["offset"].toInt();
    const bool interleaved = ctx->saved_data["interleaved"].toBool();
    const int64_t rotary_dim = ctx->saved_data["rotary_dim"].toInt();
    const at::Tensor& grad = grad_outputs[0];
    const auto kernel = [&](std::array<bool, 4> mask) {
      return call_rotary_backward(grad, saved[0], optional_of(saved[1]), optional_of(saved[2]),
                                  optional_of(saved[3]), optional_of(saved[4]),
                                  optional_of(saved[5]), offset, interleaved, rotary_dim, mask);
    };
    at::Tensor gx, gf, gc, gs, gr;
    if (!at::GradMode::is_enabled()) {
      const bool need_table = need_cos || need_sin;
      std::tie(gx, gf, gc, gs, gr) = kernel({need_x, need_freq, need_table, need_rotation});
    } else {  // create_graph=True: the gradients must be differentiable (above)
      if (need_x) gx = differentiable_x_grad(grad, saved, offset, interleaved, rotary_dim);
      if (need_freq || need_cos || need_sin || need_rotation) {
        std::vector<at::Tensor> depends_on;
        for (const at::Tensor* t : {&grad, &saved[0], &saved[1], &saved[2], &saved[3], &saved[5]}) {
          if (t->defined()) depends_on.push_back(*t);
        }
        const std::function<variable_list()> compute = [&] {
          auto [unused, f, c, s, r] = kernel({false, need_freq, need_cos || need_sin,
                                              need_rotation});
          return variable_list{f, c, s, r};
        };
        const variable_list g = RotaryParamGradients::apply(at::TensorList(depends_on), compute);
        gf = g[0], gc = g[1], gs = g[2], gr = g[3];
      }
    }
    // Gradients not asked for come back as empty tensors: report them as none.
    const at::Tensor none;
    return {need_x ? gx : none,    need_freq ? gf : none, need_cos ? gc : none,
            need_sin ? gs : none,  none,                  need_rotation ? gr : none,
            none,                  none,                  none};
  }
};

at::Tensor rotary_primal(const at::Tensor& x, const OptTensor& inv_freq, const OptTensor& cos,
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

// The forward-mode tangent of an input (level 0: torch.autograd.forward_ad, and torch.func.jvp,
// which unwraps its tensors to that level), or an undefined tensor.
at::Tensor tangent_of(const at::Tensor& t) {
  return t.defined() ? t._fw_grad(/*level=*/0) : at::Tensor();
}
at::Tensor tangent_of(const OptTensor& t) { return t.has_value() ? tangent_of(*t) : at::Tensor(); }

// The tangent of y = rope(x @ R; angles) for the tangents tx, tf (inv_freq), tc, ts (tables)
// and tr (rotation). y is linear in x, linear in R, and linear in the tables (cos, sin)
// jointly: those terms are the op itself on the tangent (the dims past rotary_dim pass x @ R
// through, so their table terms are zeroed). An inv_freq tangent moves the angle p f by p tf,
// which turns each rotated pair (y1, y2) into p tf (-y2, y1): the op with the tables
// -p tf sin(p f) and p tf cos(p f), one row per (b, s). Computed with ops autograd records.
at::Tensor rotary_jvp(const at::Tensor& x, const OptTensor& inv_freq, const OptTensor& cos,
                      const OptTensor& sin, const OptTensor& positions, const OptTensor& rotation,
                      int64_t offset, bool interleaved, int64_t rd, const at::Tensor& tx,
                      const at::Tensor& tf, const at::Tensor& tc, const at::Tensor& ts,
                      const at::Tensor& tr) {
  const int64_t B = x.size(0), S = x.size(2), D = x.size(3), half = rd / 2;
  at::Tensor out;
  const auto add = [&](const at::Tensor& t) { out = out.defined() ? out + t : t; };
  const auto rotated_dims_only = [&](at::Tensor t) {
    if (rd < D) t.narrow(-1, rd, D - rd).zero_();
    return t;
  };
  if (tx.defined()) {
    at::Tensor contiguous;
    add(call_rotary(unit_last_stride(tx, contiguous), inv_freq, cos, sin, positions, rotation,
                    offset, interleaved, rd));
  }
  if (tr.defined()) {
    add(call_rotary(x, inv_freq, cos, sin, positions, tr, offset, interleaved, rd));
  }
  if (tc.defined() || ts.defined()) {
    const at::Tensor c = tc.defined() ? tc : at::zeros_like(*cos);
    const at::Tensor s = ts.defined() ? ts : at::zeros_like(*sin);
    add(rotated_dims_only(call_rotary(x, std::nullopt, c.contiguous(), s.contiguous(), positions,
                                      rotation, offset, interleaved, rd)));
  }
  if (tf.defined()) {
    const auto math = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const auto long_opts = x.options().dtype(at::kLong);
    const at::Tensor pos =
        positions.has_value()
            ? positions->to(at::kLong).reshape({positions->dim() == 2 ? B : 1, S})
            : at::arange(S, long_opts).add_(offset).view({1, S});
    const at::Tensor p = pos.to(math).unsqueeze(-1);                 // (Bp, S, 1)
    const at::Tensor angle = p * inv_freq->to(math);                  // (Bp, S, half)
    const at::Tensor dangle = p * tf.to(math);
    const int64_t rows = pos.size(0) * S;
    const at::Tensor c = (-dangle * angle.sin()).reshape({rows, half});
    const at::Tensor s = (dangle * angle.cos()).reshape({rows, half});
    at::Tensor row = at::arange(rows, long_opts);
    if (pos.size(0) != 1) row = row.view({B, S});
    add(rotated_dims_only(
        call_rotary(x, std::nullopt, c, s, row, rotation, 0, interleaved, rd)));
  }
  return out;
}

at::Tensor rotary_autograd(const at::Tensor& x, const OptTensor& inv_freq, const OptTensor& cos,
                           const OptTensor& sin, const OptTensor& positions,
                           const OptTensor& rotation, int64_t offset, bool interleaved,
                           int64_t rotary_dim) {
  const at::Tensor tx = tangent_of(x), tf = tangent_of(inv_freq), tc = tangent_of(cos),
                   ts = tangent_of(sin), tr = tangent_of(rotation);
  if (!tx.defined() && !tf.defined() && !tc.defined() && !ts.defined() && !tr.defined()) {
    return rotary_primal(x, inv_freq, cos, sin, positions, rotation, offset, interleaved,
                         rotary_dim);
  }
  at::Tensor out, tangent;
  {
    // With forward AD off inside, the ops below see no tangents: the primal does not meet the
    // C++ custom Function's refusal of them, and the tangent's own ops do not recurse.
    c10::AutoFwGradMode no_forward_ad(false);
    out = rotary_primal(x, inv_freq, cos, sin, positions, rotation, offset, interleaved,
                        rotary_dim);
    tangent = rotary_jvp(x, inv_freq, cos, sin, positions, rotation, offset, interleaved,
                         rotary_dim, tx, tf, tc, ts, tr);
  }
  out._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
  return out;
}

// ---- rotary_ (in place) -----------------------------------------------------------------------
using RotaryInplaceOp = void(const at::Tensor&, const OptTensor&, const OptTensor&,
                             const OptTensor&, const OptTensor&, const OptTensor&, int64_t, bool,
                             int64_t);
const c10::TypedOperatorHandle<RotaryInplaceOp>& rotary_inplace_handle() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::rotary_", "")
                             .typed<RotaryInplaceOp>();
  return op;
}

// rotary_ has no derivative: autograd must not record it (the gradient would silently be the
// identity's), and a tangent of x would silently be left unrotated.
void rotary_inplace_autograd(c10::DispatchKeySet keys, const at::Tensor& x,
                             const OptTensor& inv_freq, const OptTensor& cos, const OptTensor& sin,
                             const OptTensor& positions, const OptTensor& rotation, int64_t offset,
                             bool interleaved, int64_t rotary_dim) {
  TORCH_CHECK(!records_grad({&x, &or_undefined(inv_freq), &or_undefined(cos), &or_undefined(sin),
                             &or_undefined(rotation)}),
              "fastattn: rotary_ (in place) has no gradient: with grad mode on, neither x nor "
              "inv_freq, cos, sin or rotation may require grad; use fastattn.rotary(..., "
              "inplace=False)");
  TORCH_CHECK(!tangent_of(x).defined() && !tangent_of(inv_freq).defined() &&
                  !tangent_of(cos).defined() && !tangent_of(sin).defined() &&
                  !tangent_of(rotation).defined(),
              "fastattn: rotary_ (in place) does not support forward-mode AD; use "
              "fastattn.rotary(..., inplace=False)");
  at::AutoDispatchBelowAutograd below_autograd;
  rotary_inplace_handle().redispatch(keys & c10::after_autograd_keyset, x, inv_freq, cos, sin,
                                     positions, rotation, offset, interleaved, rotary_dim);
}

// What every PyTorch in-place op does at the ADInplaceOrView key: an inference tensor may only
// be written in inference mode, and writing x bumps its version counter, so that a backward
// that saved x (or a view of it) before raises instead of using the new values.
void rotary_inplace_or_view(c10::DispatchKeySet keys, const at::Tensor& x,
                            const OptTensor& inv_freq, const OptTensor& cos, const OptTensor& sin,
                            const OptTensor& positions, const OptTensor& rotation, int64_t offset,
                            bool interleaved, int64_t rotary_dim) {
  // (PyTorch's own message; checked before x is written, where PyTorch's ops raise after.)
  TORCH_CHECK(!x.is_inference() || c10::InferenceMode::is_enabled(),
              "Inplace update to inference tensor outside InferenceMode is not allowed."
              "You can make a clone to get a normal tensor before doing inplace update."
              "See https://github.com/pytorch/rfcs/pull/17 for more details.");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    rotary_inplace_handle().redispatch(keys & c10::after_ADInplaceOrView_keyset, x, inv_freq, cos,
                                       sin, positions, rotation, offset, interleaved, rotary_dim);
  }
  torch::autograd::impl::bump_version(x);
}


}  // namespace

// ---- attention ---------------------------------------------------------------------------------
// The attention op's autograd is written against its argument stack, not its argument list: an
// attention option (attention_args.h) passes through here without being named. Every given
// tensor argument is an input of the autograd node; the call's arguments are saved whole
// (tensors through save_for_backward, the rest as values) and handed back to `<op>_backward`
// after its own arguments. The gradients are matched to the arguments by name: q, k, v,
// rel_bias and span from the backward kernel, the scale tensor's from dq (below), the ALiBi
// slopes' from a per-distance table gradient (alibi_slopes_grad); key lengths are integers.

using torch::jit::Stack;

bool is_tensor_argument(const c10::Argument& arg) {
  const c10::TypePtr& type = arg.type();
  if (type->kind() == c10::TypeKind::TensorType) return true;
  const auto* optional = type->castRaw<c10::OptionalType>();
  return optional != nullptr && optional->getElementType()->kind() == c10::TypeKind::TensorType;
}

// The op's tensor arguments (Tensor and Tensor?), in schema order: the autograd node's inputs.
std::vector<at::Tensor> tensor_arguments(const c10::FunctionSchema& schema, const Stack& call) {
  std::vector<at::Tensor> tensors;
  for (size_t i = 0; i < call.size(); ++i) {
    if (!is_tensor_argument(schema.arguments()[i])) continue;
    tensors.push_back(call[i].isTensor() ? call[i].toTensor() : at::Tensor());
  }
  return tensors;
}

std::vector<c10::IValue> non_tensor_arguments(const c10::FunctionSchema& schema, const Stack& call) {
  std::vector<c10::IValue> values;
  for (size_t i = 0; i < call.size(); ++i) {
    values.push_back(is_tensor_argument(schema.arguments()[i]) ? c10::IValue() : call[i]);
  }
  return values;
}

// The position among tensor_arguments of the argument called `name`.
size_t tensor_slot(const c10::FunctionSchema& schema, const char* name) {
  size_t slot = 0;
  for (const c10::Argument& arg : schema.arguments()) {
    if (arg.name() == name) return slot;
    if (is_tensor_argument(arg)) ++slot;
  }
  TORCH_INTERNAL_ASSERT(false, "fastattn: no argument ", name, " in ", schema.name());
}

// Whether autograd records a call with these arguments (what Function::apply would decide).
// When it does not, the Autograd kernel calls the op directly: no Function node, no context,
// no saved data.
bool records_grad(const c10::IValue* args, size_t n) {
  if (!at::GradMode::is_enabled()) return false;
  for (size_t i = 0; i < n; ++i) {
    if (args[i].isTensor() && args[i].toTensor().requires_grad()) return true;
  }
  return false;
}

namespace {

// sum(a * b), in `acc`. On the CPU the products are added in one fixed order (ordered_sum), as
// every other gradient of the backward is bitwise the same on any number of threads. CUDA's sum
// is already the same from run to run on a device.
at::Tensor sum_of_products(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (!a.device().is_cpu()) return (a.to(acc) * b.to(acc)).sum();
  return ordered_sum((a.to(at::kDouble) * b.to(at::kDouble)).reshape({-1}), 0).to(acc);
}

// logits = cap(s * q.k) + ...  =>  dL/ds = sum_ij dS'_ij q_i.k_j = sum(q * dq) / s, where dS'
// carries the cap's derivative as dq does (undefined at s == 0, where it comes out inf/nan).
// functional.attention runs fp16/bf16 inputs in fp32 when s is learnable: this sum cancels
// heavily and needs fp32 dq and out.
at::Tensor scale_grad(const at::Tensor& q, const at::Tensor& gq, const at::Tensor& scale) {
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return (sum_of_products(q, gq, acc) / scale.to(acc)).to(scale.scalar_type());
}

// ALiBi slopes' gradient, from the kernels' table gradient: the ALiBi term -slope[h] * |d|
// depends on the distance d only, so d(loss)/d(slope[h]) = -sum_d |d| * (the sum of dS over
// the pairs at distance d). The backward runs with a table of one row per distance of the call
// (d in [1 - M, M - 1], M - 1 the call's largest |d|: nothing clamps) holding the call's own
// table values (zero without a table), so the logits are unchanged and the table gradient the
// kernels compute, deterministically on both devices, is exactly those per-distance sums.
struct DistanceTable {
  at::Tensor table;      // (2M - 1, Hq)
  at::Tensor user_rows;  // (2M - 1,) int64: the call's table row of each distance (if a table)
  int64_t reach = 0;     // M
};

// The largest |d| + 1 of the call: max(Sq, Sk) with the default positions, else from the
// offsets (read on the host: this path alone needs their values there).
int64_t distance_reach(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_offset,
                       const at::Tensor& k_offset) {
  const int64_t Sq = q.size(2), Sk = k.size(2);
  if (!q_offset.defined() && !k_offset.defined()) return std::max<int64_t>({Sq, Sk, 1});
  constexpr int64_t kLimit = int64_t(1) << 60;  // as make_attention_params clamps them
  const auto cpu_long = [&](const at::Tensor& o, int64_t fill) {
    return o.defined() ? o.to(at::kCPU, at::kLong).clamp(-kLimit, kLimit)
                       : at::full({q.size(0)}, fill, q.options().device(at::kCPU).dtype(at::kLong));
  };
  const at::Tensor shift = cpu_long(q_offset, Sk - Sq) - cpu_long(k_offset, 0);
  if (shift.numel() == 0) return 1;
  const int64_t lo = shift.min().item<int64_t>() - (Sk - 1), hi = shift.max().item<int64_t>() + Sq - 1;
  const int64_t reach = std::max<int64_t>({lo < 0 ? -lo : lo, hi < 0 ? -hi : hi, 0}) + 1;
  TORCH_CHECK_NOT_IMPLEMENTED(reach <= (int64_t(1) << 24),
                              "fastattn: the gradient of alibi_slopes with positions (q_offset, "
                              "k_offset) more than 2^24 apart is not implemented, got distances up to ",
                              reach - 1);
  return reach;
}

DistanceTable distance_table(const at::Tensor& q, const at::Tensor& k, const at::Tensor& table,
                             const at::Tensor& slopes, const at::Tensor& q_offset,
                             const at::Tensor& k_offset) {
  DistanceTable t;
  t.reach = distance_reach(q, k, q_offset, k_offset);
  const auto dtype = table.defined() ? at::promote_types(table.scalar_type(), slopes.scalar_type())
                                     : slopes.scalar_type();
  const int64_t rows = 2 * t.reach - 1;
  if (!table.defined()) {
    t.table = at::zeros({rows, q.size(1)}, slopes.options().dtype(dtype));
    return t;
  }
  const int64_t user_reach = (table.size(0) + 1) / 2;
  t.user_rows = (at::arange(rows, table.options().dtype(at::kLong)) - (t.reach - 1))
                    .clamp(1 - user_reach, user_reach - 1) + (user_reach - 1);
  t.table = table.index_select(0, t.user_rows).to(dtype);
  return t;
}

// -sum_d |d| * grad[d + M - 1, h] for each head h: (Hq,), whatever the slopes' shape.
at::Tensor alibi_slopes_grad(const DistanceTable& t, const at::Tensor& grad, const at::Tensor& slopes) {
  const at::Tensor d = at::arange(grad.size(0), grad.options().dtype(at::kDouble)) - (t.reach - 1);
  return ordered_sum(grad.to(at::kDouble) * (-d.abs()).unsqueeze(1), 0).to(slopes.scalar_type());
}

// The call's table's gradient from the per-distance one: each table row gets the sum over the
// distances that clamp to it (the end rows collect several), in distance order.
at::Tensor fold_table_grad(const DistanceTable& t, const at::Tensor& grad, const at::Tensor& table) {
  at::Tensor out = at::zeros(table.sizes(), grad.options().dtype(at::kDouble));
  const int64_t user_reach = (table.size(0) + 1) / 2, n = grad.size(0);
  const int64_t first = std::clamp<int64_t>(1 - t.reach, 1 - user_reach, user_reach - 1) + user_reach - 1;
  const int64_t last = std::clamp<int64_t>(t.reach - 1, 1 - user_reach, user_reach - 1) + user_reach - 1;
  if (first == last) {
    out.select(0, first).copy_(ordered_sum(grad, 0));
  } else {
    // rows first + 1 .. last - 1 take one distance each; the two end rows share the rest
    // equally (the distances are symmetric around 0)
    const int64_t inner = last - first - 1, at_end = (n - inner) / 2;
    out.select(0, first).copy_(ordered_sum(grad.narrow(0, 0, at_end), 0));
    out.narrow(0, first + 1, inner).copy_(grad.narrow(0, at_end, inner));
    out.select(0, last).copy_(ordered_sum(grad.narrow(0, at_end + inner, at_end), 0));
  }
  return out.to(table.scalar_type());
}

}  // namespace

// With create_graph=True the gradients would be differentiated again, and the backward kernel
// has no derivative of its own: as torch.autograd.function.once_differentiable does, the
// gradients then get a node that raises when a second derivative is asked for, instead of
// silently contributing zero.
variable_list refuse_second_derivative(variable_list grads, const variable_list& grad_outputs,
                                       const variable_list& saved) {
  if (!at::GradMode::is_enabled()) return grads;
  const auto requires_grad = [](const at::Tensor& t) { return t.defined() && t.requires_grad(); };
  if (std::none_of(grad_outputs.begin(), grad_outputs.end(), requires_grad) &&
      std::none_of(saved.begin(), saved.end(), requires_grad)) {
    return grads;
  }
  for (at::Tensor& g : grads) {
    if (g.defined()) g = g.detach().requires_grad_(true);
  }
  torch::autograd::DelayedError error(
      "fastattn: attention has no second derivative (its backward is a fused kernel): "
      "double backward, e.g. a gradient penalty through torch.autograd.grad(..., "
      "create_graph=True), is not supported; use fastattn.reference.attention for that term",
      static_cast<int64_t>(grads.size()));
  return error.apply(std::move(grads));
}

// Forward-mode AD has no formula here: refuse a call with a tangent rather than return none.
void refuse_forward_ad(const c10::IValue* args, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (!args[i].isTensor()) continue;
    TORCH_CHECK_NOT_IMPLEMENTED(!args[i].toTensor()._fw_grad(/*level=*/0).defined(),
                                "fastattn: attention does not support forward-mode AD "
                                "(torch.func.jvp, torch.autograd.forward_ad); use "
                                "fastattn.reference.attention for Jacobian-vector products");
  }
}

namespace {

// Pushes the call's arguments, in schema order, after a backward op's own.
void push_call(const SavedCall& c, Stack& stack) {
  for (size_t i = 0, t = 0; i < c.values.size(); ++i) {
    if (!is_tensor_argument(c.schema->arguments()[i])) {
      stack.push_back(c.values[i]);
    } else {
      stack.push_back(c.tensors[t].defined() ? c10::IValue(c.tensors[t]) : c10::IValue());
      ++t;
    }
  }
}

// attention_backward(grad_out, out, lse, grad_lse, need_rel_bias_grad, need_span_grad,
// need_attn_mask_grad, <the call's arguments>): its six gradients (q, k, v, table, span, mask).
std::vector<at::Tensor> call_backward(const SavedCall& c) {
  Stack stack{c.grad_out, c.out, c.lse, c.grad_lse.defined() ? c10::IValue(c.grad_lse) : c10::IValue(),
              c.need_table, c.need_span, c.need_mask};
  push_call(c, stack);
  c10::Dispatcher::singleton().findSchemaOrThrow((c.name + "_backward").c_str(), "").callBoxed(stack);
  std::vector<at::Tensor> grads;
  for (const c10::IValue& g : stack) grads.push_back(g.toTensor());
  return grads;
}

// Per-batch ALiBi slopes (B, Hq): each batch row's slopes need that row's per-distance sums of
// dS, which the kernels add over the batch. So the backward runs once per batch row, on the
// row's slices (the same work in all, B launches), with the per-distance table, and the rows'
// gradients are joined: q, k, v, a per-batch span or mask and the slopes by concatenation, the
// per-distance table and a shared span or mask summed over the rows in order (fixed, so
// reproducible). Dropout draws its mask by batch index, which a slice would renumber: refused
// for B > 1.
std::vector<at::Tensor> per_batch_backward(SavedCall c, const DistanceTable& per_distance,
                                           at::Tensor* slopes_grad) {
  const size_t q = c.slot("q"), span = c.slot("span"), mask = c.slot("attn_mask");
  const size_t alibi = c.slot("alibi_slopes");
  const int64_t B = c.tensors[q].size(0);
  for (size_t i = 0; i < c.values.size() && B > 1; ++i) {
    TORCH_CHECK_NOT_IMPLEMENTED(c.schema->arguments()[i].name() != "dropout_p" ||
                                c.values[i].toDouble() == 0.0,
                                "fastattn: the gradient of per-batch alibi_slopes (B, Hq) with dropout "
                                "is not implemented; use (Hq,) slopes, or detach them");
  }
  const auto batched = [&](size_t t) {
    const at::Tensor& x = c.tensors[t];
    if (!x.defined()) return false;
    if (t == span) return x.dim() == 2;
    if (t == mask) return x.dim() == 4 && x.size(0) == B;
    for (const char* name : {"q", "k", "v", "key_lengths", "q_offset", "k_offset", "alibi_slopes"}) {
      if (t == c.slot(name)) return true;
    }
    return false;
  };
  std::vector<std::vector<at::Tensor>> rows;
  std::vector<at::Tensor> slopes_rows;
  for (int64_t b = 0; b < B; ++b) {
    SavedCall row = c;
    for (size_t t = 0; t < c.tensors.size(); ++t) {
      if (batched(t)) row.tensors[t] = c.tensors[t].narrow(0, b, 1);
    }
    for (at::Tensor* x : {&row.grad_out, &row.out, &row.lse, &row.grad_lse}) {
      if (x->defined()) *x = x->narrow(0, b, 1);
    }
    rows.push_back(call_backward(row));
    slopes_rows.push_back(alibi_slopes_grad(per_distance, rows.back()[3], c.tensors[alibi]));
  }
  if (B == 0) {
    *slopes_grad = at::zeros_like(c.tensors[alibi]);
    return call_backward(c);
  }
  *slopes_grad = at::stack(slopes_rows);
  const size_t joined_by_cat[6] = {q, c.slot("k"), c.slot("v"), SIZE_MAX, span, mask};
  std::vector<at::Tensor> grads;
  for (size_t o = 0; o < 6; ++o) {
    std::vector<at::Tensor> parts;
    for (const auto& r : rows) parts.push_back(r[o]);
    // (a gradient that was not asked for is an empty placeholder: never concatenated)
    const size_t t = joined_by_cat[o];
    const bool cat = t != SIZE_MAX && batched(t) && parts[0].dim() == c.tensors[t].dim();
    at::Tensor joined = cat ? at::cat(parts) : parts[0];
    for (size_t b = 1; !cat && b < parts.size(); ++b) joined = joined + parts[b];
    grads.push_back(joined);
  }
  return grads;
}

}  // namespace

std::vector<at::Tensor> call_gradients(SavedCall c, const std::vector<bool>& need) {
  const size_t q = c.slot("q"), k = c.slot("k"), v = c.slot("v"), table = c.slot("rel_bias");
  const size_t span = c.slot("span"), mask = c.slot("attn_mask"), scale = c.slot("scale_tensor");
  const size_t alibi = c.slot("alibi_slopes");
  DistanceTable per_distance;  // only when the ALiBi slopes need their gradient (above)
  if (need[alibi]) {
    per_distance = distance_table(c.tensors[q], c.tensors[k], c.tensors[table], c.tensors[alibi],
                                  c.tensors[c.slot("q_offset")], c.tensors[c.slot("k_offset")]);
  }
  const bool by_distance = per_distance.table.defined();
  const at::Tensor user_table = c.tensors[table], slopes = c.tensors[alibi];
  c.need_table = need[table] || by_distance;
  c.need_span = need[span];
  c.need_mask = need[mask];
  if (by_distance) c.tensors[table] = per_distance.table;
  at::Tensor slopes_grad;
  const std::vector<at::Tensor> g = by_distance && slopes.dim() == 2
                                        ? per_batch_backward(c, per_distance, &slopes_grad)
                                        : call_backward(c);
  std::vector<at::Tensor> grads(need.size());
  const auto give = [&](size_t t, const at::Tensor& x) { if (need[t]) grads[t] = x; };
  give(q, g[0]);
  give(k, g[1]);
  give(v, g[2]);
  if (by_distance) {
    grads[alibi] = slopes_grad.defined() ? slopes_grad.to(slopes.scalar_type())
                                         : alibi_slopes_grad(per_distance, g[3], slopes);
    if (need[table]) grads[table] = fold_table_grad(per_distance, g[3], user_table);
  } else {
    give(table, g[3]);
  }
  give(span, g[4]);
  give(mask, g[5]);
  if (need[scale]) grads[scale] = scale_grad(c.tensors[q], g[0], c.tensors[scale]);
  return grads;
}

namespace {

// An op call recorded on an autograd node (AttentionFunction, VarlenFunction). Autograd inputs
// are the call's defined tensor arguments (an absent optional has no edge); the saved tensors
// are all its tensor arguments (undefined where absent), then out and lse; the other arguments
// are saved as values (None where a tensor argument goes).
variable_list run_and_record(AutogradContext* ctx, const c10::OperatorHandle* op, const Stack& call) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Stack stack = call;
  op->callBoxed(stack);
  const at::Tensor out = stack[0].toTensor(), lse = stack[1].toTensor();
  // An unused output's gradient stays undefined: no zeros for an lse nobody used.
  ctx->set_materialize_grads(false);
  std::vector<at::Tensor> saved = tensor_arguments(op->schema(), call);
  saved.push_back(out);
  saved.push_back(lse);
  ctx->save_for_backward(saved);
  ctx->saved_data["values"] = c10::ivalue::Tuple::create(non_tensor_arguments(op->schema(), call));
  ctx->saved_data["op"] = op->schema().name();
  return {out, lse};
}

// What a recorded call's backward reads back.
struct Recorded {
  SavedCall call;          // grad_out (zeros when only lse was used) and grad_lse set
  variable_list saved;     // everything saved, for refuse_second_derivative
  std::vector<size_t> edge;  // edge[t]: the autograd input of tensor argument t (SIZE_MAX: none)
  std::vector<bool> need;    // whether tensor argument t's gradient is asked for
  size_t num_inputs = 0;

  // The node's gradients (+ the op and the call: no gradient) from one per tensor argument.
  variable_list to_inputs(const std::vector<at::Tensor>& per_argument) const {
    variable_list grads(num_inputs + 2);
    for (size_t t = 0; t < need.size(); ++t) {
      if (need[t]) grads[edge[t]] = per_argument[t];
    }
    return grads;
  }
};

Recorded read_record(AutogradContext* ctx, const variable_list& grad_outputs) {
  Recorded r;
  r.saved = ctx->get_saved_variables();
  const size_t n = r.saved.size() - 2;
  const at::Tensor &out = r.saved[n], &lse = r.saved[n + 1];
  const std::string& name = ctx->saved_data["op"].toStringRef();
  const c10::FunctionSchema& schema =
      c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").schema();
  r.edge.resize(n);
  r.need.resize(n);
  for (size_t t = 0; t < n; ++t) {
    r.edge[t] = r.saved[t].defined() ? r.num_inputs++ : SIZE_MAX;
    r.need[t] = r.saved[t].defined() && ctx->needs_input_grad(r.edge[t]);
  }
  r.call = SavedCall{name, &schema, ctx->saved_data["values"].toTupleRef().elements().vec(),
                     std::vector<at::Tensor>(r.saved.begin(), r.saved.begin() + n),
                     grad_outputs[0].defined() ? grad_outputs[0] : at::zeros_like(out), out, lse,
                     grad_outputs[1]};
  return r;
}

// A node whose forward runs the op and records the call (run_and_record); Derived gives the
// backward.
template <class Derived>
class RecordingFunction : public torch::autograd::Function<Derived> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs,
                               const c10::OperatorHandle* op, const Stack& call) {
    return run_and_record(ctx, op, call);
  }
};

class AttentionFunction : public RecordingFunction<AttentionFunction> {
 public:
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    Recorded r = read_record(ctx, grad_outputs);
    variable_list grads;
    {
      at::NoGradGuard no_grad;  // the gradients are not differentiable (once_differentiable)
      grads = r.to_inputs(call_gradients(r.call, r.need));
    }
    return refuse_second_derivative(std::move(grads), grad_outputs, r.saved);
  }
};

// attention_varlen's node: its backward is the op attention_varlen_backward (each sequence's
// call_gradients, common/attention_varlen.cpp), so that a traced graph holds it as one op.
class VarlenFunction : public RecordingFunction<VarlenFunction> {
 public:
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    Recorded r = read_record(ctx, grad_outputs);
    const SavedCall& c = r.call;
    // its gradients, in order, and the arguments they belong to
    const size_t slots[] = {c.slot("q"), c.slot("k"), c.slot("v"), c.slot("rel_bias"),
                            c.slot("alibi_slopes"), c.slot("span"), c.slot("scale_tensor")};
    c10::List<bool> output_mask;
    for (size_t i = 3; i < 7; ++i) output_mask.push_back(r.need[slots[i]]);
    Stack stack{c.grad_out, c.out, c.lse,
                c.grad_lse.defined() ? c10::IValue(c.grad_lse) : c10::IValue(), output_mask};
    push_call(c, stack);
    variable_list grads;
    {
      at::NoGradGuard no_grad;
      c10::Dispatcher::singleton()
          .findSchemaOrThrow((c.name + "_backward").c_str(), "")
          .callBoxed(stack);
      std::vector<at::Tensor> per_argument(r.need.size());
      for (size_t i = 0; i < 7; ++i) per_argument[slots[i]] = stack[i].toTensor();
      grads = r.to_inputs(per_argument);
    }
    return refuse_second_derivative(std::move(grads), grad_outputs, r.saved);
  }
};

// The Autograd kernel of an op recorded by `Function`, once its arguments (the last num_args
// on the stack) are checked: a call that autograd does not record goes straight to the kernel
// below autograd, with no node, context or saved data.
template <class Function>
void record_or_redispatch(const c10::OperatorHandle& op, c10::DispatchKeySet keys, Stack* stack,
                          size_t num_args) {
  const size_t first = stack->size() - num_args;
  refuse_forward_ad(stack->data() + first, num_args);
  if (!::fastattn::records_grad(stack->data() + first, num_args)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
    return;
  }
  const Stack call(stack->begin() + first, stack->end());
  std::vector<at::Tensor> inputs;
  for (const at::Tensor& t : tensor_arguments(op.schema(), call)) {
    if (t.defined()) inputs.push_back(t);
  }
  const variable_list outs = Function::apply(at::TensorList(inputs), &op, call);
  torch::jit::drop(*stack, num_args);
  torch::jit::push(*stack, outs[0], outs[1]);
}

// The Autograd kernels (boxed: they read the call's stack, whatever its options). The
// arguments are checked here first, so that a call mixing devices is refused before the
// dispatcher can route it to the fake (meta) kernel.
void attention_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, Stack* stack) {
  const AttentionArgs args = AttentionArgs::from_stack(*stack, stack->size() - AttentionArgs::kNumArgs);
  if (!args.has_symbolic_shapes()) args.check();
  record_or_redispatch<AttentionFunction>(op, keys, stack, AttentionArgs::kNumArgs);
}

void attention_varlen_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, Stack* stack) {
  const VarlenArgs args = VarlenArgs::from_stack(*stack, stack->size() - VarlenArgs::kNumArgs);
  if (!args.attn.has_symbolic_shapes()) args.check();
  record_or_redispatch<VarlenFunction>(op, keys, stack, VarlenArgs::kNumArgs);
}

}  // namespace
}  // namespace fastattn

namespace fastattn {

void register_rotary_autograd(torch::Library& m) {
  m.impl("rotary", &rotary_autograd);
  m.impl("rotary_", &rotary_inplace_autograd);
}

void register_rotary_inplace_or_view(torch::Library& m) {
  m.impl("rotary_", &rotary_inplace_or_view);
}

void register_attention_autograd(torch::Library& m) {
  m.impl("attention", torch::CppFunction::makeFromBoxedFunction<&attention_autograd>());
}

void register_attention_varlen_autograd(torch::Library& m) {
  m.impl("attention_varlen", torch::CppFunction::makeFromBoxedFunction<&attention_varlen_autograd>());
}

}  // namespace fastattn
