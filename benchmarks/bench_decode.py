"""Benchmark one KV-cache decode step (a single new query per sequence against a cache of Sk
keys) of fastattn.attention against F.scaled_dot_product_attention, all timed in one run.

    PYTHONPATH=python python benchmarks/bench_decode.py            # CPU, float32
    PYTHONPATH=python python benchmarks/bench_decode.py --quick    # smoke run, short caches
    PYTHONPATH=python python benchmarks/bench_decode.py --device cuda   # bfloat16
    PYTHONPATH=python python benchmarks/bench_decode.py --record benchmarks/results/cpu-attention.md

Cases (q (B, Hq, 1, D), k and v (B, Hkv, Sk, D), forward only, no autograd):
  MHA  B=8 Hq=Hkv=8   Sk=4096 D=64
  GQA  B=8 Hq=32 Hkv=4 Sk=4096 D=128
  MQA  B=1 Hq=32 Hkv=1 Sk=8192 D=128
each with no bias and with a learned (2*512 - 1, Hq) relative-position table. What is timed:
  fastattn                    fastattn.attention(q, k, v[, rel_bias=table])
  SDPA                        F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)
  SDPA + materialized bias    the bias row table[clamped distances] -> (1, Hq, 1, Sk) built
                              inside the timed region, then SDPA with attn_mask=bias
  (CUDA) ..., split-KV off    fastattn with FASTATTN_CUDA_KV_SPLITS=1: one block walks all
                              keys of its query block (what the split-KV forward gains)
and a whole decode step of fastattn.nn.MultiheadAttention(512, 8, rotary="rope") and of a
16-head fastattn.nn.MultiheadLatentAttention (latent 512, absorbed) with 4096 cached tokens
(projections, rotary, the cache append, attention), under torch.no_grad.
A decode step reads the whole cache once and does little arithmetic per byte, so the table
also gives the cache read rate (bytes of k and v / time) of each. Information only: no issue
sets a decode target.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import gbps, markdown_table, time_many, with_env  # noqa: E402
from bench_attention import fastattn, report  # noqa: E402

CASES = [  # name, B, Hq, Hkv, Sk, D
    ("MHA", 8, 8, 8, 4096, 64),
    ("GQA", 8, 32, 4, 4096, 128),
    ("MQA", 1, 32, 1, 8192, 128),
]
MAX_DIST = 512


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="smoke run: caches of 256 keys, 3 repeats")
    p.add_argument("--record", metavar="FILE.md", help="append the table (date, commit, command) to FILE.md")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if args.quick:
        args.warmup, args.repeats = 1, 3
    gen = torch.Generator().manual_seed(0)

    rows, ratios = [], []
    for name, B, Hq, Hkv, Sk, D in CASES:
        if args.quick:
            Sk = 256
        q = torch.randn(B, Hq, 1, D, generator=gen).to(dev, dtype)
        k = torch.randn(B, Hkv, Sk, D, generator=gen).to(dev, dtype)
        v = torch.randn(B, Hkv, Sk, D, generator=gen).to(dev, dtype)
        table = (0.1 * torch.randn(2 * MAX_DIST - 1, Hq, generator=gen)).to(dev, dtype)
        # The query stands at position Sk - 1 (bottom-right aligned), key j at j.
        distance = (Sk - 1) - torch.arange(Sk, device=dev)
        index = distance.clamp(1 - MAX_DIST, MAX_DIST - 1) + MAX_DIST - 1
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
        if cuda:
            fns["fastattn, split-KV off"] = lambda: with_env(
                "FASTATTN_CUDA_KV_SPLITS", "1", lambda: fastattn.attention(q, k, v))
            fns["fastattn + table, split-KV off"] = lambda: with_env(
                "FASTATTN_CUDA_KV_SPLITS", "1", lambda: fastattn.attention(q, k, v, rel_bias=table))
        with torch.no_grad():
            err = (fns["fastattn + table"]().float() - sdpa_bias().float()).abs().max().item()
            times = time_many(fns, device=dev, warmup=args.warmup, repeats=args.repeats)
        cache_bytes = 2 * k.numel() * k.element_size()
        label = f"{name} B={B} Hq={Hq} Hkv={Hkv} Sk={Sk} D={D}"
        print(f"{label}: max |fastattn + table - SDPA + bias| = {err:.3g}", flush=True)
        for variant, t in times.items():
            print(f"  {variant:28s} {t}", flush=True)
            rows.append([label, variant, t.median_ms, gbps(cache_bytes, t.median_ms)])
        ratios.append([label, times["SDPA"].median_ms / times["fastattn"].median_ms,
                       times["SDPA + materialized bias"].median_ms / times["fastattn + table"].median_ms])

    # A whole decode step of a module with a KV cache: projections, rotary, the cache append
    # and attention (what a generation loop runs per layer and token).
    prefill = 256 if args.quick else 4096
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

            t = time_many({"step": module_step}, device=dev, warmup=args.warmup, repeats=args.repeats)["step"]
        label = f"{name} B=1, {prefill} cached tokens"
        print(f"{label}: {t}", flush=True)
        rows.append([label, "one decode step (no_grad)", t.median_ms, None])

    dev_name = torch.cuda.get_device_name(dev) if cuda else f"CPU, {torch.get_num_threads()} threads"
    header = (f"one decode step (Sq=1), {str(dtype).replace('torch.', '')}, table ({2 * MAX_DIST - 1}, Hq); "
              f"{dev_name}; torch {torch.__version__}")
    sections = [
        markdown_table(["case", "what", "median ms", "k+v read GB/s"], rows),
        markdown_table(["case", "SDPA time / fastattn time", "SDPA + bias time / fastattn + table time"], ratios),
    ]
    report(title="decode step", header=header, sections=sections, verdicts=[], notes=[],
           standard=True, record=args.record, argv=list(argv) if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
