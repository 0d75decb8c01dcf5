"""Benchmark fastattn.attention's sliding windows and adaptive spans (forward), all timed in one
run: cost must follow the number of unmasked pairs, not S^2.

    python benchmarks/bench_window.py                  # CPU: H=8 D=64 float32
    python benchmarks/bench_window.py --quick          # smoke run, small S
    python benchmarks/bench_window.py --device cuda    # bfloat16 D=128 S=16384 vs 2048
    python benchmarks/bench_window.py --record benchmarks/results/cpu-attention.md

CPU (B=1, H=8, D=64, float32, forward, no autograd):
  window    fastattn window=(256, 256) at S=8192, against
            - torch.compile(flex_attention) with a sliding-window BlockMask (the block mask is
              built once, outside the timed region, as a user would reuse it), and
            - F.scaled_dot_product_attention with a boolean (S, S) window mask (built outside the
              timed region too);
  scaling   fastattn window=(256, 256) at S = 4096, 8192, 16384;
  span      fastattn span=64, span_ramp=32 (per head) at S=8192, against the same call with a
            span past S (every pair visible: the kernel cannot skip anything).
CUDA (bfloat16, D=128, B=2, H=16): window=(1024, 0) at S=16384 against no window at S=2048.

TFLOP/s = 4*B*H*D*(unmasked (query, key) pairs) / time. Peak memory as in bench_attention.py
(CPU: RSS rise of one call in a fresh child process with mmap-backed malloc; CUDA:
max_memory_allocated).

Targets (benchmarks/targets.py): cpu_window_vs_flex, cpu_window_vs_sdpa_bool_mask,
cpu_window_time_per_doubling, cpu_span_vs_span_past_s (CPU); cuda_window_tflops_vs_full (CUDA).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Check, Report, attention_flops, child_result, fresh_allocator, load_fastattn,  # noqa: E402
                    make_parser, measure_in_child, parse_args, peak_memory, run, sync, time_fn, timing)
from targets import TARGETS  # noqa: E402

MB = 1e6


def parse(argv=None):
    p = make_parser(__doc__, warmup=2, repeats=5, quick="S=1024 (scaling 512..2048), window 32")
    p.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"],
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--B", type=int, help="default 1 (CPU) / 2 (CUDA)")
    p.add_argument("--H", type=int, help="default 8 (CPU) / 16 (CUDA)")
    p.add_argument("--D", type=int, help="default 64 (CPU) / 128 (CUDA)")
    p.add_argument("--S", type=int, help="main sequence length: 8192 (CPU) / 16384 (CUDA)")
    p.add_argument("--window", type=int, nargs=2, help="default 256 256 (CPU) / 1024 0 (CUDA)")
    p.add_argument("--span", type=float, default=64.0)
    p.add_argument("--span-ramp", type=float, default=32.0)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes minutes on CPU)")
    p.add_argument("--no-sdpa", action="store_true", help="skip SDPA with a dense boolean mask")
    p.add_argument("--_mem-child", dest="mem_child", action="store_true", help=argparse.SUPPRESS)
    args = parse_args(p, argv)
    cuda = args.cuda
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.B, args.H, args.D = args.B or (2 if cuda else 1), args.H or (16 if cuda else 8), \
        args.D or (128 if cuda else 64)
    args.S = args.S or (16384 if cuda else 8192)
    args.window = tuple(args.window) if args.window else ((1024, 0) if cuda else (256, 256))
    args.short = 2048  # CUDA: the unwindowed comparison
    if args.quick:
        args.S, args.short = min(args.S, 1024), 256
        args.window = tuple(min(w, 32) for w in args.window)
        args.span, args.span_ramp = min(args.span, 16.0), min(args.span_ramp, 8.0)
    args.default_shape = ((args.B, args.H, args.D, args.S, args.window, args.dtype)
                          == (1, 8, 64, 8192, (256, 256), torch.float32)) if not cuda \
        else ((args.D, args.S, args.window, args.dtype) == (128, 16384, (1024, 0), torch.bfloat16))
    return args


def child_argv(args) -> list:
    return (["--device", args.device, "--dtype", str(args.dtype).replace("torch.", ""), "--B", str(args.B),
             "--H", str(args.H), "--D", str(args.D), "--S", str(args.S), "--window", str(args.window[0]),
             str(args.window[1]), "--span", str(args.span), "--span-ramp", str(args.span_ramp), "--_mem-child"]
            + (["--no-sdpa"] if args.no_sdpa else []))


def span_pairs(Sq: int, Sk: int, span: float, ramp: float) -> int:
    """Pairs with m(d) > 0, i.e. |d| < ramp + span (bottom-right aligned)."""
    reach = int(torch.tensor(ramp + span).ceil().item()) - 1  # largest |d| that passes
    if reach < 0:
        return 0
    total = 0
    for i in range(Sq):
        p = i + Sk - Sq
        total += max(0, min(Sk - 1, p + reach) - max(0, p - reach) + 1)
    return total


def window_mask(S: int, window, dev) -> torch.Tensor:
    """(S, S) boolean, True where key j is inside the window of query i."""
    pos = torch.arange(S, device=dev)
    d = pos[:, None] - pos[None, :]
    return (d <= window[0]) & (d >= -window[1])


@dataclass
class Case:
    key: str
    label: str
    seqlen: int
    fn: Callable  # fn(q, k, v) -> out
    pairs: int  # unmasked (query, key) pairs


def build_cases(args, fastattn, *, flex: bool = True) -> list:
    S, window, span, ramp, dev = args.S, args.window, args.span, args.span_ramp, args.dev

    def windowed(q, k, v):
        return fastattn.attention(q, k, v, window=window)

    def window_pairs(s):
        return int(attention_flops(1, 1, s, s, 1, window=window) / 4)

    if args.cuda:
        return [Case("gpu_window", f"fastattn window={window}, S={S}", S, windowed, window_pairs(S)),
                Case("gpu_full", f"fastattn no window, S={args.short}", args.short,
                     lambda q, k, v: fastattn.attention(q, k, v), args.short * args.short)]
    cases = [Case(f"win{s}", f"fastattn window={window}, S={s}", s, windowed, window_pairs(s))
             for s in (S // 2, S, 2 * S)]
    span_h, past_h = torch.full((args.H,), span, device=dev), torch.full((args.H,), float(4 * S), device=dev)
    cases += [Case("span", f"fastattn span={span:g} ramp={ramp:g}, S={S}", S,
                   lambda q, k, v: fastattn.attention(q, k, v, span=span_h, span_ramp=ramp),
                   span_pairs(S, S, span, ramp)),
              Case("span_past", f"fastattn span={4 * S} (past S) ramp={ramp:g}, S={S}", S,
                   lambda q, k, v: fastattn.attention(q, k, v, span=past_h, span_ramp=ramp), S * S)]
    if not args.no_sdpa:
        mask = window_mask(S, window, dev)
        cases.append(Case("sdpa_bool", f"SDPA, boolean window mask, S={S}", S,
                          lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), window_pairs(S)))
    if flex and not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            left, right = window
            block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx <= left)
                                           & (kv_idx - q_idx <= right), None, None, S, S, device=dev)
            compiled = torch.compile(flex_attention)
            cases.append(Case("flex", f"compiled FlexAttention, sliding-window BlockMask, S={S}", S,
                              lambda q, k, v: compiled(q, k, v, block_mask=block_mask), window_pairs(S)))
        except Exception as e:  # noqa: BLE001
            print(f"FlexAttention skipped: {type(e).__name__}: {e}", flush=True)
    return cases


class Inputs:
    """q, k, v of one sequence length at a time (the largest ones are big)."""

    def __init__(self, args):
        self.args, self.gen, self.cache = args, torch.Generator().manual_seed(0), {}

    def __call__(self, seqlen: int):
        if seqlen not in self.cache:
            self.cache.clear()
            a = self.args
            self.cache[seqlen] = tuple(torch.randn(a.B, a.H, seqlen, a.D, generator=self.gen).to(a.dev, a.dtype)
                                       for _ in range(3))
        return self.cache[seqlen]


def check_against_sdpa(args, fastattn, inputs: Inputs) -> None:
    """CPU: print the largest difference of the windowed call and SDPA's boolean mask (S=512)."""
    if args.cuda:
        return
    q, k, v = inputs(512)
    with torch.no_grad():
        err = (fastattn.attention(q, k, v, window=args.window).float()
               - F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(512, args.window, args.dev)).float()
               ).abs().max().item()
    print(f"max |fastattn window - SDPA bool mask| at S=512 = {err:.3g}", flush=True)


def measure(args, cases: list, inputs: Inputs, notes: list) -> dict:
    """{key: {label, ms, pairs, tflops, mem}}, printing each timing; a case that fails is noted."""
    results = {}
    for c in cases:
        q, k, v = inputs(c.seqlen)

        def call():
            with torch.no_grad():
                return c.fn(q, k, v)

        try:
            t = time_fn(call, **timing(args))
            flops = 4.0 * args.B * args.H * args.D * c.pairs
            results[c.key] = dict(label=c.label, ms=t.median_ms, pairs=c.pairs,
                                  tflops=flops / (t.median_ms * 1e-3) / 1e12,
                                  mem=peak_memory(call, device=args.dev) if args.cuda else None)
            print(f"  {c.label:60s} {t}", flush=True)
        except Exception as e:  # noqa: BLE001
            msg = (str(e).strip().splitlines() or [""])[0]
            notes.append(f"{c.label} skipped: {type(e).__name__}: {msg[:160]}")
            print(f"  {c.label:60s} skipped ({type(e).__name__}: {msg[:120]})", flush=True)
        finally:
            sync(args.dev)
    inputs.cache.clear()
    if not args.cuda:  # peak memory from a fresh process
        try:
            for key, val in measure_in_child(__file__, child_argv(args)).items():
                if key in results:
                    results[key]["mem"] = val
        except Exception as e:  # noqa: BLE001
            notes.append(f"peak memory not measured: {e}")
    return results


def memory_child(args) -> int:
    fresh_allocator()
    fastattn, inputs, peaks = load_fastattn(), Inputs(args), {}
    for c in build_cases(args, fastattn, flex=False):
        q, k, v = inputs(c.seqlen)
        with torch.no_grad():
            c.fn(q, k, v)
            peaks[c.key] = peak_memory(lambda: c.fn(q, k, v), device=args.dev)
    child_result(peaks)
    return 0


def checks(args, results: dict) -> list:
    def ms(key):
        return results[key]["ms"] if key in results else None

    def quotient(a, b):
        return None if a is None or b is None else a / b

    S, w, span, ramp = args.S, args.window, args.span, args.span_ramp
    if args.cuda:
        return [Check(TARGETS["cuda_window_tflops_vs_full"],
                      quotient(results.get("gpu_window", {}).get("tflops"), results.get("gpu_full", {}).get("tflops")),
                      f"TFLOP/s window {w} at S={S} / no window at S={args.short}")]
    main = f"win{S}"
    doubling = TARGETS["cpu_window_time_per_doubling"]
    return [Check(TARGETS["cpu_window_vs_flex"], quotient(ms("flex"), ms(main)),
                  f"window {w}, S={S}: compiled Flex time / fastattn time"),
            Check(TARGETS["cpu_window_vs_sdpa_bool_mask"], quotient(ms("sdpa_bool"), ms(main)),
                  f"window {w}, S={S}: SDPA bool-mask time / fastattn time"),
            Check(doubling, quotient(ms(main), ms(f"win{S // 2}")), f"window {w}: time S={S} / time S={S // 2}"),
            Check(doubling, quotient(ms(f"win{2 * S}"), ms(main)), f"window {w}: time S={2 * S} / time S={S}"),
            Check(TARGETS["cpu_span_vs_span_past_s"], quotient(ms("span_past"), ms("span")),
                  f"S={S}: span past S time / span {span:g} ramp {ramp:g} time")]


def build_report(args, results: dict, notes: list) -> Report:
    ref = "gpu_full" if args.cuda else f"win{args.S}"
    ref_ms = results[ref]["ms"] if ref in results else None
    rows = [[r["label"], r["ms"], r["pairs"] / 1e6, r["tflops"], None if ref_ms is None else r["ms"] / ref_ms,
             None if r["mem"] is None else r["mem"] / MB] for r in results.values()]
    report = Report("windowed / adaptive-span attention",
                    f"B={args.B} H={args.H} D={args.D} {str(args.dtype).replace('torch.', '')}, forward (no autograd)",
                    args.dev)
    report.table(["case", "ms", "unmasked pairs (M)", "TFLOP/s (unmasked)",
                  f"time / {results[ref]['label'] if ref in results else ref}",
                  "peak MB" if args.cuda else "peak MB (RSS rise, fresh process)"], rows)
    report.checks(checks(args, results), default_shape=args.default_shape)
    for n in notes:
        report.note(n)
    return report


def main(argv=None) -> int:
    args = parse(argv)
    if args.mem_child:
        return memory_child(args)
    fastattn, inputs, notes = load_fastattn(), Inputs(args), []
    cases = build_cases(args, fastattn)
    check_against_sdpa(args, fastattn, inputs)
    results = measure(args, cases, inputs, notes)
    build_report(args, results, notes).emit(args)
    return 0


if __name__ == "__main__":
    run(main)
