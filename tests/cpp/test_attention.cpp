// C++ (libtorch) check of the attention op through the dispatcher, as a C++ user calls it
// (fastattn::attention with an AttentionArgs, common/attention_args.h): forward and gradients (the op's autograd kernel is registered in C++,
// csrc/common/autograd.cpp), compared with dense ATen arithmetic and its autograd: causal GQA
// with a learned relative-position table and a learnable scale. Exit code 0 = pass.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <optional>

#include "common/attention_args.h"

namespace {

std::tuple<at::Tensor, at::Tensor> call_attention(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const at::Tensor& scale,
                                                  const at::Tensor& table) {
  fastattn::AttentionArgs args;  // every option at its default
  args.q = q;
  args.k = k;
  args.v = v;
  args.scale_tensor = scale;
  args.causal = true;
  args.rel_bias = table;
  return fastattn::attention(args);
}

// Dense attention: query i at position i + Sk - Sq, key j at j, d = pos_q - j; causal keeps
// d >= 0; the table adds table[clamp(d, -(M-1), M-1) + M - 1, h]; k/v heads are shared by
// groups of Hq / Hkv query heads.
at::Tensor expected_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& scale, const at::Tensor& table) {
  const int64_t Hq = q.size(1), Hkv = k.size(1), Sq = q.size(2), Sk = k.size(2);
  const int64_t M = (table.size(0) + 1) / 2;
  auto kk = k.repeat_interleave(Hq / Hkv, 1), vv = v.repeat_interleave(Hq / Hkv, 1);
  auto pos_q = at::arange(Sq, q.options().dtype(at::kLong)) + (Sk - Sq);
  auto d = pos_q.unsqueeze(1) - at::arange(Sk, q.options().dtype(at::kLong)).unsqueeze(0);
  auto rows = d.clamp(-(M - 1), M - 1) + (M - 1);                       // (Sq, Sk)
  auto bias = table.index_select(0, rows.flatten()).view({Sq, Sk, Hq}).permute({2, 0, 1});
  auto logits = at::matmul(q, kk.transpose(-1, -2)) * scale + bias;
  logits = logits.masked_fill(d.lt(0), -std::numeric_limits<double>::infinity());
  return at::matmul(at::softmax(logits, -1), vv);
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  auto q0 = at::randn({2, 4, 9, 16}, opts), k0 = at::randn({2, 2, 13, 16}, opts);
  auto v0 = at::randn({2, 2, 13, 8}, opts), table0 = 0.5 * at::randn({7, 4}, opts);
  auto scale0 = at::full({}, 0.3, opts);
  auto leaf = [](const at::Tensor& t) { return t.detach().clone().requires_grad_(true); };
  auto q = leaf(q0), k = leaf(k0), v = leaf(v0), table = leaf(table0), scale = leaf(scale0);
  auto qr = leaf(q0), kr = leaf(k0), vr = leaf(v0), tabler = leaf(table0), scaler = leaf(scale0);

  auto [out, lse] = call_attention(q, k, v, scale, table);
  auto want = expected_attention(qr, kr, vr, scaler, tabler);
  auto grad_out = at::randn(want.sizes(), opts);
  out.backward(grad_out);
  want.backward(grad_out);

  int failures = 0;
  auto check = [&](const char* name, const at::Tensor& got, const at::Tensor& ref) {
    const double err = (got - ref).abs().max().item<double>();
    const bool ok = err < 1e-9;
    std::printf("attention %-10s max_abs_err=%.3g %s\n", name, err, ok ? "ok" : "FAIL");
    failures += ok ? 0 : 1;
  };
  check("out", out, want);
  check("grad_q", q.grad(), qr.grad());
  check("grad_k", k.grad(), kr.grad());
  check("grad_v", v.grad(), vr.grad());
  check("grad_table", table.grad(), tabler.grad());
  check("grad_scale", scale.grad(), scaler.grad());
  return failures == 0 ? 0 : 1;
}
