"""Small CUDA calls of every kernel, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck python benchmarks/gpu/sanitize_cases.py

Ragged sizes (S not a multiple of any tile, odd head dims) so that the edge paths run; every
dtype and head-dim class; forward and backward with all options. Values are also checked
against the reference, so a case that runs clean but computes garbage still fails.
"""
import itertools
import sys

import torch

import fastattn
from fastattn import reference


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


def attention_case(dtype, D, Dv, Hq, Hkv, Sq, Sk, **kw):
    dev = "cuda"
    torch.manual_seed(0)
    q = torch.randn(2, Hq, Sq, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(2, Hkv, Sk, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(2, Hkv, Sk, Dv, device=dev, dtype=dtype, requires_grad=True)
    extra = {}
    if kw.pop("bias", False):
        extra["rel_bias"] = torch.randn(2 * 7 - 1, Hq, device=dev, requires_grad=True)
    if kw.pop("span", False):
        extra["span"] = torch.full((Hq,), 5.0, device=dev, requires_grad=True)
        extra["span_ramp"] = 3.0
    if kw.pop("lengths", False):
        extra["key_lengths"] = torch.tensor([Sk, max(1, Sk // 2)], device=dev)
    extra.update(kw)
    out = fastattn.attention(q, k, v, **extra)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v] + [t for t in extra.values() if torch.is_tensor(t) and t.requires_grad], g)
    torch.cuda.synchronize()
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_extra = {n: (t.detach().double().cpu().requires_grad_(t.requires_grad) if torch.is_tensor(t) and t.is_floating_point() else (t.cpu() if torch.is_tensor(t) else t)) for n, t in extra.items()}
    ref_out = reference.attention(*ref_in, **ref_extra)
    err = rel_err(out.cpu(), ref_out)
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    assert err < tol, (dtype, D, Sq, Sk, kw, err)
    return err


def main():
    n = 0
    for dtype, D in itertools.product((torch.bfloat16, torch.float16, torch.float32), (32, 64, 96, 128, 256)):
        attention_case(dtype, D, D, 4, 2, 37, 45, causal=True, bias=True)
        n += 1
    for kw in (dict(window=(5, 3)), dict(num_global=3, window=(4, 0)), dict(span=True), dict(lengths=True, bias=True),
               dict(causal=True, window=(9, 0), bias=True, span=True)):
        attention_case(torch.bfloat16, 40, 24, 4, 1, 70, 131, **kw)
        n += 1
    attention_case(torch.float16, 64, 64, 2, 2, 1, 77, causal=True, bias=True)  # decode step
    n += 1
    # rotary: every layout and option, bf16 and fp32
    for dtype, inter in itertools.product((torch.bfloat16, torch.float32), (True, False)):
        x = torch.randn(2, 3, 19, 24, device="cuda", dtype=dtype, requires_grad=True)
        inv = (1.0 / (10000 ** (torch.arange(0, 20, 2, device="cuda") / 20))).requires_grad_()
        rot = torch.randn(24, 24, device="cuda", requires_grad=True)
        y = fastattn.rotary(x, inv_freq=inv, rotary_dim=20, interleaved=inter, rotation=rot)
        torch.autograd.grad(y, [x, inv, rot], torch.randn_like(y))
        y_ref = reference.rotary(x.detach().double().cpu(), inv_freq=inv.detach().double().cpu(), rotary_dim=20,
                                 interleaved=inter, rotation=rot.detach().double().cpu())
        assert rel_err(y.cpu(), y_ref) < 2e-2
        n += 1
    torch.cuda.synchronize()
    print(f"sanitize cases: {n} ran and matched the reference")


if __name__ == "__main__":
    sys.exit(main())
