"""Where the CUDA attention (and rotary) time goes, kernel by kernel (torch.profiler), for the
issue-3 shape (and issue 2's rotary shape):

    python benchmarks/gpu/profile_attention.py [--S 4096] [--D 128]

Runs fastattn.attention forward and forward+backward with the learned table (the table's
gradient on), once more with the backward's dQ turns switched off (FASTATTN_CUDA_UNORDERED_DQ:
what the deterministic order costs) and the forward with its lazy rescale off
(FASTATTN_CUDA_RESCALE_SLACK=0: what it saves), without the table, and SDPA's flash backend for scale,
and prints the summed CUDA time of each kernel per call. A diagnostic for a lent GPU, not a benchmark of record (that is
benchmarks/bench_attention.py).
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
from common import with_env  # noqa: E402  (benchmarks/common.py)


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--max-dist", type=int, default=256)
    ap.add_argument("--once", action="store_true",
                    help="one forward+backward with the table and nothing else (for ncu)")
    args = ap.parse_args()
    B, H, S, D = args.B, args.H, args.S, args.D
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt, generator=g).requires_grad_() for _ in range(3))
    table = (0.1 * torch.randn(2 * args.max_dist - 1, H, device=dev, generator=g)).requires_grad_()
    grad_out = torch.randn(B, H, S, D, device=dev, dtype=dt, generator=g)
    flops_fwd = 4 * B * H * S * S * D

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
        return with_env("FASTATTN_CUDA_UNORDERED_DQ", "1", lambda: fwd_bwd(True))

    def fwd_classic_rescale():
        # The forward's lazy rescale switched off (rescale whenever a row's max grows): the
        # difference to "fastattn fwd, table" is what it saves.
        return with_env("FASTATTN_CUDA_RESCALE_SLACK", "0", lambda: fwd(True))

    def sdpa_fwd_bwd():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v)
            return torch.autograd.grad(out, [q, k, v], grad_out)

    if args.once:
        fwd_bwd(True)
        torch.cuda.synchronize()
        return 0
    xr = torch.randn(4, 32, 2048, 128, device=dev, dtype=dt, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 128, 2, device=dev, dtype=torch.float32) / 128))
    copy_dst = torch.empty_like(xr)
    cases = {
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
    print(f"B={B} H={H} S={S} D={D} bf16; {torch.cuda.get_device_name()}")
    for name, fn in cases.items():
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
