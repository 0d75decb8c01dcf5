"""A minute's check of a fresh CUDA build: do the CUDA attention kernels finish, agree with the
float64 reference and repeat bitwise? Run before the long stages (run_all.sh `smoke`, which
also puts a time limit on it), so that a hang or a wrong result shows up at once:

    python benchmarks/gpu/smoke.py

Cases: bf16 and fp16, head dims 64 / 128 / 256, GQA, the learned table, causal and full, long
enough that several key blocks add into each query block's dQ in turn (the backward's turn
order), plus one MQA case narrow enough to split the query-head group over blocks. Each case
prints the largest error of out and of every gradient relative to the reference's largest
value, and whether two backward passes gave bitwise-equal gradients. Exit code 1 on any
failure. A diagnostic, not a test of record (that is tests/, `pytest -m cuda`).
"""
from __future__ import annotations

import sys
import time

import torch

import fastattn
from fastattn import reference

# Largest |got - exact| / max|exact| allowed, per dtype: a few units of the format's rounding
# over sums of a thousand terms (the test suite's tolerances are tighter and per element).
BUDGET = {torch.bfloat16: 4e-2, torch.float16: 8e-3}

CASES = [
    # B, Hq, Hkv, S, D, dtype, causal
    (1, 4, 2, 1024, 64, torch.bfloat16, True),
    (1, 4, 2, 1024, 128, torch.bfloat16, False),
    (1, 4, 2, 1024, 128, torch.float16, True),
    (1, 2, 1, 512, 256, torch.bfloat16, True),
    (1, 8, 1, 384, 128, torch.bfloat16, False),  # MQA, few key blocks: the group split
]


def run(q, k, v, table, causal, grad_out):
    q, k, v, table = (t.detach().requires_grad_() for t in (q, k, v, table))
    out = fastattn.attention(q, k, v, rel_bias=table, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v, table), grad_out)
    return [out.detach(), *grads]


def run_reference(q, k, v, table, causal, grad_out):
    q, k, v, table = (t.detach().double().requires_grad_() for t in (q, k, v, table))
    out = reference.attention(q, k, v, rel_bias=table, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v, table), grad_out.double())
    return [out.detach(), *grads]


def main() -> int:
    if not torch.cuda.is_available():
        print("smoke: no CUDA device")
        return 1
    print(fastattn.build_info())
    failed = False
    names = ("out", "dq", "dk", "dv", "dtable")
    for B, Hq, Hkv, S, D, dtype, causal in CASES:
        g = torch.Generator(device="cuda").manual_seed(S + D)
        q = torch.randn(B, Hq, S, D, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
        table = torch.randn(2 * 64 - 1, Hq, device="cuda", dtype=torch.float32, generator=g)
        grad_out = torch.randn(B, Hq, S, D, device="cuda", dtype=dtype, generator=g)
        label = f"B{B} H{Hq}/{Hkv} S{S} D{D} {str(dtype)[6:]} {'causal' if causal else 'full'}"
        t0 = time.perf_counter()
        got = run(q, k, v, table, causal, grad_out)
        again = run(q, k, v, table, causal, grad_out)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        exact = run_reference(q, k, v, table, causal, grad_out)
        errors = []
        for name, a, e in zip(names, got, exact):
            scale = e.abs().max().item()
            err = (a.double() - e).abs().max().item() / max(scale, 1e-30)
            errors.append(err)
        repeat = all(torch.equal(a, b) for a, b in zip(got, again))
        ok = repeat and all(err <= BUDGET[dtype] for err in errors)
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {label:38s} "
              + " ".join(f"{n} {e:.1e}" for n, e in zip(names, errors))
              + f"  bitwise repeat {'yes' if repeat else 'NO'}  ({seconds:.2f} s for 2 fwd+bwd)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
