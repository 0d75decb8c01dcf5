"""Where the CUDA attention (and rotary) time goes, kernel by kernel (torch.profiler), at
bench_attention.py's CUDA shape (B=2 H=16 S=4096 D=128 bfloat16, table (511, 16)) and
bench_rotary.py's (4, 32, 2048, 128) bfloat16:

    python benchmarks/gpu/profile_attention.py [--S 4096] [--D 128]

Runs fastattn.attention forward and forward+backward with the learned table (the table's
gradient on), once more with the backward's dQ turns switched off (FASTATTN_CUDA_UNORDERED_DQ:
what the deterministic order costs) and the forward with its lazy rescale off
(FASTATTN_CUDA_RESCALE_SLACK=0: what it saves), without the table, and SDPA's flash backend
for scale, and prints the summed CUDA time of each kernel per call. A diagnostic, not a
benchmark of record (that is benchmarks/bench_attention.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastattn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import with_tuning  # noqa: E402  (benchmarks/common.py)


def kernel_times(fn, iters: int = 5) -> dict:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name[:90]] += evt.device_time / 1000.0 / iters  # ms per call
    return dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--max-dist", type=int, default=256)
    ap.add_argument("--once", action="store_true",
                    help="one forward+backward with the table and nothing else (for ncu)")
    return ap.parse_args()


def build_cases(args) -> dict:
    """{name: fn} of the calls to profile."""
    B, H, S, D = args.B, args.H, args.S, args.D
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt, generator=g).requires_grad_() for _ in range(3))
    table = (0.1 * torch.randn(2 * args.max_dist - 1, H, device=dev, generator=g)).requires_grad_()
    grad_out = torch.randn(B, H, S, D, device=dev, dtype=dt, generator=g)

    def fwd(bias):
        with torch.no_grad():
            return fastattn.attention(q, k, v, rel_bias=table if bias else None)

    def fwd_bwd(bias):
        out = fastattn.attention(q, k, v, rel_bias=table if bias else None)
        leaves = [q, k, v, table] if bias else [q, k, v]
        return torch.autograd.grad(out, leaves, grad_out)

    def fwd_bwd_unordered_dq():
        # The diagnostic switch of the CUDA backward (attention_api.cu): no dQ turns, so the
        # difference to "fastattn fwd+bwd, table" is what the bitwise-reproducible order costs.
        return with_tuning(lambda: fwd_bwd(True), unordered_dq=True)

    def fwd_classic_rescale():
        # The forward's lazy rescale switched off (rescale whenever a row's max grows): the
        # difference to "fastattn fwd, table" is what it saves.
        return with_tuning(lambda: fwd(True), rescale_slack=0.0)

    def sdpa_fwd_bwd():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v)
            return torch.autograd.grad(out, [q, k, v], grad_out)

    if args.once:
        return {"fastattn fwd+bwd, table": lambda: fwd_bwd(True)}
    xr = torch.randn(4, 32, 2048, 128, device=dev, dtype=dt, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 128, 2, device=dev, dtype=torch.float32) / 128))
    copy_dst = torch.empty_like(xr)
    return {
        "rotary fwd bf16 (4, 32, 2048, 128)": lambda: fastattn.rotary(xr, inv_freq=inv_freq),
        "copy_ of the same tensor": lambda: copy_dst.copy_(xr),
        "fastattn fwd, table": lambda: fwd(True),
        "fastattn fwd, table, rescale whenever the max grows (diagnostic)": fwd_classic_rescale,
        "fastattn fwd+bwd, table": lambda: fwd_bwd(True),
        "fastattn fwd+bwd, table, dQ without turns (diagnostic, not deterministic)": fwd_bwd_unordered_dq,
        "fastattn fwd, no bias": lambda: fwd(False),
        "fastattn fwd+bwd, no bias": lambda: fwd_bwd(False),
        "SDPA flash fwd+bwd": sdpa_fwd_bwd,
    }


def profile_case(name: str, fn, flops_fwd: float) -> None:
    """Print the case's kernel times (torch.profiler) and its time per call (20 calls between
    two CUDA events)."""
    times = kernel_times(fn)
    total = sum(times.values())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        fn()
    end.record()
    torch.cuda.synchronize()
    print(f"\n{name}: {total:.3f} ms of kernels per call, {start.elapsed_time(end) / 20:.3f} ms per call")
    for kname, ms in times.items():
        if ms > 0.005:
            tf = ""
            if "fwd" in kname or "forward" in kname:
                tf = f"  ({flops_fwd / ms / 1e9:.0f} TFLOP/s at fwd flops)"
            print(f"  {ms:8.3f} ms  {kname}{tf}")


def main() -> int:
    args = parse()
    cases = build_cases(args)
    if args.once:
        next(iter(cases.values()))()
        torch.cuda.synchronize()
        return 0
    print(f"B={args.B} H={args.H} S={args.S} D={args.D} bf16; {torch.cuda.get_device_name()}")
    for name, fn in cases.items():
        profile_case(name, fn, 4 * args.B * args.H * args.S * args.S * args.D)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
