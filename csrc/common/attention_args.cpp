// The attention op's schema, its argument struct, its checks and the builder of the kernels'
// parameters (declared in attention_args.h).
#include "common/attention_args.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/dropout.h"

namespace fastattn {

void define_attention_ops(torch::Library& m) {
  // Returns (out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) fp32; -inf for empty rows).
  // See common/attention_params.h for the mask and bias rules.
  m.def("attention(" FASTATTN_ATTENTION_ARGS_SCHEMA ") -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v, grad_rel_bias, grad_span); grad_rel_bias / grad_span are
  // empty unless asked for. grad_rel_bias is reduced in a fixed order (deterministic).
  // grad_lse (B, Hq, Sq) fp32, optional: the gradient reaching lse when the caller used it (it
  // enters as D_i = rowsum(dO * O) - grad_lse_i).
  m.def(
      "attention_backward(Tensor grad_out, Tensor out, Tensor lse, Tensor? grad_lse, "
      "bool need_rel_bias_grad, bool need_span_grad, bool need_attn_mask_grad, "
      FASTATTN_ATTENTION_ARGS_SCHEMA ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// ---- reading and writing the argument stack ---------------------------------------------------

AttentionArgs AttentionArgs::from_stack(const torch::jit::Stack& stack, size_t first) {
  const c10::IValue* s = stack.data() + first;
  AttentionArgs a;
  a.q = s[0].toTensor();
  a.k = s[1].toTensor();
  a.v = s[2].toTensor();
  a.scale = s[3].toOptional<double>();
  a.scale_tensor = s[4].toOptional<at::Tensor>();
  a.causal = s[5].toBool();
  a.window_left = s[6].toInt();
  a.window_right = s[7].toInt();
  a.rel_bias = s[8].toOptional<at::Tensor>();
  a.alibi_slopes = s[9].toOptional<at::Tensor>();
  a.span = s[10].toOptional<at::Tensor>();
  a.span_ramp = s[11].toDouble();
  a.num_global = s[12].toInt();
  a.key_lengths = s[13].toOptional<at::Tensor>();
  a.softcap = s[14].toDouble();
  a.dropout_p = s[15].toDouble();
  a.dropout_seed = s[16].toOptional<at::Tensor>();
  a.q_offset = s[17].toOptional<at::Tensor>();
  a.k_offset = s[18].toOptional<at::Tensor>();
  a.attn_mask = s[19].toOptional<at::Tensor>();
  static_assert(kNumArgs == 20, "read every schema argument above");
  return a;
}

void AttentionArgs::push_to(torch::jit::Stack& stack) const {
  torch::jit::push(stack, q, k, v, scale, scale_tensor, causal, window_left, window_right,
                   rel_bias, alibi_slopes, span, span_ramp, num_global, key_lengths, softcap,
                   dropout_p, dropout_seed, q_offset, k_offset, attn_mask);
}

AttentionBackwardArgs AttentionBackwardArgs::from_stack(const torch::jit::Stack& stack,
                                                        size_t first) {
  const c10::IValue* s = stack.data() + first;
  AttentionBackwardArgs a;
  a.grad_out = s[0].toTensor();
  a.out = s[1].toTensor();
  a.lse = s[2].toTensor();
  a.grad_lse = s[3].toOptional<at::Tensor>();
  a.need_rel_bias_grad = s[4].toBool();
  a.need_span_grad = s[5].toBool();
  a.need_attn_mask_grad = s[6].toBool();
  a.attn = AttentionArgs::from_stack(stack, first + kNumOwnArgs);
  return a;
}

// ---- checks -------------------------------------------------------------------------------------

namespace {

bool symbolic(const at::Tensor& t) {
  return t.defined() && t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// The small float tensors (table, slopes, spans, scale): a floating dtype, on q's device.
void check_parameter(const at::Tensor& t, const at::Tensor& q, const char* name) {
  check_floating(t, name);
  check_same_device(t, q, name, "q");
}

void check_qkv(const AttentionArgs& a) {
  check_rank(a.q, 4, "q");
  check_rank(a.k, 4, "k");
  check_rank(a.v, 4, "v");
  check_floating(a.q, "q");
  check_same_dtype(a.k, a.q, "k", "q");
  check_same_dtype(a.v, a.q, "v", "q");
  check_same_device(a.k, a.q, "k", "q");
  check_same_device(a.v, a.q, "v", "q");
  const int64_t B = a.q.size(0), Hq = a.q.size(1), Dqk = a.q.size(3);
  check_size(a.k, 0, B, "k", "batch");
  check_size(a.v, 0, B, "v", "batch");
  check_size(a.k, 3, Dqk, "k", "head dim, must equal q's");
  const int64_t Hkv = a.k.size(1);
  check_size(a.v, 1, Hkv, "v", "heads, must equal k's");
  check_size(a.v, 2, a.k.size(2), "v", "sequence length, must equal k's");
  FA_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "fastattn: q's heads (", Hq,
                 ") must be a multiple of k/v's heads (", Hkv, ")");
  // The kernels read q, k and v through their strides, with a unit stride in the last dim.
  check_last_dim_contiguous(a.q, "q");
  check_last_dim_contiguous(a.k, "k");
  check_last_dim_contiguous(a.v, "v");
}

void check_scale(const AttentionArgs& a) {
  if (a.scale.has_value()) {
    FA_CHECK_VALUE(std::isfinite(*a.scale), "fastattn: scale must be finite, got ", *a.scale);
  }
  if (!present(a.scale_tensor)) return;
  const at::Tensor& s = *a.scale_tensor;
  FA_CHECK_VALUE(s.dim() == 0, "fastattn: scale (scale_tensor) must be a float or a 0-dim tensor, "
                 "got a tensor of shape ", s.sizes());
  check_floating(s, "scale (scale_tensor)");
  // A CPU scale is read on the host (no device sync); elsewhere it must sit with q.
  if (!s.is_cpu()) check_same_device(s, a.q, "scale (scale_tensor)", "q");
}

void check_masks(const AttentionArgs& a) {
  const int64_t B = a.q.size(0), Hq = a.q.size(1);
  FA_CHECK_VALUE(a.window_left >= -1 && a.window_right >= -1,
                 "fastattn: window entries must be >= -1 (-1 = unbounded), got (", a.window_left,
                 ", ", a.window_right, ")");
  if (present(a.span)) {
    const at::Tensor& span = *a.span;
    check_parameter(span, a.q, "span");
    const bool per_batch = span.dim() == 2 && span.size(0) == B && span.size(1) == Hq;
    const bool per_head = span.dim() == 1 && span.size(0) == Hq;
    FA_CHECK_VALUE(per_batch || per_head, "fastattn: span must be (B, Hq) = (", B, ", ", Hq,
                   ") or (Hq,) = (", Hq, ",), got shape ", span.sizes());
    FA_CHECK_VALUE(a.span_ramp > 0 && std::isfinite(a.span_ramp),
                   "fastattn: span_ramp must be a finite number > 0, got ", a.span_ramp);
  }
  // num_global > Sk is well defined: every key (and every query) is global.
  FA_CHECK_VALUE(a.num_global >= 0, "fastattn: num_global must be >= 0, got ", a.num_global);
  if (present(a.key_lengths)) {
    const at::Tensor& kl = *a.key_lengths;
    FA_CHECK_TYPE(kl.scalar_type() == at::kLong || kl.scalar_type() == at::kInt,
                  "fastattn: key_lengths must be int64 or int32, got ", kl.scalar_type());
    check_rank(kl, 1, "key_lengths");
    check_same_device(kl, a.q, "key_lengths", "q");
    check_size(kl, 0, B, "key_lengths", "batch");
  }
  for (const auto& [t, name] : {std::pair{&a.q_offset, "q_offset"}, std::pair{&a.k_offset, "k_offset"}}) {
    if (!present(*t)) continue;
    const at::Tensor& o = **t;
    FA_CHECK_TYPE(o.scalar_type() == at::kLong || o.scalar_type() == at::kInt,
                  "fastattn: ", name, " must be int64 or int32, got ", o.scalar_type());
    check_rank(o, 1, name);
    check_same_device(o, a.q, name, "q");
    check_size(o, 0, B, name, "batch");
  }
}

void check_biases(const AttentionArgs& a) {
  const int64_t Hq = a.q.size(1);
  if (present(a.rel_bias)) {
    const at::Tensor& t = *a.rel_bias;
    check_rank(t, 2, "rel_bias");
    check_parameter(t, a.q, "rel_bias");
    FA_CHECK_VALUE(t.size(0) % 2 == 1, "fastattn: rel_bias must be (2 * max_dist - 1, Hq): ",
                   "its first dim must be odd, got shape ", t.sizes());
    check_size(t, 1, Hq, "rel_bias", "one column per query head");
  }
  if (present(a.alibi_slopes)) {
    const at::Tensor& t = *a.alibi_slopes;
    check_parameter(t, a.q, "alibi_slopes");
    const int64_t B = a.q.size(0);
    FA_CHECK_VALUE((t.dim() == 1 && t.size(0) == Hq) || (t.dim() == 2 && t.size(0) == B && t.size(1) == Hq),
                   "fastattn: alibi_slopes must be (Hq,) = (", Hq, ",) or (B, Hq) = (", B, ", ", Hq,
                   "), got shape ", t.sizes());
  }
  FA_CHECK_VALUE(std::isfinite(a.softcap) && a.softcap >= 0,
                 "fastattn: softcap must be a finite number >= 0 (0 = off), got ", a.softcap);
}

// SDPA's rule: a bool or float tensor broadcastable (right-aligned) to (B, Hq, Sq, Sk).
void check_attn_mask(const AttentionArgs& a) {
  if (!present(a.attn_mask)) return;
  const at::Tensor& m = *a.attn_mask;
  FA_CHECK_TYPE(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()),
                "fastattn: attn_mask must be bool (True = may attend) or floating (added to the "
                "logits), got ", m.scalar_type());
  check_same_device(m, a.q, "attn_mask", "q");
  const int64_t target[4] = {a.q.size(0), a.q.size(1), a.q.size(2), a.k.size(2)};
  FA_CHECK_VALUE(m.dim() <= 4, "fastattn: attn_mask must broadcast to (B, Hq, Sq, Sk) = (", target[0],
                 ", ", target[1], ", ", target[2], ", ", target[3], "), got shape ", m.sizes());
  for (int64_t d = 0; d < m.dim(); ++d) {
    const int64_t size = m.size(m.dim() - 1 - d), want = target[3 - d];
    FA_CHECK_VALUE(size == 1 || size == want, "fastattn: attn_mask must broadcast to (B, Hq, Sq, Sk) = (",
                   target[0], ", ", target[1], ", ", target[2], ", ", target[3], "), got shape ", m.sizes());
  }
}

void check_dropout(const AttentionArgs& a) {
  FA_CHECK_VALUE(a.dropout_p >= 0 && a.dropout_p < 1,
                 "fastattn: dropout_p must be in [0, 1), got ", a.dropout_p);
  if (a.dropout_p == 0) return;
  FA_CHECK_VALUE(present(a.dropout_seed),
                 "fastattn: dropout_seed ([seed, offset], int64) is required when dropout_p > 0, got None");
  const at::Tensor& t = *a.dropout_seed;
  FA_CHECK_TYPE(t.scalar_type() == at::kLong,
                "fastattn: dropout_seed must be an int64 tensor [seed, offset], got ", t.scalar_type());
  FA_CHECK_VALUE(t.dim() == 1 && t.size(0) == 2,
                 "fastattn: dropout_seed must have shape (2,) [seed, offset], got ", t.sizes());
  FA_CHECK_VALUE(t.device().is_cpu() || t.device() == a.q.device(),
                 "fastattn: dropout_seed must be on the CPU or on q's device (", a.q.device(),
                 "), got ", t.device());
}

}  // namespace

bool AttentionArgs::has_symbolic_shapes() const {
  return symbolic(q) || symbolic(k) || symbolic(v);
}

void AttentionArgs::check() const {
  check_qkv(*this);
  check_scale(*this);
  check_masks(*this);
  check_biases(*this);
  check_attn_mask(*this);
  check_dropout(*this);
}

void AttentionArgs::check_values() const {
  if (present(span) && span->numel() > 0) {
    FA_CHECK_VALUE(at::isfinite(*span).all().item<bool>(),
                   "fastattn: span must be finite (tokens), got a NaN or infinite value");
    const double lowest = span->min().item<double>();
    FA_CHECK_VALUE(lowest >= 0, "fastattn: span must be >= 0 (tokens), got a minimum of ", lowest);
  }
}

double AttentionArgs::scale_or_default() const {
  if (scale.has_value()) return *scale;
  const int64_t d = q.size(3);
  return d > 0 ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0;
}

void AttentionBackwardArgs::check() const {
  attn.check();
  check_gradient_inputs();
}

void AttentionBackwardArgs::check_gradient_inputs() const {
  const at::Tensor& q = attn.q;
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), q.size(2), attn.v.size(3)};
  const std::vector<int64_t> lse_shape{q.size(0), q.size(1), q.size(2)};
  check_rank(grad_out, 4, "grad_out");
  check_rank(out, 4, "out");
  FA_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), "fastattn: grad_out must have shape ",
                 at::IntArrayRef(out_shape), " (B, Hq, Sq, Dv), got ", grad_out.sizes());
  FA_CHECK_VALUE(out.sizes() == at::IntArrayRef(out_shape), "fastattn: out must have shape ",
                 at::IntArrayRef(out_shape), " (B, Hq, Sq, Dv), got ", out.sizes());
  check_same_dtype(grad_out, q, "grad_out", "q");
  check_same_dtype(out, q, "out", "q");
  check_same_device(grad_out, q, "grad_out", "q");
  check_same_device(out, q, "out", "q");
  FA_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape), "fastattn: lse must have shape ",
                 at::IntArrayRef(lse_shape), " (B, Hq, Sq), got ", lse.sizes());
  check_floating(lse, "lse");
  check_same_device(lse, q, "lse", "q");
  if (present(grad_lse)) {
    FA_CHECK_VALUE(grad_lse->sizes() == at::IntArrayRef(lse_shape),
                   "fastattn: grad_lse must have shape ", at::IntArrayRef(lse_shape),
                   " (B, Hq, Sq), got ", grad_lse->sizes());
    check_floating(*grad_lse, "grad_lse");
    check_same_device(*grad_lse, q, "grad_lse", "q");
  }
}

// ---- the kernels' parameters --------------------------------------------------------------------

namespace {

template <typename Real>
at::Tensor as_real_contiguous(const at::Tensor& t) {
  return t.to(std::is_same_v<Real, double> ? at::kDouble : at::kFloat).contiguous();
}

}  // namespace

// Dropout: the 16-bit keep threshold and 1 / (1 - p); the seed and offset read here from a CPU
// tensor, or left on the GPU for the kernel to read (no wait for the GPU).
template <typename Real>
void set_dropout(const AttentionArgs& a, ParamTensors& keep, AttentionParamsT<Real>& p) {
  if (!(a.dropout_p > 0)) return;
  p.dropout = true;
  const double threshold = std::nearbyint((1.0 - a.dropout_p) * kDropoutOne);
  p.dropout_threshold = static_cast<uint32_t>(std::min<double>(std::max<double>(threshold, 0.0), kDropoutOne));
  p.dropout_scale = static_cast<Real>(1.0 / (1.0 - a.dropout_p));
  const at::Tensor& seed = *a.dropout_seed;
  if (seed.device().is_cpu()) {
    const at::Tensor values = seed.contiguous();
    p.dropout_seed = static_cast<uint64_t>(values.data_ptr<int64_t>()[0]);
    p.dropout_offset = static_cast<uint64_t>(values.data_ptr<int64_t>()[1]);
  } else {
    keep.dropout_seed = seed.contiguous();
    p.dropout_seed_ptr = keep.dropout_seed.data_ptr<int64_t>();
  }
}

// attn_mask: read in place through its strides (0 on broadcast dims, right-aligned to (b, h,
// i, j)); a float mask of another dtype than the kernels' is converted in its own shape.
template <typename Real>
void set_attn_mask(const AttentionArgs& a, ParamTensors& keep, AttentionParamsT<Real>& p) {
  if (!present(a.attn_mask)) return;
  const at::Tensor& m = *a.attn_mask;
  const auto real = std::is_same_v<Real, double> ? at::kDouble : at::kFloat;
  keep.attn_mask = m.scalar_type() == at::kBool || m.scalar_type() == real ? m : m.to(real);
  int64_t* strides[4] = {&p.mask_stride_b, &p.mask_stride_h, &p.mask_stride_q, &p.mask_stride_k};
  const int64_t dims = keep.attn_mask.dim();
  for (int64_t d = 0; d < dims; ++d) {
    const int64_t dim = dims - 1 - d;
    *strides[3 - d] = keep.attn_mask.size(dim) == 1 ? 0 : keep.attn_mask.stride(dim);
  }
  if (keep.attn_mask.scalar_type() == at::kBool) {
    p.mask_bool = reinterpret_cast<const uint8_t*>(keep.attn_mask.data_ptr<bool>());
  } else {
    p.mask = keep.attn_mask.template data_ptr<Real>();
  }
}

template <typename Real>
AttentionParamsT<Real> make_attention_params(const AttentionArgs& a, ParamTensors& keep,
                                             bool read_scale_tensor) {
  AttentionParamsT<Real> p;
  const at::Tensor &q = a.q, &k = a.k, &v = a.v;
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.seqlen_q = q.size(2);
  p.head_dim_qk = q.size(3);
  p.heads_kv = k.size(1);
  p.seqlen_k = k.size(2);
  p.head_dim_v = v.size(3);
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.q_stride_s = q.stride(2);
  p.k_stride_b = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.k_stride_s = k.stride(2);
  p.v_stride_b = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.v_stride_s = v.stride(2);
  p.o_stride_s = p.head_dim_v;
  p.o_stride_h = p.seqlen_q * p.o_stride_s;
  p.o_stride_b = p.heads_q * p.o_stride_h;

  p.scale = static_cast<Real>(a.scale_or_default());
  if (present(a.scale_tensor)) {
    if (read_scale_tensor) {
      p.scale = static_cast<Real>(a.scale_tensor->item<double>());
    } else {
      keep.scale = a.scale_tensor->to(at::kFloat).contiguous();
      p.scale = Real(1);
    }
  }
  p.softcap = static_cast<Real>(a.softcap);
  p.causal = a.causal;
  // A window bound that reaches past every distance is no bound: -1, so that the kernels'
  // position arithmetic (pos_q - left, pos_q + right) cannot overflow. Every distance is below
  // Sq + Sk with the default positions, below 2^62 with offsets (clamped to +-2^60).
  const bool offsets = present(a.q_offset) || present(a.k_offset);
  const int64_t reach = offsets ? (int64_t(1) << 62) : p.seqlen_q + p.seqlen_k;
  p.window_left = a.window_left >= reach ? -1 : a.window_left;
  p.window_right = a.window_right >= reach ? -1 : a.window_right;
  p.num_global = a.num_global;
  if (present(a.key_lengths)) {
    keep.key_lengths = a.key_lengths->to(at::kLong).contiguous();
    p.key_lengths = keep.key_lengths.data_ptr<int64_t>();
  }
  constexpr int64_t kOffsetLimit = int64_t(1) << 60;
  if (present(a.q_offset)) {
    keep.q_offset = a.q_offset->to(at::kLong).clamp(-kOffsetLimit, kOffsetLimit).contiguous();
    p.q_offset = keep.q_offset.data_ptr<int64_t>();
  }
  if (present(a.k_offset)) {
    keep.k_offset = a.k_offset->to(at::kLong).clamp(-kOffsetLimit, kOffsetLimit).contiguous();
    p.k_offset = keep.k_offset.data_ptr<int64_t>();
  }
  if (present(a.rel_bias)) {
    keep.rel_bias = as_real_contiguous<Real>(*a.rel_bias);
    p.rel_bias = keep.rel_bias.template data_ptr<Real>();
    p.max_dist = (keep.rel_bias.size(0) + 1) / 2;
  }
  if (present(a.alibi_slopes)) {
    keep.alibi_slopes = as_real_contiguous<Real>(*a.alibi_slopes);
    p.alibi_slopes = keep.alibi_slopes.template data_ptr<Real>();
    p.alibi_stride_b = keep.alibi_slopes.dim() == 2 ? p.heads_q : 0;
  }
  if (present(a.span)) {
    keep.span = as_real_contiguous<Real>(*a.span);
    p.span = keep.span.template data_ptr<Real>();
    p.span_stride_b = keep.span.dim() == 2 ? p.heads_q : 0;
  }
  p.span_ramp = static_cast<Real>(a.span_ramp);
  set_dropout(a, keep, p);
  set_attn_mask(a, keep, p);
  return p;
}

template AttentionParamsT<float> make_attention_params<float>(const AttentionArgs&, ParamTensors&,
                                                              bool);
template AttentionParamsT<double> make_attention_params<double>(const AttentionArgs&,
                                                                ParamTensors&, bool);

at::Tensor ordered_sum(const at::Tensor& x, int64_t dim) {
  // (a leading 0 makes the last entry of the running sum exist for an empty dim too)
  std::vector<int64_t> pad(2 * (x.dim() - dim), 0);
  pad[2 * (x.dim() - 1 - dim)] = 1;
  return at::constant_pad_nd(x.to(at::kDouble), pad).cumsum(dim).select(dim, -1);
}

at::Tensor reduce_to_mask_shape(const at::Tensor& full, const at::Tensor& mask) {
  at::Tensor g = full;
  for (int64_t d = 0; d < 4; ++d) {
    const int64_t mask_dim = mask.dim() - 4 + d;  // right-aligned; < 0: a dim the mask lacks
    if (mask_dim >= 0 && mask.size(mask_dim) == g.size(d)) continue;
    if (g.size(d) == 1) continue;
    if (g.device().is_cpu()) {
      g = ordered_sum(g, d).unsqueeze(d);
    } else {
      g = g.sum(d, /*keepdim=*/true);
    }
  }
  return g.reshape(mask.sizes()).to(mask.scalar_type()).contiguous();
}

// ---- C++ callers --------------------------------------------------------------------------------

AttentionOutputs attention(const AttentionArgs& args) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::attention", "");
  torch::jit::Stack stack;
  stack.reserve(AttentionArgs::kNumArgs);
  args.push_to(stack);
  op.callBoxed(stack);
  return {stack[0].toTensor(), stack[1].toTensor()};
}

}  // namespace fastattn
