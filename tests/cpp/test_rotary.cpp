// C++ (libtorch) check of the rotary op: called through the dispatcher, as a C++ user would,
// and compared with the same rotation written in ATen arithmetic, forward and backward (the
// op's autograd kernel is registered in C++, csrc/common/autograd.cpp). Exit code 0 = pass.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>

namespace {

at::Tensor call_rotary(const at::Tensor& x, const at::Tensor& inv_freq, bool interleaved) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastattn::rotary", "")
                       .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, int64_t, bool,
                                         int64_t)>();
  return op.call(x, inv_freq, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                 /*offset=*/3, interleaved, /*rotary_dim=*/x.size(-1));
}

// The expected result in plain ATen ops: angle = (offset + s) * inv_freq[t].
at::Tensor expected_rotary(const at::Tensor& x, const at::Tensor& inv_freq, bool interleaved) {
  const int64_t S = x.size(2), D = x.size(3);
  auto pos = at::arange(3, 3 + S, x.options().dtype(at::kFloat));
  auto angle = pos.unsqueeze(1) * inv_freq.unsqueeze(0);  // (S, D/2)
  auto c = angle.cos(), s = angle.sin();
  if (interleaved) {
    auto x1 = x.slice(-1, 0, D, 2), x2 = x.slice(-1, 1, D, 2);
    return at::stack({x1 * c - x2 * s, x1 * s + x2 * c}, -1).flatten(-2);
  }
  auto x1 = x.slice(-1, 0, D / 2), x2 = x.slice(-1, D / 2, D);
  return at::cat({x1 * c - x2 * s, x1 * s + x2 * c}, -1);
}

}  // namespace

int main() {
  at::manual_seed(0);
  int failures = 0;
  // A (B, S, H, D) tensor seen as (B, H, S, D): non-contiguous, as attention code passes it.
  auto x = at::randn({2, 17, 3, 16}).transpose(1, 2);
  auto inv_freq = at::rand({8});
  for (bool interleaved : {false, true}) {
    auto got = call_rotary(x, inv_freq, interleaved);
    auto want = expected_rotary(x, inv_freq, interleaved);
    const double err = (got - want).abs().max().item<double>();
    const bool ok = err < 1e-5;
    std::printf("rotary interleaved=%d max_abs_err=%.3g %s\n", int(interleaved), err,
                ok ? "ok" : "FAIL");
    failures += ok ? 0 : 1;
  }
  // Gradients to x and inv_freq through the dispatcher's Autograd kernel, against autograd
  // through the ATen formula.
  for (bool interleaved : {false, true}) {
    auto xg = x.detach().clone().requires_grad_(true);
    auto fg = inv_freq.detach().clone().requires_grad_(true);
    auto xr = x.detach().clone().requires_grad_(true);
    auto fr = inv_freq.detach().clone().requires_grad_(true);
    auto grad_out = at::randn(x.sizes());
    call_rotary(xg, fg, interleaved).backward(grad_out);
    expected_rotary(xr, fr, interleaved).backward(grad_out);
    const double err_x = (xg.grad() - xr.grad()).abs().max().item<double>();
    const double err_f =
        (fg.grad() - fr.grad()).abs().max().item<double>() / fr.grad().abs().max().item<double>();
    const bool ok = err_x < 1e-5 && err_f < 1e-4;
    std::printf("rotary backward interleaved=%d grad_x err=%.3g grad_inv_freq rel err=%.3g %s\n",
                int(interleaved), err_x, err_f, ok ? "ok" : "FAIL");
    failures += ok ? 0 : 1;
  }
  return failures == 0 ? 0 : 1;
}
