"""The attention backward's transient memory and time with few kv heads (MQA / GQA).

With one (batch, kv head) the backward splits the query blocks into chunks to keep the
threads busy, each with a float32 partial of dK / dV; the chunks run in rounds as wide as the
threads, so the partials held at once are bounded by the thread count. This script reports,
per shape: the bytes the CPU allocator handed out during one backward call, less its outputs
(the transient memory, counted from the profiler's allocation events: exact, not an RSS
estimate), in units of one float32 dK + dV plane, and the K + V input size for scale; and the
time of forward + backward, next to SDPA's (K / V repeated to the query heads, the peer a user
would write), timed in the same run.

    python benchmarks/bench_gqa_backward.py            # B=1 Hkv=1 Hq=8 D=128 bf16, S 4096 and 32768
    python benchmarks/bench_gqa_backward.py --Hkv 4 --Hq 16 --S 2048 --dtype float32
    python benchmarks/bench_gqa_backward.py --quick
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Report, load_fastattn, make_parser, parse_args, run, time_many, timing  # noqa: E402


def allocated_during(fn) -> tuple:
    """(bytes handed out by the CPU allocator during fn(), fn's result)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    leaves = [e for e in prof.events() if e.cpu_memory_usage > 0 and not e.cpu_children]
    return sum(e.cpu_memory_usage for e in leaves), result


def main(argv=None) -> int:
    p = make_parser(__doc__, warmup=1, repeats=3, quick="S 1024 and 4096, Hq 4")
    p.add_argument("--Hq", type=int, default=8)
    p.add_argument("--Hkv", type=int, default=1)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--S", type=int, nargs="+", default=[4096, 32768],
                   help="sequence lengths (the longest is measured for memory only)")
    p.add_argument("--dtype", default="bfloat16")
    args = parse_args(p, argv)
    if args.quick:
        args.S, args.Hq = [1024, 4096], 4
    fastattn = load_fastattn()
    dtype = getattr(torch, args.dtype)
    threads = torch.get_num_threads()
    report = Report("attention backward with one kv head: transient memory and time",
                    f"B=1 Hkv={args.Hkv} Hq={args.Hq} D={args.D} {args.dtype} causal, {threads} threads", args.dev)
    mem_rows, time_rows = [], []
    for i, S in enumerate(args.S):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, args.Hq, S, args.D, generator=g).to(dtype)
        k, v = (torch.randn(1, args.Hkv, S, args.D, generator=g).to(dtype) for _ in range(2))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = fastattn.attention(qg, kg, vg, causal=True)
        grad_out = torch.randn_like(out)
        allocated, grads = allocated_during(lambda: torch.autograd.grad(out, (qg, kg, vg), grad_out))
        transient = allocated - sum(t.numel() * t.element_size() for t in grads)
        del out
        plane = args.Hkv * S * 2 * args.D * 4
        kv_bytes = 2 * k.numel() * k.element_size()
        mem_rows.append([S, f"{kv_bytes / 2**20:.0f}", f"{transient / 2**20:.1f}", f"{transient / plane:.2f}"])
        if i == len(args.S) - 1 and len(args.S) > 1:
            continue  # the longest: memory only

        def fa():
            torch.autograd.grad(fastattn.attention(qg, kg, vg, causal=True), (qg, kg, vg), grad_out)

        def sdpa():
            ke, ve = (t.repeat_interleave(args.Hq // args.Hkv, dim=1) for t in (kg, vg))
            o = torch.nn.functional.scaled_dot_product_attention(qg, ke, ve, is_causal=True)
            torch.autograd.grad(o, (qg, kg, vg), grad_out)

        t = time_many({"fastattn": fa, "sdpa": sdpa}, **timing(args))
        time_rows.append([S, f"{t['fastattn'].median_ms:.1f}", f"{t['sdpa'].median_ms:.1f}",
                          f"{t['sdpa'].median_ms / t['fastattn'].median_ms:.2f}"])
    report.table(["S", "K+V MiB", "backward transient MiB", "in fp32 dK+dV planes"], mem_rows)
    report.table(["S", "fastattn fwd+bwd ms", "SDPA fwd+bwd ms (K/V repeated)", "SDPA / fastattn"], time_rows)
    report.emit(args)
    return 0


if __name__ == "__main__":
    run(main)
