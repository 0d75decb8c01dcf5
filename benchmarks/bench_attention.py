"""Benchmark fastattn.attention with a learned relative-position bias table against its peers,
all timed in the same run, and measure its memory at a long sequence.

    python benchmarks/bench_attention.py                 # B=1 H=8 S=2048 D=64 float32, CPU
    python benchmarks/bench_attention.py --quick         # smoke run, small S
    python benchmarks/bench_attention.py --device cuda   # bfloat16 B=2 H=16 S=4096 D=128
    python benchmarks/bench_attention.py --record benchmarks/results/cpu-attention.md

(fastattn is imported as installed, else from this checkout's python/.)

What is timed (q, k, v (B, H, S, D); a learned table (2*max_dist - 1, H) indexed by the clamped
distance i - j, as in a T5-style relative-position bias module):
  fastattn                  fastattn.attention(q, k, v, rel_bias=table)
  fastattn, softcap=30      the same call with softcap=30.0 (tanh logit capping); n/a where
                            fastattn.attention does not take softcap
  SDPA + materialized bias  bias = table[clamped distances] -> (1, H, S, S), then
                            F.scaled_dot_product_attention(attn_mask=bias); building the
                            bias is inside the timed region (and its gradient in fwd+bwd)
  SDPA, no bias             F.scaled_dot_product_attention(q, k, v) (flash backend on CUDA):
                            the speed limit of a fused kernel
  FlexAttention (compiled)  torch.compile(flex_attention) with a score_mod reading the table
                            (skipped where it does not run, e.g. its backward on CPU)
  eager reference           fastattn.reference.attention (materialized scores)
fwd+bwd = the forward, then torch.autograd.grad of q, k, v (and the table where there is one)
for a fixed grad_out.

TFLOP/s: forward 4*B*H*Sq*Sk*D (only unmasked pairs with --causal), backward 2.5x forward.
Peak memory: how far memory rose above its level before one call (benchmarks/common.py).
On CUDA: torch.cuda.max_memory_allocated. On CPU: the rise of the process's peak resident set
(VmHWM), i.e. every page the call touched, including the kernels' own scratch buffers that no
torch profiler sees, measured in a fresh child process with mmap-backed malloc; the timings
are taken in the parent, untouched by those settings.
The memory test runs one forward (no autograd) at --mem-S and reports what it used beyond its
output (q, k, v exist before the call and are not counted), next to the size of the
(1, H, S, S) bias SDPA would need (computed, not allocated).

Targets (benchmarks/targets.py): cpu_fwd_vs_sdpa_bias, cpu_fwd_vs_flex,
cpu_fwd_over_sdpa_no_bias, cpu_fwd_bwd_vs_sdpa_bias, cpu_fwd_bwd_over_sdpa_no_bias,
cpu_fwd_memory_beyond_io_mb (CPU); cuda_fwd_bwd_vs_flex, cuda_fwd_bwd_vs_sdpa_flash (CUDA);
fwd_bwd_softcap_over_no_softcap (both).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Check, Report, attention_flops, child_result, fresh_allocator, load_fastattn,  # noqa: E402
                    make_parser, materialized_bias, measure_in_child, parse_args, peak_memory, run, sync,
                    time_fn, timing)
from targets import TARGETS  # noqa: E402

MB = 1e6
SOFTCAP = 30.0
DEFAULTS = {  # device type -> dtype, B, H, S, D
    "cpu": ("float32", 1, 8, 2048, 64),
    "cuda": ("bfloat16", 2, 16, 4096, 128),
}
# Smaller backward tiles for Flex: on an H100 with torch 2.11 its default backward config with
# a captured, differentiable table needed 233472 bytes of shared memory (limit 232448).
FLEX_SMALL_BWD = {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}
# Row names the checks refer to.
FASTATTN = "fastattn"
SOFTCAPPED = f"fastattn, softcap={SOFTCAP:g}"
SDPA_BIAS = "SDPA + materialized bias"
FLEX = "FlexAttention (compiled)"


def parse(argv=None):
    p = make_parser(__doc__, warmup=2, repeats=7, quick="S=256, memory test at S=1024")
    p.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"],
                   help="default float32 on CPU, bfloat16 on CUDA")
    for dim, cpu, gpu in (("B", 1, 2), ("H", 8, 16), ("S", 2048, 4096), ("D", 64, 128)):
        p.add_argument(f"--{dim}", type=int, help=f"default {cpu} (CPU) / {gpu} (CUDA)")
    p.add_argument("--max-dist", type=int, default=256, help="table rows = 2 * max_dist - 1")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--mem-S", type=int, default=16384, help="sequence length of the memory test (0: skip)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes minutes on CPU)")
    p.add_argument("--no-reference", action="store_true", help="skip the eager reference")
    p.add_argument("--_mem-child", dest="mem_child", choices=["peers", "long"], help=argparse.SUPPRESS)
    args = parse_args(p, argv)
    dtype, B, H, S, D = DEFAULTS["cuda" if args.cuda else "cpu"]
    args.dtype = getattr(torch, args.dtype or dtype)
    args.B, args.H, args.S, args.D = args.B or B, args.H or H, args.S or S, args.D or D
    if args.quick:
        args.S, args.mem_S = min(args.S, 256), (min(args.mem_S, 1024) if args.mem_S else 0)
    args.default_shape = ((args.B, args.H, args.S, args.D, args.dtype, args.causal, args.mem_S)
                          == (1, 8, 2048, 64, torch.float32, False, 16384)) if not args.cuda \
        else ((args.S, args.D, args.dtype) == (4096, 128, torch.bfloat16))
    return args


def child_argv(args, mode: str) -> list:
    """The command line of a memory child that rebuilds the same problem."""
    return (["--device", args.device, "--dtype", str(args.dtype).replace("torch.", ""), "--B", str(args.B),
             "--H", str(args.H), "--S", str(args.S), "--D", str(args.D), "--max-dist", str(args.max_dist),
             "--mem-S", str(args.mem_S), "--_mem-child", mode]
            + (["--causal"] if args.causal else []) + (["--no-reference"] if args.no_reference else []))


def make_flex(table, causal, Sq, Sk, device, kernel_options=None):
    """torch.compile(flex_attention) with a score_mod reading the table, or (None, why)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None, "torch.nn.attention.flex_attention not available"
    max_dist = (table.shape[0] + 1) // 2
    offset = Sk - Sq

    def score_mod(score, b, h, q_idx, kv_idx):
        d = (q_idx + offset - kv_idx).clamp(-max_dist + 1, max_dist - 1) + max_dist - 1
        return score + table[d, h]

    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q, kv: q + offset >= kv, None, None, Sq, Sk, device=device)
    compiled = torch.compile(flex_attention)

    def flex(q, k, v):
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=kernel_options)

    return flex, None


def softcap_unsupported(fastattn, dev, dtype) -> Optional[str]:
    """None if fastattn.attention runs with softcap=..., else why not (a TypeError: the keyword
    is not there yet)."""
    x = torch.randn(1, 1, 8, 8, device=dev, dtype=dtype)
    try:
        with torch.no_grad():
            fastattn.attention(x, x, x, softcap=SOFTCAP)
        return None
    except TypeError as e:
        return f"fastattn.attention does not take softcap ({(str(e).strip().splitlines() or [''])[0]})"
    except Exception as e:  # noqa: BLE001  (e.g. no kernel for this device yet)
        return f"softcap={SOFTCAP:g} failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"


@dataclass
class Problem:
    """The inputs: no-grad copies for the forward, leaves for forward+backward."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    table: torch.Tensor
    grad_out: torch.Tensor
    leaves: tuple = ()

    @classmethod
    def build(cls, args) -> "Problem":
        gen = torch.Generator().manual_seed(0)
        q, k, v, grad_out = (torch.randn(args.B, args.H, args.S, args.D, generator=gen).to(args.dev, args.dtype)
                             for _ in range(4))
        table = (0.1 * torch.randn(2 * args.max_dist - 1, args.H, generator=gen)).to(args.dev, torch.float32)
        p = cls(q, k, v, table, grad_out)
        p.leaves = tuple(t.clone().requires_grad_(True) for t in (q, k, v, table))
        return p


@dataclass
class Contender:
    """fn(q, k, v, table) -> out, timed forward and forward+backward."""
    name: str
    fn: Optional[Callable]
    uses_table: bool = True
    skip: Optional[str] = None  # why it is not timed (its row says n/a)
    fallback: Optional[tuple] = None  # Flex: (smaller-tile fn, state) to retry forward+backward with
    notes: list = field(default_factory=list)

    def phases(self, p: Problem) -> dict:
        def fwd():
            with torch.no_grad():
                return self.fn(p.q, p.k, p.v, p.table)

        qg, kg, vg, tg = p.leaves
        inputs = [qg, kg, vg] + ([tg] if self.uses_table else [])

        def fwd_bwd():
            return torch.autograd.grad(self.fn(qg, kg, vg, tg), inputs, p.grad_out)

        return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def build_cases(args, fastattn, p: Problem, *, flex: bool = True) -> list:
    S, causal, dev = args.S, args.causal, args.dev
    from fastattn import reference

    def fa(q, k, v, t, **kw):
        return fastattn.attention(q, k, v, rel_bias=t, causal=causal, **kw)

    def sdpa_bias(q, k, v, t):
        bias = materialized_bias(t, S, S).to(q.dtype)
        if causal:
            bias = bias.masked_fill(torch.ones(S, S, dtype=torch.bool, device=dev).triu(1), float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def sdpa_plain(q, k, v, t):
        if args.cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    why = softcap_unsupported(fastattn, dev, args.dtype)
    cases = [Contender(FASTATTN, fa),
             Contender(SOFTCAPPED, lambda q, k, v, t: fa(q, k, v, t, softcap=SOFTCAP), skip=why),
             Contender(SDPA_BIAS, sdpa_bias),
             Contender(plain_name(args), sdpa_plain, uses_table=False)]
    if flex and not args.no_flex:
        cases += flex_cases(args, p)
    if not args.no_reference:
        cases.append(Contender("eager reference",
                               lambda q, k, v, t: reference.attention(q, k, v, rel_bias=t, causal=causal)))
    return cases


def plain_name(args) -> str:
    return "SDPA, no bias" + (" (flash)" if args.cuda else "")


def flex_cases(args, p: Problem) -> list:
    """Compiled Flex; on CUDA its forward+backward falls back to smaller tiles (FLEX_SMALL_BWD)
    where the default config does not compile."""
    flex, why = make_flex(p.table, args.causal, args.S, args.S, args.dev)
    if flex is None:
        return [Contender(FLEX, None, skip=why)]
    tg = p.leaves[3]
    flex_g, _ = make_flex(tg, args.causal, args.S, args.S, args.dev)
    small, _ = make_flex(tg, args.causal, args.S, args.S, args.dev, kernel_options=FLEX_SMALL_BWD) \
        if args.cuda else (None, None)
    state = {"fwd_bwd": flex_g}
    return [Contender(FLEX, lambda q, k, v, t: (state["fwd_bwd"] if t is tg else flex)(q, k, v),
                      fallback=(small, state) if small is not None else None)]


def measure(args, cases: list, p: Problem) -> dict:
    """{name: {phase: {ms, tflops, mem}}}, printing each timing; a case that fails is noted."""
    fwd_flops = attention_flops(args.B, args.H, args.S, args.S, args.D, args.causal)
    flops = {"fwd": fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
    results = {}
    for case in cases:
        results[case.name] = {}
        if case.skip:
            case.notes.append(f"{case.name}: n/a: {case.skip}")
            print(f"  {case.name:28s} n/a ({case.skip})", flush=True)
            continue
        for phase, f in case.phases(p).items():
            t = time_phase(args, case, phase, f)
            if t is not None:
                results[case.name][phase] = dict(ms=t.median_ms, tflops=flops[phase] / (t.median_ms * 1e-3) / 1e12,
                                                 mem=peak_memory(f, device=args.dev) if args.cuda else None)
    return results


def time_phase(args, case: Contender, phase: str, f):
    try:
        t = time_fn(f, **timing(args))
        print(f"  {case.name:28s} {phase:8s} {t}", flush=True)
        return t
    except Exception as e:  # a peer that does not run here (e.g. Flex backward on CPU)
        msg = (str(e).strip().splitlines() or [""])[0]
        if phase == "fwd+bwd" and case.fallback is not None:
            small, state = case.fallback
            state["fwd_bwd"] = small
            try:
                t = time_fn(f, **timing(args))
                case.notes.append(f"{case.name} {phase}: the default config failed ({type(e).__name__}: "
                                  f"{msg[:100]}); ran with kernel_options={FLEX_SMALL_BWD}")
                print(f"  {case.name:28s} {phase:8s} {t} (kernel_options={FLEX_SMALL_BWD})", flush=True)
                return t
            except Exception as e2:  # noqa: BLE001
                msg += f"; with smaller tiles: {type(e2).__name__}: {str(e2).strip()[:80]}"
        case.notes.append(f"{case.name} {phase} skipped: {type(e).__name__}: {msg[:160]}")
        print(f"  {case.name:28s} {phase:8s} skipped ({type(e).__name__}: {msg[:120]})", flush=True)
        return None
    finally:
        sync(args.dev)


def memory_child(args) -> int:
    """--_mem-child: peak memory of every case (peers) or of one long forward (long), printed
    for the parent (CPU: a fresh process, see the module docstring)."""
    fresh_allocator()
    fastattn = load_fastattn()
    dev, H, D, dtype = args.dev, args.H, args.D, args.dtype
    small = torch.randn(1, H, 128, D, dtype=dtype, device=dev)
    with torch.no_grad():  # threads up
        fastattn.attention(small, small, small, rel_bias=torch.zeros(2 * args.max_dist - 1, H, device=dev))
    if args.mem_child == "long":  # one forward at mem_S, q/k/v allocated directly
        with torch.no_grad():
            table = 0.1 * torch.randn(2 * args.max_dist - 1, H, device=dev)
            qm, km, vm = (torch.randn(1, H, args.mem_S, D, dtype=dtype, device=dev) for _ in range(3))
            used = peak_memory(lambda: fastattn.attention(qm, km, vm, rel_bias=table, causal=args.causal),
                               device=dev)
        child_result({"used": used, "out": qm.numel() * qm.element_size()})
        return 0
    p = Problem.build(args)
    peaks = {}
    for case in build_cases(args, fastattn, p, flex=False):
        for phase, f in ({} if case.skip else case.phases(p)).items():
            try:
                f()  # steady state: the first backward also starts autograd's machinery
                peaks[f"{case.name}|{phase}"] = peak_memory(f, device=dev)
            except Exception:  # noqa: BLE001
                peaks[f"{case.name}|{phase}"] = None
    child_result(peaks)
    return 0


def measure_memory(args, fastattn, results: dict, notes: list) -> tuple:
    """CPU peaks of every case from a fresh process (into results), and the long forward's
    memory: (rows, MB beyond q, k, v and out or None)."""
    if not args.cuda:
        try:
            for key, val in measure_in_child(__file__, child_argv(args, "peers")).items():
                name, phase = key.split("|")
                if phase in results.get(name, {}):
                    results[name][phase]["mem"] = val
        except Exception as e:  # noqa: BLE001
            notes.append(f"peak memory of the peers not measured: {e}")
    if not args.mem_S:
        return [], None
    H, S, D, rows, extra = args.H, args.mem_S, args.D, [], None
    try:
        if args.cuda:
            with torch.no_grad():
                table = 0.1 * torch.randn(2 * args.max_dist - 1, H, device=args.dev)
                qm, km, vm = (torch.randn(1, H, S, D, dtype=args.dtype, device=args.dev) for _ in range(3))
                used = peak_memory(lambda: fastattn.attention(qm, km, vm, rel_bias=table, causal=args.causal),
                                   device=args.dev)
                out_bytes = qm.numel() * qm.element_size()
                del qm, km, vm
        else:
            got = measure_in_child(__file__, child_argv(args, "long"))
            used, out_bytes = got["used"], got["out"]
        if used is not None:
            extra = (used - out_bytes) / MB
            rows.append([f"fastattn forward, B=1 H={H} S={S} D={D}", used / MB, out_bytes / MB, extra])
    except Exception as e:  # noqa: BLE001
        notes.append(f"long-sequence memory test failed: {e}")
    bias_bytes = H * S * S * torch.finfo(args.dtype).bits // 8
    rows.append([f"SDPA + bias: the (1, {H}, {S}, {S}) bias alone (computed)", "", "", bias_bytes / MB])
    return rows, extra


def checks(args, results: dict, mem_extra_mb) -> list:
    def ratio(peer, phase, ours=FASTATTN):
        a, b = results.get(peer, {}).get(phase), results.get(ours, {}).get(phase)
        return None if a is None or b is None else a["ms"] / b["ms"]

    def inverse(x):
        return None if x is None else 1.0 / x

    plain = plain_name(args)
    softcap = Check(TARGETS["fwd_bwd_softcap_over_no_softcap"], ratio(SOFTCAPPED, "fwd+bwd"),
                    f"fwd+bwd softcap / no softcap (fastattn with the table, softcap={SOFTCAP:g})")
    if args.cuda:
        return [Check(TARGETS["cuda_fwd_bwd_vs_flex"], ratio(FLEX, "fwd+bwd")),
                Check(TARGETS["cuda_fwd_bwd_vs_sdpa_flash"], ratio(plain, "fwd+bwd")), softcap]
    out = [Check(TARGETS["cpu_fwd_vs_sdpa_bias"], ratio(SDPA_BIAS, "fwd")),
           Check(TARGETS["cpu_fwd_vs_flex"], ratio(FLEX, "fwd")),
           Check(TARGETS["cpu_fwd_over_sdpa_no_bias"], inverse(ratio(plain, "fwd"))),
           Check(TARGETS["cpu_fwd_bwd_vs_sdpa_bias"], ratio(SDPA_BIAS, "fwd+bwd")),
           Check(TARGETS["cpu_fwd_bwd_over_sdpa_no_bias"], inverse(ratio(plain, "fwd+bwd"))), softcap]
    if args.mem_S:
        out.append(Check(TARGETS["cpu_fwd_memory_beyond_io_mb"], mem_extra_mb,
                         f"forward at S={args.mem_S} H={args.H} D={args.D}: MB used beyond q, k, v and the output"))
    return out


def build_report(args, cases: list, results: dict, mem_rows: list, mem_extra, notes: list) -> Report:
    fa = results.get(FASTATTN, {})
    rows = []
    for case in cases:
        row = [case.name]
        for phase in ("fwd", "fwd+bwd"):
            r = results[case.name].get(phase)
            row += ["n/a", "", "", ""] if r is None else \
                [r["ms"], r["tflops"], r["ms"] / fa[phase]["ms"] if phase in fa else None,
                 None if r["mem"] is None else r["mem"] / MB]
        rows.append(row)
    dtype = str(args.dtype).replace("torch.", "")
    report = Report("attention with a learned bias table",
                    f"B={args.B} H={args.H} S={args.S} D={args.D} {dtype}, "
                    f"{'causal' if args.causal else 'non-causal'}, table ({2 * args.max_dist - 1}, {args.H})",
                    args.dev)
    mem = "peak MB" if args.cuda else "peak MB (RSS rise, fresh process)"
    report.table(["variant", "fwd ms", "fwd TFLOP/s", "fwd time / fastattn", f"fwd {mem}", "fwd+bwd ms",
                  "fwd+bwd TFLOP/s", "fwd+bwd time / fastattn", f"fwd+bwd {mem}"], rows)
    report.table(["memory (forward, no autograd)", "peak rise MB", "output MB", "beyond q, k, v, out MB"], mem_rows)
    report.checks(checks(args, results, mem_extra), default_shape=args.default_shape)
    for n in notes + [n for c in cases for n in c.notes]:
        report.note(n)
    return report


def main(argv=None) -> int:
    args = parse(argv)
    if args.mem_child:
        return memory_child(args)
    fastattn, problem, notes = load_fastattn(), Problem.build(args), []
    cases = build_cases(args, fastattn, problem)
    check_against_sdpa(cases, problem)
    results = measure(args, cases, problem)
    mem_rows, mem_extra = measure_memory(args, fastattn, results, notes)
    build_report(args, cases, results, mem_rows, mem_extra, notes).emit(args)
    return 0


def check_against_sdpa(cases: list, p: Problem) -> None:
    """Print the largest difference of fastattn and SDPA with the materialized bias."""
    fn = {c.name: c.fn for c in cases}
    with torch.no_grad():
        err = (fn[FASTATTN](p.q, p.k, p.v, p.table).float()
               - fn[SDPA_BIAS](p.q, p.k, p.v, p.table).float()).abs().max().item()
    print(f"max |fastattn - SDPA with materialized bias| = {err:.3g}", flush=True)


if __name__ == "__main__":
    run(main)
