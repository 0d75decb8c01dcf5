// CUDA implementation of the fastattn::attention and fastattn::attention_backward ops
// (schemas in csrc/fastattn.cpp, semantics in fastattn/reference.py::attention, mask and bias
// rules in common/attention_params.h).
//
// This file checks the inputs (common/attention_args.cpp: a direct torch.ops call with bad shapes
// must never reach a kernel) and what the CUDA kernels support, builds AttentionParams, picks
// the compiled head-dim class and launches the kernels of attention_fwd_kernel.cuh /
// attention_bwd_kernel.cuh.
//
// Supported: float16 and bfloat16 (tensor cores, sm_80+), float32 (CUDA cores, exact fp32);
// float64 is CPU-only. Any head dims Dqk, Dv <= 256: both are zero-padded in shared memory to
// the next compiled class 32, 64, 96, 128 or 256 (the larger of the two decides).
#include <ATen/ATen.h>
#include <torch/library.h>

#if !defined(FASTATTN_CUDA_EMULATION)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "attention_bwd_kernel.cuh"
#include "attention_fwd_kernel.cuh"
#include "attention_utils.cuh"
#include "common/attention_args.h"
#include "common/attention_params.h"
#include "common/attention_varlen.h"
#include "common/checks.h"
#include "common/cuda_tuning.h"
#include "common/dispatch.h"

namespace fastattn {
namespace cuda_attn {

#if !defined(FASTATTN_CUDA_EMULATION)
// The device, stream and limits one op call runs with (switches to the inputs' device).
class DeviceContext {
 public:
  explicit DeviceContext(const at::Tensor& t)
      : guard_(t.device()),
        stream_(at::cuda::getCurrentCUDAStream()),
        props_(at::cuda::getCurrentDeviceProperties()) {}
  cudaStream_t stream() const { return stream_; }
  int major() const { return props_->major; }
  int minor() const { return props_->minor; }
  size_t max_smem_per_block() const { return props_->sharedMemPerBlockOptin; }
  int64_t multiprocessors() const { return props_->multiProcessorCount; }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
  const cudaDeviceProp* props_;
};

// kernel<<<blocks, threads, smem_bytes, stream>>>(args), after checking the grid and shared
// memory limits and raising the kernel's dynamic shared memory limit above the default 48 KB.
template <typename Args>
void launch(void (*kernel)(Args), int64_t blocks, int threads, size_t smem_bytes,
            const DeviceContext& ctx, const Args& args, const char* name) {
  if (blocks == 0) return;
  check_launch_limits(name, blocks, smem_bytes, ctx.max_smem_per_block());
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  kernel<<<static_cast<unsigned int>(blocks), threads, smem_bytes, ctx.stream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif  // otherwise the emulator (fastattn_cuda_emulation.h) provides both

namespace {

// Under the CPU emulator (development aid, see attention_utils.cuh) "device" tensors live on
// the CPU.
#if defined(FASTATTN_CUDA_EMULATION)
constexpr bool kEmulation = true;
#else
constexpr bool kEmulation = false;
#endif

// at::Half / at::BFloat16 have the layout of CUDA's __half / __nv_bfloat16.
template <typename scalar_t>
struct DeviceType {
  using type = scalar_t;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
const T* data_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mutable_data_of(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

constexpr int64_t kMaxHeadDim = 256;

// The compiled head-dim class (padded size) for a head dim <= kMaxHeadDim.
int padded_head_dim(int64_t d) {
  return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : 256;
}

// Calls body(std::integral_constant<int, kD>) for the class of head_dim.
template <typename F>
void dispatch_head_dim(int64_t head_dim, F&& body) {
  switch (padded_head_dim(head_dim)) {
    case 32: body(std::integral_constant<int, 32>()); break;
    case 64: body(std::integral_constant<int, 64>()); break;
    case 96: body(std::integral_constant<int, 96>()); break;
    case 128: body(std::integral_constant<int, 128>()); break;
    default: body(std::integral_constant<int, 256>()); break;
  }
}

// Whether 16-byte vector copies of t's rows are safe: an aligned base and batch/head/sequence
// strides that keep every row start aligned. Otherwise the kernels copy element by element.
bool vector_friendly(const at::Tensor& t) {
  const int64_t chunk = 16 / static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.stride(d) % chunk != 0) return false;
  }
  return true;
}

// The backward's grad_out and out (autograd may hand over any strides) need a contiguous last
// dim; other strides are used as they are.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// Checked inputs, in the form the kernels read them.
struct Prepared {
  at::Tensor q, k, v;
  ParamTensors keep;  // fp32 / int64 contiguous device copies of the small inputs
  AttentionParams params;
  const float* scale_ptr = nullptr;  // device pointer to the scale tensor's value, or null
};

Prepared prepare_inputs(const DeviceContext& ctx, const AttentionArgs& a) {
  a.check();
  check_cuda_attention_support(a.q, a.v, kMaxHeadDim, ctx.major(), ctx.minor(), kEmulation);
  a.check_values();
  Prepared in;
  in.q = a.q;
  in.k = a.k;
  in.v = a.v;
  // A CPU scale tensor is read on the host (no device sync); a device one by the kernels.
  const bool host_scale = present(a.scale_tensor) && a.scale_tensor->is_cpu() && !kEmulation;
  in.params = make_attention_params<float>(a, in.keep, host_scale);
  if (in.keep.scale.defined()) in.scale_ptr = in.keep.scale.data_ptr<float>();
  return in;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// A decode step of a GQA/MQA group (Sq = 1) whose query heads differ only in q: no per-head
// bias (rel_bias, alibi, span) and a mask that shows the one query every key (causal and a
// right window never hide a key from the last position; a left window must reach key 0).
// Then the group's query heads act as Sq = group query rows of one head, as FlashAttention
// does: K/V tiles are read once per group instead of once per query head, and the rows fill
// one query tile instead of one 1-row tile per head. The call becomes (B, Hkv, group, D) over
// a strided view of q (no copy); no rule then depends on the rows' positions. Returns whether
// it applied; the caller views out / lse the same way. Not with dropout: its decisions are a
// function of each weight's own (head, row), which folding renames.
bool fold_group_into_rows(Prepared& in) {
  AttentionParams& p = in.params;
  const int64_t group = p.group_size();
  const bool every_key_visible = p.window_left < 0 || p.window_left >= p.seqlen_k - 1;
  if (p.seqlen_q != 1 || group <= 1 || p.rel_bias != nullptr || p.alibi_slopes != nullptr ||
      p.span != nullptr || !every_key_visible || p.dropout || p.q_offset != nullptr ||
      p.k_offset != nullptr || p.has_mask()) {
    return false;
  }
  const int64_t head_stride = p.q_stride_h;
  in.q = in.q.as_strided({p.batch, p.heads_kv, group, p.head_dim_qk},
                         {p.q_stride_b, group * head_stride, head_stride, 1});
  p.heads_q = p.heads_kv;
  p.seqlen_q = group;
  p.q_stride_h = group * head_stride;
  p.q_stride_s = head_stride;
  p.causal = false;
  p.window_left = p.window_right = -1;
  p.num_global = 0;
  return true;
}

// How many blocks share each query block's key tiles (split-KV). FlashAttention-2's rule: none
// when the grid already fills most of the GPU's block slots; otherwise the fewest parts whose
// last wave of blocks is nearly as full (>= 85%) as the best count's, with at least
// kMinKeysPerSplit keys a part (a part must outweigh its combine cost) and at most 128 parts.
int64_t kv_splits(int64_t blocks, int64_t key_tiles, int64_t keys_per_tile, int64_t slots) {
  constexpr int64_t kMinKeysPerSplit = 128, kMaxSplits = 128;
  if (blocks == 0 || 5 * blocks >= 4 * slots) return 1;
  const int64_t tiles_per_split = std::max<int64_t>(1, kMinKeysPerSplit / keys_per_tile);
  const int64_t max_splits = std::min({kMaxSplits, slots, key_tiles / tiles_per_split});
  const auto wave_fill = [&](int64_t splits) {
    const double waves = static_cast<double>(blocks * splits) / static_cast<double>(slots);
    return waves / std::ceil(waves);
  };
  // A count is only worth having if its longest part is shorter than with one part fewer
  // (otherwise it adds blocks without shortening the walk).
  const auto worth = [&](int64_t splits) {
    return splits == 1 || ceil_div(key_tiles, splits) != ceil_div(key_tiles, splits - 1);
  };
  double best = 0.;
  for (int64_t s = 1; s <= max_splits; ++s) {
    if (worth(s)) best = std::max(best, wave_fill(s));
  }
  for (int64_t s = 1; s <= max_splits; ++s) {
    if (worth(s) && wave_fill(s) >= 0.85 * best) return s;
  }
  return 1;
}

template <typename T, int kD>
void run_forward(const DeviceContext& ctx, const Prepared& in, at::Tensor& out, at::Tensor& lse) {
  using Cfg = FwdConfig<T, kD>;
  const AttentionParams& p = in.params;
  FwdArgs<T> a;
  a.p = p;
  a.p.o_stride_b = out.stride(0);
  a.p.o_stride_h = out.stride(1);
  a.p.o_stride_s = out.stride(2);
  a.q = data_of<T>(in.q);
  a.k = data_of<T>(in.k);
  a.v = data_of<T>(in.v);
  a.out = mutable_data_of<T>(out);
  a.lse = lse.data_ptr<float>();
  a.scale_ptr = in.scale_ptr;
  a.num_q_blocks = ceil_div(p.seqlen_q, Cfg::kBlockQ);
  const CudaTuning tuning = cuda_tuning();  // tests and profiling (common/cuda_tuning.h)
  a.rescale_slack = static_cast<float>(tuning.rescale_slack);
  a.q_vec = vector_friendly(in.q);
  a.k_vec = vector_friendly(in.k);
  a.v_vec = vector_friendly(in.v);
  a.out_vec = vector_friendly(out);
  // Block slots of the GPU: two blocks of up to 4 warps fit an SM (<= 255 registers a thread).
  const int64_t slots = ctx.multiprocessors() * (Cfg::kThreads <= 128 ? 2 : 1);
  const int64_t blocks = a.num_q_blocks * p.batch * p.heads_q;
  const int64_t forced = tuning.kv_splits;
  a.num_splits = forced > 0 ? forced
                            : kv_splits(blocks, ceil_div(p.seqlen_k, Cfg::kBlockK), Cfg::kBlockK, slots);
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  at::Tensor out_partial, lse_partial;
  a.out_partial = a.lse_partial = nullptr;
  if (a.num_splits > 1) {
    out_partial = at::empty({a.num_splits, rows, p.head_dim_v}, lse.options());
    lse_partial = at::empty({a.num_splits, rows}, lse.options());
    a.out_partial = out_partial.data_ptr<float>();
    a.lse_partial = lse_partial.data_ptr<float>();
  }
  launch(&attention_fwd_kernel<T, kD>, blocks * a.num_splits, Cfg::kThreads, Cfg::kSmemBytes, ctx,
         a, "attention forward");
  if (a.num_splits > 1) {
    FwdCombineArgs<T> c;
    c.out_partial = a.out_partial;
    c.lse_partial = a.lse_partial;
    c.out = a.out;
    c.lse = a.lse;
    c.rows = rows;
    c.num_splits = a.num_splits;
    c.heads = p.heads_q;
    c.seqlen = p.seqlen_q;
    c.head_dim = p.head_dim_v;
    c.o_stride_b = out.stride(0);
    c.o_stride_h = out.stride(1);
    c.o_stride_s = out.stride(2);
    launch(&attention_fwd_combine_kernel<T>, ceil_div(rows, kRowWarps), kRowWarps * 32, 0, ctx,
           c, "attention forward (split-KV combine)");
  }
}

AttentionOutputs attention_cuda(const AttentionArgs& args) {
  check_rank(args.q, 4, "q");  // before DeviceContext reads q's device
  DeviceContext ctx(args.q);
  Prepared in = prepare_inputs(ctx, args);
  const AttentionParams& p = in.params;
  at::Tensor out = at::empty({p.batch, p.heads_q, p.seqlen_q, p.head_dim_v}, in.q.options());
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.seqlen_q}, in.q.options().dtype(at::kFloat));
  // The kernels write through views of out and lse: with a decode step's group folded into
  // query rows, (B, Hkv, group, Dv) and (B, Hkv, group) views of the same memory.
  at::Tensor out_rows = out, lse_rows = lse;
  if (fold_group_into_rows(in)) {
    out_rows = out.view({p.batch, p.heads_q, p.seqlen_q, p.head_dim_v});
    lse_rows = lse.view({p.batch, p.heads_q, p.seqlen_q});
  }
  FASTATTN_DISPATCH_CUDA_FLOATING(in.q.scalar_type(), "fastattn::attention (CUDA)", [&] {
    using T = typename DeviceType<scalar_t>::type;
    dispatch_head_dim(std::max(p.head_dim_qk, p.head_dim_v), [&](auto head_dim) {
      run_forward<T, decltype(head_dim)::value>(ctx, in, out_rows, lse_rows);
    });
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

struct BackwardTensors {
  at::Tensor dout, out, lse, grad_lse;  // normalized inputs (grad_lse may be undefined)
  at::Tensor dq, dk, dv;                // outputs
  at::Tensor grad_rel_bias, grad_span;  // fp32 outputs when asked for (else undefined)
  at::Tensor mask_grad;                 // (B, Hq, Sq, Sk) fp32 zeros when asked for
  bool want_bias_grad = false, want_span_grad = false;
};

template <typename T, int kD>
void run_backward(const DeviceContext& ctx, const Prepared& in, BackwardTensors& bt) {
  const AttentionParams& p = in.params;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, Sq = p.seqlen_q, Sk = p.seqlen_k;

  // Kernel 1: delta.
  at::Tensor delta = at::empty({B, Hq, Sq}, bt.lse.options());
  {
    DeltaArgs<T> a;
    a.dout = data_of<T>(bt.dout);
    a.out = data_of<T>(bt.out);
    a.grad_lse = bt.grad_lse.defined() ? bt.grad_lse.data_ptr<float>() : nullptr;
    a.delta = delta.data_ptr<float>();
    a.total_rows = B * Hq * Sq;
    a.heads = Hq;
    a.seqlen = Sq;
    a.head_dim = p.head_dim_v;
    a.dout_stride_b = bt.dout.stride(0);
    a.dout_stride_h = bt.dout.stride(1);
    a.dout_stride_s = bt.dout.stride(2);
    a.out_stride_b = bt.out.stride(0);
    a.out_stride_h = bt.out.stride(1);
    a.out_stride_s = bt.out.stride(2);
    launch(&attention_bwd_delta_kernel<T>, ceil_div(a.total_rows, kRowWarps), kRowWarps * 32,
           0, ctx, a, "attention backward (delta)");
  }

  // Kernel 2: dK, dV, the fp32 dQ sums and the per-(b, h, key block) partials of the bias /
  // span gradients.
  using Cfg = BwdConfig<T, kD>;
  const int64_t num_k_blocks = ceil_div(Sk, Cfg::kBlockK);
  const int64_t num_q_blocks = ceil_div(Sq, Cfg::kBlockQ);
  const auto f32 = bt.lse.options();
  // GQA / MQA: a block walks the query heads of its kv head in series. When that leaves the
  // GPU short of blocks (fewer than two per SM), the group's query heads are split over
  // blocks, each writing fp32 dK/dV partials that a small kernel adds in split order.
  const int64_t group = p.group_size();
  const int64_t kv_blocks = num_k_blocks * B * Hkv;
  int64_t heads_per_split = group;
  if (group > 1 && kv_blocks > 0 && kv_blocks < 2 * ctx.multiprocessors()) {
    const int64_t want_splits = std::min(group, ceil_div(2 * ctx.multiprocessors(), kv_blocks));
    heads_per_split = ceil_div(group, want_splits);
  }
  const int64_t group_splits = group > 0 ? ceil_div(group, heads_per_split) : 1;
  at::Tensor dk_partial, dv_partial;  // (group_splits, B, Hkv, Sk, D) fp32 when split
  if (group_splits > 1) {
    dk_partial = at::empty({group_splits, B, Hkv, Sk, p.head_dim_qk}, f32);
    dv_partial = at::empty({group_splits, B, Hkv, Sk, p.head_dim_v}, f32);
  }
  at::Tensor dq_accum = at::zeros({B, Hq, Sq, p.head_dim_qk}, f32);
  // The dQ turn counters (B, Hq, num_q_blocks), then the block-ticket counter.
  at::Tensor dq_turns = at::zeros({B * Hq * num_q_blocks + 1}, f32.dtype(at::kInt));
  BwdArgs<T> a;
  a.p = p;
  a.q = data_of<T>(in.q);
  a.k = data_of<T>(in.k);
  a.v = data_of<T>(in.v);
  a.dout = data_of<T>(bt.dout);
  a.dout_stride_b = bt.dout.stride(0);
  a.dout_stride_h = bt.dout.stride(1);
  a.dout_stride_s = bt.dout.stride(2);
  a.lse = bt.lse.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.scale_ptr = in.scale_ptr;
  a.dq_accum = dq_accum.data_ptr<float>();
  a.dq_turns = dq_turns.data_ptr<int>();
  a.block_tickets = a.dq_turns + B * Hq * num_q_blocks;
  // A profiling switch (common/cuda_tuning.h) drops the dQ turns (and the fence before
  // passing them), as a non-deterministic kernel would; gradients are then not bitwise
  // reproducible.
  a.dq_in_turns = !cuda_tuning().unordered_dq;
  a.dk = mutable_data_of<T>(bt.dk);
  a.dv = mutable_data_of<T>(bt.dv);
  a.bias_partial = nullptr;
  a.span_partial = nullptr;
  a.mask_grad = bt.mask_grad.defined() ? bt.mask_grad.data_ptr<float>() : nullptr;
  a.dk_partial = group_splits > 1 ? dk_partial.data_ptr<float>() : nullptr;
  a.dv_partial = group_splits > 1 ? dv_partial.data_ptr<float>() : nullptr;
  a.num_k_blocks = num_k_blocks;
  a.num_q_blocks = num_q_blocks;
  a.heads_per_split = heads_per_split;
  a.group_splits = group_splits;
  a.q_vec = vector_friendly(in.q);
  a.k_vec = vector_friendly(in.k);
  a.v_vec = vector_friendly(in.v);
  a.dout_vec = vector_friendly(bt.dout);
  const int64_t n_split = num_k_blocks;  // partials per (b, h)
  const int64_t table_rows = 2 * p.max_dist - 1;
  at::Tensor bias_partial, span_partial;
  if (bt.want_bias_grad) {
    bias_partial = at::zeros({B * Hq * n_split, table_rows}, f32);
    a.bias_partial = bias_partial.data_ptr<float>();
  }
  if (bt.want_span_grad) {
    span_partial = at::zeros({B * Hq * n_split}, f32);
    a.span_partial = span_partial.data_ptr<float>();
  }
  launch(&attention_bwd_kernel<T, kD>, kv_blocks * group_splits, Cfg::kThreads, Cfg::kSmemBytes,
         ctx, a, "attention backward");
  if (group_splits > 1) {
    for (int which = 0; which < 2; ++which) {
      GroupSplitReduceArgs<T> r;
      r.partial = (which == 0 ? dk_partial : dv_partial).data_ptr<float>();
      r.out = mutable_data_of<T>(which == 0 ? bt.dk : bt.dv);
      r.numel = (which == 0 ? bt.dk : bt.dv).numel();
      r.splits = group_splits;
      launch(&attention_bwd_group_split_reduce_kernel<T>, std::min<int64_t>(ceil_div(r.numel, 256), 4096),
             256, 0, ctx, r, which == 0 ? "attention backward (dK)" : "attention backward (dV)");
    }
  }

  // Kernel 3: dQ = scale * dq_accum in the element type.
  {
    DqConvertArgs<T> c;
    c.dq_accum = dq_accum.data_ptr<float>();
    c.dq = mutable_data_of<T>(bt.dq);
    c.scale_ptr = in.scale_ptr;
    c.scale = p.scale;
    c.numel = dq_accum.numel();
    launch(&attention_bwd_dq_convert_kernel<T>, std::min<int64_t>(ceil_div(c.numel, 256), 4096), 256, 0,
           ctx, c, "attention backward (dQ)");
  }

  // Fixed-order reductions of the partials.
  if (bt.want_bias_grad) {
    bt.grad_rel_bias = at::empty({table_rows, Hq}, bt.lse.options());
    BiasGradReduceArgs r;
    r.partial = bias_partial.data_ptr<float>();
    r.grad = bt.grad_rel_bias.data_ptr<float>();
    r.rows = table_rows;
    r.heads = Hq;
    r.batch = B;
    r.n_split = n_split;
    launch(&rel_bias_grad_reduce_kernel, ceil_div(table_rows * Hq, 256), 256, 0, ctx, r,
           "attention backward (rel_bias gradient)");
  }
  if (bt.want_span_grad) {
    bt.grad_span = at::empty(in.keep.span.sizes(), bt.lse.options());
    SpanGradReduceArgs r;
    r.partial = span_partial.data_ptr<float>();
    r.grad = bt.grad_span.data_ptr<float>();
    r.heads = Hq;
    r.batch = B;
    r.n_split = n_split;
    r.per_head = p.span_stride_b == 0;
    launch(&span_grad_reduce_kernel, ceil_div(bt.grad_span.numel(), 256), 256, 0, ctx, r,
           "attention backward (span gradient)");
  }
}

AttentionGrads attention_backward_cuda(const AttentionBackwardArgs& args) {
  check_rank(args.attn.q, 4, "q");  // before DeviceContext reads q's device
  DeviceContext ctx(args.attn.q);
  Prepared in = prepare_inputs(ctx, args.attn);  // checks the attention arguments
  args.check_gradient_inputs();
  const AttentionParams& p = in.params;
  const at::Tensor& q = args.attn.q;

  BackwardTensors bt;
  bt.dout = last_dim_contiguous(args.grad_out);
  bt.out = last_dim_contiguous(args.out);
  bt.lse = args.lse.to(at::kFloat).contiguous();
  if (present(args.grad_lse)) bt.grad_lse = args.grad_lse->to(at::kFloat).contiguous();
  bt.dq = at::empty({p.batch, p.heads_q, p.seqlen_q, p.head_dim_qk}, in.q.options());
  bt.dk = at::empty({p.batch, p.heads_kv, p.seqlen_k, p.head_dim_qk}, in.q.options());
  bt.dv = at::empty({p.batch, p.heads_kv, p.seqlen_k, p.head_dim_v}, in.q.options());
  bt.want_bias_grad = args.need_rel_bias_grad && in.keep.rel_bias.defined();
  bt.want_span_grad = args.need_span_grad && in.keep.span.defined();
  const bool want_mask_grad = args.need_attn_mask_grad && in.keep.attn_mask.defined() &&
                              args.attn.attn_mask->is_floating_point();
  if (want_mask_grad) {
    bt.mask_grad = at::zeros({p.batch, p.heads_q, p.seqlen_q, p.seqlen_k}, bt.lse.options());
  }

  FASTATTN_DISPATCH_CUDA_FLOATING(in.q.scalar_type(), "fastattn::attention_backward (CUDA)", [&] {
    using T = typename DeviceType<scalar_t>::type;
    dispatch_head_dim(std::max(p.head_dim_qk, p.head_dim_v), [&](auto head_dim) {
      run_backward<T, decltype(head_dim)::value>(ctx, in, bt);
    });
  });

  at::Tensor grad_bias = bt.want_bias_grad ? bt.grad_rel_bias.to(args.attn.rel_bias->scalar_type())
                                           : at::empty({0}, q.options());
  at::Tensor grad_span = bt.want_span_grad ? bt.grad_span.to(args.attn.span->scalar_type())
                                           : at::empty({0}, q.options());
  at::Tensor grad_mask = want_mask_grad ? reduce_to_mask_shape(bt.mask_grad, *args.attn.attn_mask)
                                        : at::empty({0}, q.options());
  return {bt.dq, bt.dk, bt.dv, grad_bias, grad_span, grad_mask};
}

}  // namespace
}  // namespace cuda_attn
}  // namespace fastattn

#if !defined(FASTATTN_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  fastattn::register_attention_kernels<&fastattn::cuda_attn::attention_cuda,
                                       &fastattn::cuda_attn::attention_backward_cuda>(m);
  fastattn::register_attention_varlen_kernels(m, /*cpu_kernels=*/false);
}
#endif
