"""Benchmark one KV-cache decode step (a single new query per sequence against a cache of Sk
keys) of fastattn.attention against F.scaled_dot_product_attention, all timed in one run.

    python benchmarks/bench_decode.py                 # CPU, float32
    python benchmarks/bench_decode.py --quick         # smoke run, short caches
    python benchmarks/bench_decode.py --device cuda   # bfloat16
    python benchmarks/bench_decode.py --record benchmarks/results/cpu-attention.md

Cases (q (B, Hq, 1, D), k and v (B, Hkv, Sk, D), forward only, no autograd):
  MHA  B=8 Hq=Hkv=8   Sk=4096 D=64
  GQA  B=8 Hq=32 Hkv=4 Sk=4096 D=128
  MQA  B=1 Hq=32 Hkv=1 Sk=8192 D=128
each with no bias and with a learned (2*512 - 1, Hq) relative-position table. What is timed
(round-robin, benchmarks/common.py time_many):
  fastattn                    fastattn.attention(q, k, v[, rel_bias=table])
  SDPA                        F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)
  SDPA + materialized bias    the bias row table[clamped distances] -> (1, Hq, 1, Sk) built
                              inside the timed region, then SDPA with attn_mask=bias
  (CUDA) ..., split-KV off    fastattn with kv_splits=1 (fastattn.tuning): one block walks all
                              keys of its query block (what the split-KV forward gains)
and a whole decode step of fastattn.nn.MultiheadAttention(512, 8, rotary="rope") and of a
16-head fastattn.nn.MultiheadLatentAttention (latent 512, absorbed) with 4096 cached tokens
(projections, rotary, the cache append, attention), under torch.no_grad.
A decode step reads the whole cache once and does little arithmetic per byte, so the table
also gives the cache read rate (bytes of k and v / time) of each. No targets: the ratios are
printed for information.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Report, gbps, load_fastattn, make_parser, parse_args, run, time_many, timing, with_tuning  # noqa: E402

CASES = [  # name, B, Hq, Hkv, Sk, D
    ("MHA", 8, 8, 8, 4096, 64),
    ("GQA", 8, 32, 4, 4096, 128),
    ("MQA", 1, 32, 1, 8192, 128),
]
MAX_DIST = 512


def parse(argv=None):
    p = make_parser(__doc__, warmup=3, repeats=20, quick="caches of 256 keys")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    args = parse_args(p, argv)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.cuda else "float32"))
    return args


def attention_step(args, fastattn, gen, name, B, Hq, Hkv, Sk, D) -> tuple:
    """Time one case; returns (table rows, ratio row)."""
    dev, dtype = args.dev, args.dtype
    q = torch.randn(B, Hq, 1, D, generator=gen).to(dev, dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=gen).to(dev, dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=gen).to(dev, dtype)
    table = (0.1 * torch.randn(2 * MAX_DIST - 1, Hq, generator=gen)).to(dev, dtype)
    # The query stands at position Sk - 1 (bottom-right aligned), key j at j.
    index = ((Sk - 1) - torch.arange(Sk, device=dev)).clamp(1 - MAX_DIST, MAX_DIST - 1) + MAX_DIST - 1
    gqa = dict(enable_gqa=True) if Hq != Hkv else {}

    def sdpa_bias():
        bias = table[index].t().reshape(1, Hq, 1, Sk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, **gqa)

    fns = {
        "fastattn": lambda: fastattn.attention(q, k, v),
        "SDPA": lambda: F.scaled_dot_product_attention(q, k, v, **gqa),
        "fastattn + table": lambda: fastattn.attention(q, k, v, rel_bias=table),
        "SDPA + materialized bias": sdpa_bias,
    }
    if args.cuda:
        fns["fastattn, split-KV off"] = lambda: with_tuning(
            lambda: fastattn.attention(q, k, v), kv_splits=1)
        fns["fastattn + table, split-KV off"] = lambda: with_tuning(
            lambda: fastattn.attention(q, k, v, rel_bias=table), kv_splits=1)
    with torch.no_grad():
        err = (fns["fastattn + table"]().float() - sdpa_bias().float()).abs().max().item()
        times = time_many(fns, **timing(args))
    cache_bytes = 2 * k.numel() * k.element_size()
    label = f"{name} B={B} Hq={Hq} Hkv={Hkv} Sk={Sk} D={D}"
    print(f"{label}: max |fastattn + table - SDPA + bias| = {err:.3g}", flush=True)
    for variant, t in times.items():
        print(f"  {variant:28s} {t}", flush=True)
    rows = [[label, variant, t.median_ms, gbps(cache_bytes, t.median_ms)] for variant, t in times.items()]
    return rows, [label, times["SDPA"].median_ms / times["fastattn"].median_ms,
                  times["SDPA + materialized bias"].median_ms / times["fastattn + table"].median_ms]


def module_steps(args, fastattn, gen) -> list:
    """A whole decode step of a module with a KV cache: projections, rotary, the cache append
    and attention (what a generation loop runs per layer and token). Returns table rows."""
    dev, dtype, prefill, rows = args.dev, args.dtype, 256 if args.quick else 4096, []
    modules = {
        "fastattn.nn.MultiheadAttention(512, 8, rotary)":
            (512, fastattn.nn.MultiheadAttention(512, 8, causal=True, rotary="rope")),
        "fastattn.nn.MultiheadLatentAttention(1024, 16, latent 512, absorbed)":
            (1024, fastattn.nn.MultiheadLatentAttention(1024, 16, 512, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                                        v_head_dim=64, causal=True)),
    }
    for name, (width, module) in modules.items():
        module = module.to(dev, dtype)
        with torch.no_grad():
            _, cache = module(torch.randn(1, prefill, width, generator=gen).to(dev, dtype), cache={})
            token = torch.randn(1, 1, width, generator=gen).to(dev, dtype)
            state = {"cache": cache}

            def module_step():
                _, state["cache"] = module(token, cache=state["cache"])

            t = time_many({"step": module_step}, **timing(args))["step"]
        label = f"{name} B=1, {prefill} cached tokens"
        print(f"{label}: {t}", flush=True)
        rows.append([label, "one decode step (no_grad)", t.median_ms, None])
    return rows


def attention_steps(args, fastattn, gen) -> tuple:
    """Every case of CASES: (table rows, ratio rows)."""
    rows, ratios = [], []
    for name, B, Hq, Hkv, Sk, D in CASES:
        case_rows, ratio = attention_step(args, fastattn, gen, name, B, Hq, Hkv, 256 if args.quick else Sk, D)
        rows, ratios = rows + case_rows, ratios + [ratio]
    return rows, ratios


def build_report(args, rows: list, ratios: list) -> Report:
    report = Report("decode step", f"one decode step (Sq=1), {str(args.dtype).replace('torch.', '')}, "
                                   f"table ({2 * MAX_DIST - 1}, Hq)", args.dev)
    report.table(["case", "what", "median ms", "k+v read GB/s"], rows)
    report.table(["case", "SDPA time / fastattn time", "SDPA + bias time / fastattn + table time"], ratios)
    return report


def main(argv=None) -> int:
    args = parse(argv)
    fastattn, gen = load_fastattn(), torch.Generator().manual_seed(0)
    rows, ratios = attention_steps(args, fastattn, gen)
    rows += module_steps(args, fastattn, gen)
    build_report(args, rows, ratios).emit(args)
    return 0


if __name__ == "__main__":
    run(main)
