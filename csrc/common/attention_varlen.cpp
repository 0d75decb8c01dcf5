// fastattn::attention_varlen and its backward (declared in attention_varlen.h).
//
// Each sequence is one fastattn::attention call on views of the packed q, k and v (no
// padding: time and memory follow the real tokens; on the CPU the rows are copied head-major
// first, HeadMajor below), with its own ALiBi / span row and dropout seed; the kernels' outputs
// are copied into the packed out and lse. The
// sequences' bounds are read on the host once per call (a device sync on a GPU). A single
// launch over every sequence's blocks is the GPU's lever, not taken here
// (docs/ARCHITECTURE.md, "Packed sequences").
//
// The backward runs each sequence's call_gradients (common/autograd.cpp: the attention node's
// own backward, per-distance ALiBi and scale gradients included), last sequence first, and adds
// the shared parameters' gradients in that fixed order: what autograd gives for one attention
// call per sequence, bitwise, on any thread count.
#include "common/attention_varlen.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "common/attention_autograd.h"
#include "common/checks.h"
#include "cpu/output_buffers.h"

namespace fastattn {

void define_attention_varlen_ops(torch::Library& m) {
  // Returns (out (total_q, Hq, Dv) in q's dtype, lse (Hq, total_q) fp32; -inf for a query that
  // sees no key).
  m.def("attention_varlen(" FASTATTN_VARLEN_ARGS_SCHEMA ") -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v, grad_rel_bias, grad_alibi_slopes, grad_span,
  // grad_scale_tensor); output_mask = [rel_bias, alibi_slopes, span, scale_tensor] says which
  // of the last four to compute (the others come back empty).
  m.def(
      "attention_varlen_backward(Tensor grad_out, Tensor out, Tensor lse, Tensor? grad_lse, "
      "bool[] output_mask, " FASTATTN_VARLEN_ARGS_SCHEMA
      ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

VarlenArgs VarlenArgs::from_stack(const torch::jit::Stack& stack, size_t first) {
  const c10::IValue* s = stack.data() + first;
  VarlenArgs a;
  a.cu_seqlens_q = s[0].toTensor();
  a.cu_seqlens_k = s[1].toTensor();
  a.max_seqlen_q = s[2].toInt();
  a.max_seqlen_k = s[3].toInt();
  a.attn = AttentionArgs::from_stack(stack, first + kNumOwnArgs);
  static_assert(kNumOwnArgs == 4, "read every own argument above");
  return a;
}

namespace {

// (total, H, D) -> the (1, H, len, D) view of tokens start .. start + len - 1.
at::Tensor call_view(const at::Tensor& packed, int64_t start, int64_t len) {
  return packed.narrow(0, start, len).transpose(0, 1).unsqueeze(0);
}

// The attention call over all the tokens as one sequence (batch 0 when there is none), with
// the first sequence's row of per-sequence tensors: what the option checks see.
AttentionArgs one_call(const VarlenArgs& a) {
  AttentionArgs c = a.attn;
  const int64_t n = a.num_sequences(), batch = n > 0 ? 1 : 0;
  c.q = call_view(a.attn.q, 0, a.attn.q.size(0)).narrow(0, 0, batch);
  c.k = call_view(a.attn.k, 0, a.attn.k.size(0)).narrow(0, 0, batch);
  c.v = call_view(a.attn.v, 0, a.attn.v.size(0)).narrow(0, 0, batch);
  for (std::optional<at::Tensor>* t : {&c.alibi_slopes, &c.span}) {
    if (present(*t) && (*t)->dim() == 2) *t = (*t)->narrow(0, 0, batch);
  }
  return c;
}

void check_packed(const at::Tensor& t, const char* name, const char* layout) {
  FA_CHECK_VALUE(t.dim() == 3, "fastattn: ", name, " must be ", layout, ", got ", t.dim(),
                 " dimensions (shape ", t.sizes(), ")");
}

void check_cu_seqlens(const at::Tensor& t, const at::Tensor& q, const char* name) {
  FA_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "fastattn: ", name,
                " must be int32 or int64, got ", t.scalar_type());
  FA_CHECK_VALUE(t.dim() == 1 && t.size(0) >= 1, "fastattn: ", name,
                 " must be (n_seq + 1,) with at least one entry, got shape ", t.sizes());
  check_same_device(t, q, name, "q");
}

void check_layout(const VarlenArgs& a) {
  const at::Tensor &q = a.attn.q, &k = a.attn.k, &v = a.attn.v;
  check_packed(q, "q", "(total_q, Hq, Dqk)");
  check_packed(k, "k", "(total_k, Hkv, Dqk)");
  check_packed(v, "v", "(total_k, Hkv, Dv)");
  FA_CHECK_VALUE(v.size(0) == k.size(0) && v.size(1) == k.size(1),
                 "fastattn: v must be (total_k, Hkv, Dv) with k's (total_k, Hkv) = (", k.size(0),
                 ", ", k.size(1), "), got shape ", v.sizes());
  FA_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                 "fastattn: q's heads Hq must be a multiple of k's heads Hkv, got Hq = ",
                 q.size(1), ", Hkv = ", k.size(1));
  FA_CHECK_VALUE(k.size(2) == q.size(2), "fastattn: k must have q's head dim Dqk = ", q.size(2),
                 ", got ", k.size(2), " (shape ", k.sizes(), ")");
  check_cu_seqlens(a.cu_seqlens_q, q, "cu_seqlens_q");
  check_cu_seqlens(a.cu_seqlens_k, q, "cu_seqlens_k");
  FA_CHECK_VALUE(a.cu_seqlens_q.size(0) == a.cu_seqlens_k.size(0),
                 "fastattn: cu_seqlens_q and cu_seqlens_k must hold the same number of "
                 "sequences, got ", a.cu_seqlens_q.size(0) - 1, " and ",
                 a.cu_seqlens_k.size(0) - 1);
}

}  // namespace

void VarlenArgs::check() const {
  check_layout(*this);
  const std::pair<const std::optional<at::Tensor>*, const char*> by_position[] = {
      {&attn.key_lengths, "key_lengths"}, {&attn.q_offset, "q_offset"},
      {&attn.k_offset, "k_offset"}, {&attn.attn_mask, "attn_mask"}};
  for (const auto& [t, name] : by_position) {
    FA_CHECK_VALUE(!present(*t), "fastattn: attention_varlen takes no ", name,
                   " (each sequence's tokens are given by cu_seqlens_q / cu_seqlens_k, aligned "
                   "bottom-right within the sequence), got a tensor");
  }
  const int64_t n = num_sequences(), Hq = attn.q.size(1);
  for (const auto& [t, name] : {std::pair{&attn.alibi_slopes, "alibi_slopes"},
                                std::pair{&attn.span, "span"}}) {
    FA_CHECK_VALUE(!present(*t) || (*t)->dim() != 2 || (*t)->size(0) == n, "fastattn: ", name,
                   " must be (Hq,) or (n_seq, Hq) = (", n, ", ", Hq, "), got shape ",
                   (*t)->sizes());
  }
  one_call(*this).check();
}

namespace {

// The sequences' token bounds, read on the host (one transfer for both tensors).
struct Bounds {
  std::vector<int64_t> q, k;
  int64_t len_q(int64_t s) const { return q[s + 1] - q[s]; }
  int64_t len_k(int64_t s) const { return k[s + 1] - k[s]; }
};

// cu_seqlens' values: 0, then non-decreasing, ending at the total; max_seqlen at least every
// length. Every later view stays in bounds because of these.
void check_bounds(const std::vector<int64_t>& b, const char* name, const char* total_name,
                  int64_t total, const char* max_name, int64_t max_len) {
  FA_CHECK_VALUE(b[0] == 0, "fastattn: ", name, " must start at 0, got ", b[0]);
  int64_t longest = 0;
  size_t longest_at = 0;
  for (size_t s = 0; s + 1 < b.size(); ++s) {
    FA_CHECK_VALUE(b[s + 1] >= b[s], "fastattn: ", name, " must be non-decreasing, got ", b[s],
                   " then ", b[s + 1], " at entries ", s, ", ", s + 1);
    if (b[s + 1] - b[s] > longest) {  // (no overflow: 0 <= b[s] <= b[s + 1])
      longest = b[s + 1] - b[s];
      longest_at = s;
    }
  }
  FA_CHECK_VALUE(b.back() == total, "fastattn: ", name, " must end at ", total_name, " = ", total,
                 ", got ", b.back());
  FA_CHECK_VALUE(max_len >= longest, "fastattn: ", max_name,
                 " must be at least every sequence's length, got ", max_len, " with sequence ",
                 longest_at, " of length ", longest);
}

Bounds read_bounds(const VarlenArgs& a) {
  const int64_t n1 = a.cu_seqlens_q.size(0);
  const at::Tensor both =
      at::cat({a.cu_seqlens_q.to(at::kLong), a.cu_seqlens_k.to(at::kLong)}).to(at::kCPU).contiguous();
  const int64_t* v = both.data_ptr<int64_t>();
  Bounds b{std::vector<int64_t>(v, v + n1), std::vector<int64_t>(v + n1, v + 2 * n1)};
  check_bounds(b.q, "cu_seqlens_q", "total_q", a.attn.q.size(0), "max_seqlen_q", a.max_seqlen_q);
  check_bounds(b.k, "cu_seqlens_k", "total_k", a.attn.k.size(0), "max_seqlen_k", a.max_seqlen_k);
  return b;
}

// (n_seq, 2) int64: sequence s's [seed, offset + s], or undefined without dropout.
at::Tensor sequence_seeds(const VarlenArgs& a) {
  if (a.attn.dropout_p == 0 || !present(a.attn.dropout_seed)) return {};
  const at::Tensor& seed = *a.attn.dropout_seed;
  const int64_t n = a.num_sequences();
  const auto longs = at::TensorOptions().dtype(at::kLong);
  const at::Tensor shift = at::stack({at::zeros({n}, longs), at::arange(n, longs)}, 1);
  return seed.to(at::kLong).unsqueeze(0) + shift.to(seed.device());
}

// Sequence s's attention call: views of its tokens, its row of per-sequence tensors, its seed.
AttentionArgs sequence_call(const VarlenArgs& a, const Bounds& b, int64_t s, const at::Tensor& seeds) {
  AttentionArgs c = a.attn;
  c.q = call_view(a.attn.q, b.q[s], b.len_q(s));
  c.k = call_view(a.attn.k, b.k[s], b.len_k(s));
  c.v = call_view(a.attn.v, b.k[s], b.len_k(s));
  for (std::optional<at::Tensor>* t : {&c.alibi_slopes, &c.span}) {
    if (present(*t) && (*t)->dim() == 2) *t = (*t)->narrow(0, s, 1);
  }
  if (seeds.defined()) c.dropout_seed = seeds.select(0, s);
  return c;
}

// On the CPU, each sequence's rows are copied head-major into buffers reused from sequence to
// sequence. The CPU kernels read a head's rows fastest when they are contiguous (their tiles
// are used in place), and a packed sequence's rows are H * D apart: one pass over the tokens
// into warm memory costs less than the strided reads (about 10% of the forward, 16 documents
// of 64..2048 tokens, H=8 D=64 float32, 2-core EPYC VM; benchmarks/bench_varlen.py). The CUDA
// kernels read strided rows natively: there (register_attention_varlen_kernels' cpu_kernels,
// false for CUDA and the CUDA emulator) the views go as they are. A sequence with fewer
// queries than a query tile reads each key row about once (a decode step): the copy would
// only add a pass, so its views go as they are too.
class HeadMajor {
 public:
  HeadMajor(bool enabled, const Bounds& b) : on_cpu_(enabled) {
    for (int64_t s = 0; s + 1 < static_cast<int64_t>(b.q.size()); ++s) {
      longest_q_ = std::max(longest_q_, b.len_q(s));
      longest_k_ = std::max(longest_k_, b.len_k(s));
    }
  }
  // view (1, H, len, D) of packed rows -> the same values in buffer `slot` (or the view itself)
  at::Tensor operator()(size_t slot, const at::Tensor& view, bool query_rows) {
    if (!on_cpu_ || view.is_contiguous()) return view;
    if (buffers_.size() <= slot) buffers_.resize(slot + 1);
    at::Tensor& buf = buffers_[slot];
    if (!buf.defined()) {
      const int64_t longest = query_rows ? longest_q_ : longest_k_;
      buf = cpu::empty_output({view.size(1) * longest * view.size(3)}, view.options());
    }
    return buf.narrow(0, 0, view.numel()).view(view.sizes()).copy_(view);
  }
  // (the CPU kernels' query tile: fewer query rows read each key row about once)
  static constexpr int64_t kMinQueries = 32;
  bool worth_it(int64_t len_q) const { return on_cpu_ && len_q >= kMinQueries; }

  void apply(AttentionArgs& c) {
    if (!worth_it(c.q.size(2))) return;
    c.q = (*this)(0, c.q, true);
    c.k = (*this)(1, c.k, false);
    c.v = (*this)(2, c.v, false);
  }

 private:
  bool on_cpu_;
  int64_t longest_q_ = 0, longest_k_ = 0;
  std::vector<at::Tensor> buffers_;
};

// The attention op of the varlen op's own library (fastattn, or the CUDA emulator's).
c10::OperatorHandle attention_op_of(const c10::OperatorHandle& varlen) {
  const std::string& name = varlen.schema().name();  // "<namespace>::attention_varlen..."
  const std::string op = name.substr(0, name.find("::")) + "::attention";
  return c10::Dispatcher::singleton().findSchemaOrThrow(op.c_str(), "");
}

// Sequence s's attention call, its results written into the packed out and lse.
void forward_sequence(const VarlenArgs& a, const Bounds& b, int64_t s, const at::Tensor& seeds,
                      const c10::OperatorHandle& attention_op, HeadMajor* head_major,
                      at::Tensor& out, at::Tensor& lse) {
  AttentionArgs call = sequence_call(a, b, s, seeds);
  if (head_major != nullptr) head_major->apply(call);
  torch::jit::Stack stack;
  call.push_to(stack);
  attention_op.callBoxed(stack);
  const at::Tensor o = stack[0].toTensor(), l = stack[1].toTensor();
  out.narrow(0, b.q[s], b.len_q(s)).copy_(o.select(0, 0).transpose(0, 1));
  lse.narrow(1, b.q[s], b.len_q(s)).copy_(l.select(0, 0));
}

AttentionOutputs varlen_forward(const VarlenArgs& a, const c10::OperatorHandle& attention_op,
                                bool cpu_kernels) {
  a.check();
  const Bounds b = read_bounds(a);
  // The sequences' calls go to the attention op's device kernels, below autograd.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor& q = a.attn.q;
  const int64_t total_q = q.size(0), Hq = q.size(1);
  // (CPU buffers of 8 MiB and more come warm from the output cache: cpu/output_buffers.h)
  at::Tensor out = cpu::empty_output({total_q, Hq, a.attn.v.size(2)}, q.options());
  at::Tensor lse = at::empty({Hq, total_q}, q.options().dtype(at::kFloat));
  const at::Tensor seeds = sequence_seeds(a);
  HeadMajor head_major(cpu_kernels, b);
  // On the CPU, sequences with fewer queries than a query tile (a decode step) give a call too
  // little work to split over threads: they run side by side, one call per thread (each call's
  // own parallel region then runs inline), after the others. Each call's result does not
  // depend on the thread that runs it.
  std::vector<int64_t> side_by_side;
  for (const int64_t s : c10::irange(a.num_sequences())) {
    if (b.len_q(s) == 0) continue;
    if (cpu_kernels && !head_major.worth_it(b.len_q(s))) {
      side_by_side.push_back(s);
      continue;
    }
    forward_sequence(a, b, s, seeds, attention_op, &head_major, out, lse);
  }
  at::parallel_for(0, static_cast<int64_t>(side_by_side.size()), 1, [&](int64_t lo, int64_t hi) {
    at::AutoDispatchBelowADInplaceOrView worker_below_autograd;  // (thread-local)
    for (int64_t i = lo; i < hi; ++i) {
      forward_sequence(a, b, side_by_side[i], seeds, attention_op, nullptr, out, lse);
    }
  });
  return {out, lse};
}

template <bool kCpuKernels>
void boxed_varlen_forward(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const auto args = VarlenArgs::from_stack(*stack, stack->size() - VarlenArgs::kNumArgs);
  auto [out, lse] = varlen_forward(args, attention_op_of(op), kCpuKernels);
  torch::jit::drop(*stack, VarlenArgs::kNumArgs);
  torch::jit::push(*stack, std::move(out), std::move(lse));
}

// ---- backward ---------------------------------------------------------------------------------

struct VarlenBackwardArgs {
  static constexpr size_t kNumOwnArgs = 5;
  at::Tensor grad_out, out, lse;       // (total_q, Hq, Dv), (total_q, Hq, Dv), (Hq, total_q)
  std::optional<at::Tensor> grad_lse;  // (Hq, total_q)
  std::vector<bool> output_mask;       // [rel_bias, alibi_slopes, span, scale_tensor]
  VarlenArgs call;

  static VarlenBackwardArgs from_stack(const torch::jit::Stack& stack, size_t first) {
    const c10::IValue* s = stack.data() + first;
    VarlenBackwardArgs a;
    a.grad_out = s[0].toTensor();
    a.out = s[1].toTensor();
    a.lse = s[2].toTensor();
    a.grad_lse = s[3].toOptional<at::Tensor>();
    a.output_mask = s[4].toBoolList().vec();
    a.call = VarlenArgs::from_stack(stack, first + kNumOwnArgs);
    return a;
  }

  void check() const {
    call.check();
    FA_CHECK_VALUE(output_mask.size() == 4, "fastattn: output_mask must have 4 entries "
                   "[rel_bias, alibi_slopes, span, scale_tensor], got ", output_mask.size());
    const at::Tensor& q = call.attn.q;
    const int64_t total_q = q.size(0), Hq = q.size(1);
    const std::vector<int64_t> out_shape{total_q, Hq, call.attn.v.size(2)}, lse_shape{Hq, total_q};
    const std::pair<const at::Tensor*, const char*> outs[] = {{&grad_out, "grad_out"}, {&out, "out"}};
    for (const auto& [t, name] : outs) {
      FA_CHECK_VALUE(t->sizes() == at::IntArrayRef(out_shape), "fastattn: ", name,
                     " must have shape ", at::IntArrayRef(out_shape), " (total_q, Hq, Dv), got ",
                     t->sizes());
      check_same_dtype(*t, q, name, "q");
      check_same_device(*t, q, name, "q");
    }
    const at::Tensor none;
    const std::pair<const at::Tensor*, const char*> lses[] = {
        {&lse, "lse"}, {present(grad_lse) ? &*grad_lse : &none, "grad_lse"}};
    for (const auto& [t, name] : lses) {
      if (!t->defined()) continue;
      FA_CHECK_VALUE(t->sizes() == at::IntArrayRef(lse_shape), "fastattn: ", name,
                     " must have shape ", at::IntArrayRef(lse_shape), " (Hq, total_q), got ",
                     t->sizes());
      check_floating(*t, name);
      check_same_device(*t, q, name, "q");
    }
  }
};

// One sequence's call, saved as the attention node saves it, with its rows of the packed
// gradient inputs.
SavedCall saved_sequence(const VarlenBackwardArgs& a, AttentionArgs call, const Bounds& b,
                         int64_t s, HeadMajor& head_major, const c10::OperatorHandle& op) {
  head_major.apply(call);
  torch::jit::Stack stack;
  call.push_to(stack);
  SavedCall c{op.schema().name(), &op.schema(), non_tensor_arguments(op.schema(), stack),
              tensor_arguments(op.schema(), stack)};
  const int64_t start = b.q[s], len = b.len_q(s);
  c.grad_out = call_view(a.grad_out, start, len);
  c.out = call_view(a.out, start, len);
  if (head_major.worth_it(len)) {
    c.grad_out = head_major(3, c.grad_out, true);
    c.out = head_major(4, c.out, true);
  }
  c.lse = a.lse.narrow(1, start, len).unsqueeze(0);
  if (present(a.grad_lse)) c.grad_lse = a.grad_lse->narrow(1, start, len).unsqueeze(0);
  return c;
}

// The shared and per-sequence parameters' gradients, gathered over the sequences.
struct ParamGrads {
  at::Tensor sum;                // a shared parameter's: the running sum, last sequence first
  std::vector<at::Tensor> rows;  // a (n_seq, Hq) parameter's: row s
  bool per_sequence = false;

  void add(int64_t s, const at::Tensor& g) {
    if (per_sequence) {
      rows[s] = g;
    } else {
      sum = sum.defined() ? sum + g : g;
    }
  }
  // (an empty placeholder when not asked for; zeros for rows no query reached)
  at::Tensor result(const std::optional<at::Tensor>& param, bool wanted, const at::Tensor& q) {
    if (!wanted || !present(param)) return at::empty({0}, q.options());
    if (!per_sequence) return sum.defined() ? sum : at::zeros_like(*param);
    for (const int64_t s : c10::irange(static_cast<int64_t>(rows.size()))) {
      if (!rows[s].defined()) rows[s] = at::zeros_like(param->narrow(0, s, 1));
    }
    return rows.empty() ? at::zeros_like(*param) : at::cat(rows);
  }
};

using VarlenGrads = std::vector<at::Tensor>;  // q, k, v, rel_bias, alibi_slopes, span, scale

VarlenGrads varlen_backward(const VarlenBackwardArgs& a, const c10::OperatorHandle& attention_op,
                            bool cpu_kernels) {
  a.check();
  const VarlenArgs& v = a.call;
  const Bounds b = read_bounds(v);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::NoGradGuard no_grad;
  const at::Tensor& q = v.attn.q;
  at::Tensor gq = cpu::empty_output(q.sizes(), q.options());
  at::Tensor gk = cpu::empty_output(v.attn.k.sizes(), q.options());
  at::Tensor gv = cpu::empty_output(v.attn.v.sizes(), q.options());
  const int64_t n = v.num_sequences();
  const std::optional<at::Tensor>* params[] = {&v.attn.rel_bias, &v.attn.alibi_slopes, &v.attn.span,
                                               &v.attn.scale_tensor};
  ParamGrads grads[4];
  for (const int i : c10::irange(4)) {
    grads[i].per_sequence = i != 0 && i != 3 && present(*params[i]) && (*params[i])->dim() == 2;
    if (grads[i].per_sequence) grads[i].rows.resize(n);
  }
  const at::Tensor seeds = sequence_seeds(v);
  HeadMajor head_major(cpu_kernels, b);
  // The tensor slots of a sequence's call: q, k, v, then the parameters in output_mask order.
  const c10::FunctionSchema& schema = attention_op.schema();
  size_t slot[7];
  const char* names[] = {"q", "k", "v", "rel_bias", "alibi_slopes", "span", "scale_tensor"};
  for (const int i : c10::irange(7)) slot[i] = tensor_slot(schema, names[i]);
  for (int64_t s = n - 1; s >= 0; --s) {  // autograd's order for one call per sequence
    if (b.len_q(s) == 0) {  // no query: the sequence's keys and values get no gradient
      gk.narrow(0, b.k[s], b.len_k(s)).zero_();
      gv.narrow(0, b.k[s], b.len_k(s)).zero_();
      continue;
    }
    SavedCall c = saved_sequence(a, sequence_call(v, b, s, seeds), b, s, head_major, attention_op);
    std::vector<bool> need(c.tensors.size(), false);
    for (const int i : c10::irange(3)) need[slot[i]] = true;
    for (const int i : c10::irange(4)) {
      need[slot[3 + i]] = a.output_mask[i] && c.tensors[slot[3 + i]].defined();
    }
    const std::vector<at::Tensor> g = call_gradients(c, need);
    gq.narrow(0, b.q[s], b.len_q(s)).copy_(g[slot[0]].select(0, 0).transpose(0, 1));
    gk.narrow(0, b.k[s], b.len_k(s)).copy_(g[slot[1]].select(0, 0).transpose(0, 1));
    gv.narrow(0, b.k[s], b.len_k(s)).copy_(g[slot[2]].select(0, 0).transpose(0, 1));
    for (const int i : c10::irange(4)) {
      if (need[slot[3 + i]]) grads[i].add(s, g[slot[3 + i]]);
    }
  }
  VarlenGrads out{gq, gk, gv};
  for (const int i : c10::irange(4)) out.push_back(grads[i].result(*params[i], a.output_mask[i], q));
  return out;
}

template <bool kCpuKernels>
void boxed_varlen_backward(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  constexpr size_t n = VarlenBackwardArgs::kNumOwnArgs + VarlenArgs::kNumArgs;
  const auto args = VarlenBackwardArgs::from_stack(*stack, stack->size() - n);
  VarlenGrads grads = varlen_backward(args, attention_op_of(op), kCpuKernels);
  torch::jit::drop(*stack, n);
  for (at::Tensor& g : grads) torch::jit::push(*stack, std::move(g));
}

}  // namespace

void register_attention_varlen_kernels(torch::Library& m, bool cpu_kernels) {
  if (cpu_kernels) {
    m.impl("attention_varlen", torch::CppFunction::makeFromBoxedFunction<&boxed_varlen_forward<true>>());
    m.impl("attention_varlen_backward",
           torch::CppFunction::makeFromBoxedFunction<&boxed_varlen_backward<true>>());
  } else {
    m.impl("attention_varlen", torch::CppFunction::makeFromBoxedFunction<&boxed_varlen_forward<false>>());
    m.impl("attention_varlen_backward",
           torch::CppFunction::makeFromBoxedFunction<&boxed_varlen_backward<false>>());
  }
}

}  // namespace fastattn
