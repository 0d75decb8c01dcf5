"""Attention dropout and attention weights: what they cost, next to the peers a user would write.

Forward+backward of fastattn.attention with a learned table and dropout_p=0.1, against the same
call without dropout and against SDPA with dropout_p=0.1 and the materialized table bias (which
gets its gradient through the (H, S, S) bias); and fastattn.attention_weights for one head
against softmax(q k^T * scale + bias) in PyTorch. Peers are timed round-robin in the same run.

    python benchmarks/bench_dropout.py               # B=1 H=8 S=2048 D=64 float32; weights at S=4096
    python benchmarks/bench_dropout.py --quick
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Check, Report, load_fastattn, make_parser, materialized_bias, parse_args, run,  # noqa: E402
                    time_many, timing)
from targets import TARGETS  # noqa: E402


def main(argv=None) -> int:
    p = make_parser(__doc__, warmup=2, repeats=7, quick="S=512, weights at S=1024")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--S", type=int, default=2048)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--weights-S", type=int, default=4096)
    p.add_argument("--p", type=float, default=0.1)
    args = parse_args(p, argv)
    if args.quick:
        args.S, args.weights_S = 512, 1024
    fastattn = load_fastattn()
    dev, B, H, S, D = args.dev, args.B, args.H, args.S, args.D
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, generator=g).requires_grad_() for _ in range(3))
    table = (0.1 * torch.randn(255, H, device=dev, generator=g)).requires_grad_()
    grad_out = torch.randn(B, H, S, D, device=dev, generator=g)
    leaves = (q, k, v, table)

    def fastattn_call(p_drop):
        def f():
            out = fastattn.attention(q, k, v, rel_bias=table, dropout_p=p_drop)
            torch.autograd.grad(out, leaves, grad_out)
        return f

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=materialized_bias(table, S, S), dropout_p=args.p)
        torch.autograd.grad(out, leaves, grad_out)

    t = time_many({"dropout": fastattn_call(args.p), "none": fastattn_call(0.0), "sdpa": sdpa}, **timing(args))
    report = Report("attention dropout and attention weights",
                    f"B={B} H={H} S={S} D={D} float32, table (255, {H}), dropout_p={args.p}", dev)
    report.table(["forward+backward", "median ms", "min ms"],
                 [[f"fastattn dropout_p={args.p}", f"{t['dropout'].median_ms:.1f}", f"{t['dropout'].min_ms:.1f}"],
                  ["fastattn dropout_p=0", f"{t['none'].median_ms:.1f}", f"{t['none'].min_ms:.1f}"],
                  [f"SDPA dropout_p={args.p}, materialized bias", f"{t['sdpa'].median_ms:.1f}",
                   f"{t['sdpa'].min_ms:.1f}"]])
    checks = [Check(TARGETS["cpu_dropout_over_no_dropout"], t["dropout"].median_ms / t["none"].median_ms,
                    minimum=t["dropout"].min_ms / t["none"].min_ms, info=args.cuda),
              Check(TARGETS["cpu_dropout_vs_sdpa_bias"], t["sdpa"].median_ms / t["dropout"].median_ms,
                    minimum=t["sdpa"].min_ms / t["dropout"].min_ms, info=args.cuda)]

    if hasattr(fastattn, "attention_weights"):
        Sw = args.weights_S
        qw, kw = (torch.randn(1, 1, Sw, D, device=dev, generator=g) for _ in range(2))
        tw = 0.1 * torch.randn(255, 1, device=dev, generator=g)
        scale = D ** -0.5
        with torch.no_grad():
            tw_times = time_many({
                "weights": lambda: fastattn.attention_weights(qw, kw, rel_bias=tw),
                "softmax": lambda: torch.softmax(qw @ kw.transpose(-1, -2) * scale + materialized_bias(tw, Sw, Sw), -1),
            }, **timing(args))
        report.table(["attention weights, one head, S=" + str(Sw), "median ms"],
                     [["fastattn.attention_weights", f"{tw_times['weights'].median_ms:.1f}"],
                      ["softmax(q k^T scale + bias)", f"{tw_times['softmax'].median_ms:.1f}"]])
        checks.append(Check(TARGETS["cpu_weights_vs_softmax"],
                            tw_times["softmax"].median_ms / tw_times["weights"].median_ms, info=args.cuda))
    report.checks(checks, default_shape=(B, H, S, D) == (1, 8, 2048, 64) and not args.quick)
    report.emit(args)
    return 0


if __name__ == "__main__":
    run(main)
