"""Benchmark fastattn.rotary against the eager rotary formula that reads interleaved pairs and
writes the two halves (eager and torch.compile) and a plain copy_ of the same tensor, in one run.

    python benchmarks/bench_rotary.py                  # B=4 H=32 S=2048 D=128 float32, CPU
    python benchmarks/bench_rotary.py --quick          # smoke run, S=256
    python benchmarks/bench_rotary.py --device cuda --dtype bfloat16
    python benchmarks/bench_rotary.py --record benchmarks/results/cpu.md

What is timed (x is (B, H, S, D); angles from inv_freq at positions 0..S-1):
  fastattn fwd            fastattn.rotary(x, inv_freq=..., interleaved=...)  (new output)
  fastattn fwd inplace    the same with inplace=True (no allocation)
  fastattn fwd+bwd        forward, then the gradient of x for a given grad_out
  eager formula fwd(+bwd) the pairs-to-halves formula (pairs_to_halves below), eager: x's
                          interleaved pairs (x[..., ::2], x[..., 1::2]) rotated and written as
                          the two halves of the output
  compiled formula ...    the same function through torch.compile
  copy_                   out.copy_(x) into a preallocated tensor: the bandwidth yardstick
GB/s counts the bytes a fused kernel must move: read x + write y (forward), plus read
grad_out + write grad_x (backward).

On CUDA each call is timed alone (latency: CUDA events around one call after a synchronize,
so the host's time before the launch counts), and the bandwidth cases are also timed back to
back (throughput: 20 queued calls between two events, as in a training loop; rows marked
"back to back"). The GPU bandwidth target is about forward throughput, so it uses the
back-to-back rows; the per-call ratios are printed for information. On CPU calls are
synchronous and there is one timing per case. Each ratio is given from the medians (the
figure checked) and, for reference on a noisy machine, from the minimums.

Targets (benchmarks/targets.py): cpu_rotary_fwd_bwd_vs_eager, cpu_rotary_fwd_bwd_vs_compiled
(printed for information on CUDA), cpu_rotary_fwd_vs_copy (CPU) or cuda_rotary_fwd_vs_copy.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Check, Report, gbps, load_fastattn, make_parser, parse_args, peak_memory, run,  # noqa: E402
                    time_back_to_back, time_fn, timing)
from targets import TARGETS  # noqa: E402

COPY, CLONE, FWD, INPLACE, FWD_BWD = ("copy_ (x -> preallocated)", "clone (allocate + copy)", "fastattn fwd",
                                      "fastattn fwd inplace", "fastattn fwd+bwd")
B2B = " (back to back)"


def parse(argv=None):
    p = make_parser(__doc__, warmup=3, repeats=10, quick="S=256")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--H", type=int, default=32)
    p.add_argument("--S", type=int, default=2048)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--half-split", action="store_true",
                   help="time fastattn with the half-split (GPT-NeoX) layout; default interleaved, "
                        "the layout the eager formula reads")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parse_args(p, argv)
    if args.quick:
        args.S = min(args.S, 256)
    return args


def pairs_to_halves(x, inv_freq):
    """Rotary on (B, H, S, D): reads interleaved pairs, writes the two halves."""
    pos = torch.arange(x.shape[2], device=x.device, dtype=inv_freq.dtype)
    sinusoid_inp = torch.einsum("i , j -> i j", pos, inv_freq)
    sin = sinusoid_inp.sin()[None, None, :, :].to(x.dtype)
    cos = sinusoid_inp.cos()[None, None, :, :].to(x.dtype)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def build_cases(args, fastattn) -> list:
    """[(name, fn, bytes moved)], after printing fastattn's largest difference to the formula."""
    dev, dtype, interleaved = args.dev, getattr(torch, args.dtype), not args.half_split
    gen = torch.Generator().manual_seed(0)
    x, grad_out = (torch.randn(args.B, args.H, args.S, args.D, generator=gen).to(dev, dtype) for _ in range(2))
    inv_freq = (1.0 / (10000 ** (torch.arange(0, args.D, 2, dtype=torch.float32) / args.D))).to(dev)
    xg, x_inplace, copy_dst = x.clone().requires_grad_(True), x.clone(), torch.empty_like(x)
    nbytes = x.numel() * x.element_size()

    def fa_fwd():
        return fastattn.rotary(x, inv_freq=inv_freq, interleaved=interleaved)

    def eager_fwd():
        with torch.no_grad():
            return pairs_to_halves(x, inv_freq)

    with torch.no_grad():
        if interleaved:
            got = fa_fwd()
            got = torch.cat([got[..., 0::2], got[..., 1::2]], dim=-1)
            err = (got.float() - eager_fwd().float()).abs().max().item()
            print(f"max |fastattn - pairs-to-halves formula| = {err:.3g}", flush=True)

    cases = [
        (COPY, lambda: copy_dst.copy_(x), 2 * nbytes),
        (CLONE, lambda: x.clone(), 2 * nbytes),
        (FWD, fa_fwd, 2 * nbytes),
        (INPLACE, lambda: fastattn.rotary(x_inplace, inv_freq=inv_freq, interleaved=interleaved, inplace=True),
         2 * nbytes),
        (FWD_BWD, lambda: torch.autograd.grad(fastattn.rotary(xg, inv_freq=inv_freq, interleaved=interleaved),
                                              xg, grad_out), 4 * nbytes),
        ("eager formula fwd", eager_fwd, 2 * nbytes),
        ("eager formula fwd+bwd", lambda: torch.autograd.grad(pairs_to_halves(xg, inv_freq), xg, grad_out),
         4 * nbytes),
    ]
    if not args.no_compile:
        compiled = torch.compile(pairs_to_halves)

        def compiled_fwd():
            with torch.no_grad():
                return compiled(x, inv_freq)

        cases += [("compiled formula fwd", compiled_fwd, 2 * nbytes),
                  ("compiled formula fwd+bwd", lambda: torch.autograd.grad(compiled(xg, inv_freq), xg, grad_out),
                   4 * nbytes)]
    return cases


def measure(args, cases: list) -> tuple:
    """{name: Timing} and the table rows. Each case is warmed up and then timed over
    consecutive repeats, as it runs in a training loop. (Not round-robin: on VMs that hand
    freed memory back to the host, e.g. Firecracker with free page reporting, an allocation
    made seconds after a large free pays host page faults, which would charge the other cases'
    frees to whichever case runs next.)"""
    timings = {name: time_fn(fn, **timing(args)) for name, fn, _ in cases}
    rows = []
    for name, fn, moved in cases:
        t, mem = timings[name], peak_memory(fn, device=args.dev)
        rows.append([name, t.median_ms, t.min_ms, gbps(moved, t.median_ms), None if mem is None else mem / 2**20])
        print(f"  {name:28s} {t}  {gbps(moved, t.median_ms):7.2f} GB/s", flush=True)
    if args.cuda:  # throughput of copy_, clone and the two forwards
        for name, fn, moved in cases[:4]:
            t = timings[name + B2B] = time_back_to_back(fn, **timing(args))
            rows.append([name + B2B, t.median_ms, t.min_ms, gbps(moved, t.median_ms), None])
            print(f"  {name + B2B:28s} {t}  {gbps(moved, t.median_ms):7.2f} GB/s", flush=True)
    return timings, rows


def checks(args, timings: dict) -> list:
    def check(target, base, ours, label, info=False):
        med = timings[base].median_ms / timings[ours].median_ms
        return Check(TARGETS[target], med, label, timings[base].min_ms / timings[ours].min_ms, info)

    out = [check("cpu_rotary_fwd_bwd_vs_eager", "eager formula fwd+bwd", FWD_BWD,
                 "fwd+bwd speedup vs the eager formula", info=args.cuda)]
    if "compiled formula fwd+bwd" in timings:
        out.append(check("cpu_rotary_fwd_bwd_vs_compiled", "compiled formula fwd+bwd", FWD_BWD,
                         "fwd+bwd speedup vs torch.compile(formula)", info=args.cuda))
    # Same bytes moved, so the bandwidth ratio is the inverse time ratio.
    bw, sfx = ("cuda_rotary_fwd_vs_copy", B2B) if args.cuda else ("cpu_rotary_fwd_vs_copy", "")
    out += [check(bw, COPY + sfx, FWD + sfx, "fwd bandwidth / copy_ bandwidth" + sfx),
            check(bw, COPY + sfx, INPLACE + sfx, "fwd inplace bandwidth / copy_ bandwidth" + sfx),
            check(bw, CLONE + sfx, FWD + sfx, "fwd bandwidth / clone bandwidth (both allocate)" + sfx)]
    if args.cuda:
        out += [check(bw, COPY, FWD, "fwd bandwidth / copy_ bandwidth (per call)", info=True),
                check(bw, COPY, INPLACE, "fwd inplace bandwidth / copy_ bandwidth (per call)", info=True)]
    return out


def build_report(args, timings: dict, rows: list) -> Report:
    report = Report("rotary", f"B={args.B} H={args.H} S={args.S} D={args.D} {args.dtype}, "
                              f"{'half-split' if args.half_split else 'interleaved'}, inv_freq angles, "
                              f"positions 0..S-1", args.dev)
    report.table(["what", "median ms", "min ms", "GB/s", "peak MiB"], rows)
    report.checks(checks(args, timings), default_shape=(args.B, args.H, args.S, args.D) == (4, 32, 2048, 128))
    if not args.cuda and os.environ.get("FASTATTN_CPU_OUTPUT_CACHE") == "0":
        report.note("run with FASTATTN_CPU_OUTPUT_CACHE=0: every large fastattn output is fresh memory.")
    elif not args.cuda:
        report.note("fastattn's large CPU outputs come from its cache of released buffers "
                    "(csrc/cpu/output_buffers.cpp; FASTATTN_CPU_OUTPUT_CACHE=0 turns it off), so after the "
                    "warm-up its output memory is reused, like copy_'s preallocated destination, and its "
                    "peak column does not count it. The cache drops buffers idle for 10 s, so a case whose "
                    "peak is measured long after its timing (fwd+bwd, after the slow eager cases) may count "
                    "one fresh buffer.")
    return report


def main(argv=None) -> int:
    args = parse(argv)
    cases = build_cases(args, load_fastattn())
    timings, rows = measure(args, cases)
    build_report(args, timings, rows).emit(args)
    return 0


if __name__ == "__main__":
    run(main)
