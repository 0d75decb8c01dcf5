"""Benchmark fastattn.attention's sliding windows and adaptive spans (forward), all timed in one
run: cost must follow the number of unmasked pairs, not S^2.

    PYTHONPATH=python python benchmarks/bench_window.py                  # CPU: H=8 D=64 fp32
    PYTHONPATH=python python benchmarks/bench_window.py --quick          # smoke run, small S
    PYTHONPATH=python python benchmarks/bench_window.py --device cuda     # bf16 D=128 S=16384 vs 2048
    PYTHONPATH=python python benchmarks/bench_window.py --record benchmarks/results/cpu-attention.md

CPU (B=1, H=8, D=64, float32, forward, no autograd):
  window    fastattn window=(256, 256) at S=8192, against
            - torch.compile(flex_attention) with a sliding-window BlockMask (the block mask is
              built once, outside the timed region, as a user would reuse it), and
            - F.scaled_dot_product_attention with a boolean (S, S) window mask (built outside the
              timed region too);
  scaling   fastattn window=(256, 256) at S = 4096, 8192, 16384;
  span      fastattn span=64, span_ramp=32 (per head) at S=8192, against the same call with a
            span past S (every pair visible: the kernel cannot skip anything).
CUDA (bf16, D=128, B=2, H=16): window=(1024, 0) at S=16384 against no window at S=2048.

TFLOP/s = 4*B*H*D*(unmasked (query, key) pairs) / time. Peak memory as in bench_attention.py
(CPU: RSS rise of one call in a fresh child process with mmap-backed malloc; CUDA:
max_memory_allocated).

Targets (issue 4), printed with PASS/FAIL:
  CPU: S=8192 window (256, 256) >= 1.5x faster than compiled Flex with a sliding-window block
  mask and >= 10x faster than SDPA with a boolean mask; at a fixed window, time per doubling of
  S (4096 -> 8192 -> 16384) <= 2.3x; span 64 / ramp 32 at S=8192 >= 10x faster than a span past S.
  CUDA: TFLOP/s of window (1024, 0) at S=16384 >= 0.9x that of no window at S=2048.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import markdown_table, peak_memory, sync, time_fn  # noqa: E402
from bench_attention import attention_flops, fastattn, fresh_allocator, measure_in_child, report  # noqa: E402

MB = 1e6


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "float64", "float16", "bfloat16"],
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--B", type=int, default=None, help="default 1 (CPU) / 2 (CUDA)")
    p.add_argument("--H", type=int, default=None, help="default 8 (CPU) / 16 (CUDA)")
    p.add_argument("--D", type=int, default=None, help="default 64 (CPU) / 128 (CUDA)")
    p.add_argument("--S", type=int, default=None, help="main sequence length: 8192 (CPU) / 16384 (CUDA)")
    p.add_argument("--window", type=int, nargs=2, default=None, help="default 256 256 (CPU) / 1024 0 (CUDA)")
    p.add_argument("--span", type=float, default=64.0)
    p.add_argument("--span-ramp", type=float, default=32.0)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes minutes on CPU)")
    p.add_argument("--no-sdpa", action="store_true", help="skip SDPA with a dense boolean mask")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: S=1024 (scaling 512..2048), window 32, 3 repeats")
    p.add_argument("--record", metavar="FILE.md", help="append the tables (date, commit, command) to FILE.md")
    p.add_argument("--_mem-child", dest="mem_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mem_child:
        fresh_allocator()

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    B = args.B or (2 if cuda else 1)
    H = args.H or (16 if cuda else 8)
    D = args.D or (128 if cuda else 64)
    S = args.S or (16384 if cuda else 8192)
    window = tuple(args.window) if args.window else ((1024, 0) if cuda else (256, 256))
    span, ramp = args.span, args.span_ramp
    if args.quick:
        S = min(S, 1024)
        window = tuple(min(w, 32) for w in window)
        span, ramp = min(span, 16.0), min(ramp, 8.0)
        args.warmup, args.repeats = 1, 3
    timing = dict(device=dev, warmup=args.warmup, repeats=args.repeats)
    gen = torch.Generator().manual_seed(0)

    def qkv(seqlen):
        return tuple(torch.randn(B, H, seqlen, D, generator=gen).to(dev, dtype) for _ in range(3))

    # ---- the cases: (key, label, seqlen, fn(q, k, v), unmasked pairs) ------------------------
    cases = []
    if cuda:
        short = 2048 if not args.quick else 256
        cases.append(("gpu_window", f"fastattn window={window}, S={S}", S,
                      lambda q, k, v: fastattn.attention(q, k, v, window=window),
                      attention_flops(1, 1, S, S, 1, window=window) / 4))
        cases.append(("gpu_full", f"fastattn no window, S={short}", short,
                      lambda q, k, v: fastattn.attention(q, k, v), short * short))
    else:
        scaling = (S // 2, S, 2 * S)
        for s in scaling:
            cases.append((f"win{s}", f"fastattn window={window}, S={s}", s,
                          lambda q, k, v: fastattn.attention(q, k, v, window=window),
                          attention_flops(1, 1, s, s, 1, window=window) / 4))
        span_h = torch.full((H,), span, device=dev)
        past_h = torch.full((H,), float(4 * S), device=dev)
        cases.append(("span", f"fastattn span={span:g} ramp={ramp:g}, S={S}", S,
                      lambda q, k, v: fastattn.attention(q, k, v, span=span_h, span_ramp=ramp),
                      span_pairs(S, S, span, ramp)))
        cases.append(("span_past", f"fastattn span={4 * S} (past S) ramp={ramp:g}, S={S}", S,
                      lambda q, k, v: fastattn.attention(q, k, v, span=past_h, span_ramp=ramp), S * S))
        if not args.no_sdpa:
            pos = torch.arange(S, device=dev)
            d = pos[:, None] - pos[None, :]
            bool_mask = (d <= window[0]) & (d >= -window[1])  # True = attend
            cases.append(("sdpa_bool", f"SDPA, boolean window mask, S={S}", S,
                          lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
                          attention_flops(1, 1, S, S, 1, window=window) / 4))
        if not args.no_flex and not args.mem_child:
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
                left, right = window

                def sliding(b, h, q_idx, kv_idx):
                    return (q_idx - kv_idx <= left) & (kv_idx - q_idx <= right)

                block_mask = create_block_mask(sliding, None, None, S, S, device=dev)
                flex = torch.compile(flex_attention)
                cases.append(("flex", f"compiled FlexAttention, sliding-window BlockMask, S={S}", S,
                              lambda q, k, v: flex(q, k, v, block_mask=block_mask),
                              attention_flops(1, 1, S, S, 1, window=window) / 4))
            except Exception as e:  # noqa: BLE001
                print(f"FlexAttention skipped: {type(e).__name__}: {e}", flush=True)

    inputs = {}

    def get_inputs(seqlen):
        if seqlen not in inputs:
            inputs.clear()  # keep one size alive at a time
            inputs[seqlen] = qkv(seqlen)
        return inputs[seqlen]

    if args.mem_child:
        peaks = {}
        for key, _, seqlen, fn, _ in cases:
            q, k, v = get_inputs(seqlen)
            with torch.no_grad():
                fn(q, k, v)
                peaks[key] = peak_memory(lambda: fn(q, k, v), device=dev)
        print("MEMJSON " + json.dumps(peaks))
        return 0

    # Correctness first: the windowed call against SDPA's boolean mask (at a small size).
    if not cuda:
        qs, ks, vs = (t[:, :, :512] for t in qkv(512))
        pos = torch.arange(512, device=dev)
        d = pos[:, None] - pos[None, :]
        m = (d <= window[0]) & (d >= -window[1])
        with torch.no_grad():
            err = (fastattn.attention(qs, ks, vs, window=window).float()
                   - F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m).float()).abs().max().item()
        print(f"max |fastattn window - SDPA bool mask| at S=512 = {err:.3g}", flush=True)

    results, notes = {}, []
    for key, label, seqlen, fn, pairs in cases:
        q, k, v = get_inputs(seqlen)
        try:
            def call():
                with torch.no_grad():
                    return fn(q, k, v)
            t = time_fn(call, **timing)
            mem = peak_memory(call, device=dev) if cuda else None
            flops = 4.0 * B * H * D * pairs
            results[key] = dict(label=label, ms=t.median_ms, pairs=pairs, tflops=flops / (t.median_ms * 1e-3) / 1e12,
                                mem=mem)
            print(f"  {label:60s} {t}", flush=True)
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            notes.append(f"{label} skipped: {type(e).__name__}: {msg[:160]}")
            print(f"  {label:60s} skipped ({type(e).__name__}: {msg[:120]})", flush=True)
        finally:
            sync(dev)
    inputs.clear()

    if not cuda:
        try:
            child = ["--device", args.device, "--dtype", str(dtype).replace("torch.", ""), "--B", str(B),
                     "--H", str(H), "--D", str(D), "--S", str(S), "--window", str(window[0]), str(window[1]),
                     "--span", str(span), "--span-ramp", str(ramp), "--_mem-child"]
            if args.no_sdpa:
                child.append("--no-sdpa")
            for key, val in measure_in_child(child, script=__file__).items():
                if key in results:
                    results[key]["mem"] = val
        except Exception as e:  # noqa: BLE001
            notes.append(f"peak memory not measured: {e}")

    # ---- targets ----------------------------------------------------------------------------
    def ms(key):
        return results[key]["ms"] if key in results else None

    def quotient(a, b):
        return None if a is None or b is None else a / b

    checks = []
    if cuda:
        checks.append((f"TFLOP/s window {window} at S={S} / no window at S={2048 if not args.quick else 256}",
                       quotient(results.get("gpu_window", {}).get("tflops"), results.get("gpu_full", {}).get("tflops")),
                       ">=", 0.9))
        ref_key = "gpu_full"
    else:
        main_key = f"win{S}"
        checks += [
            (f"window {window}, S={S}: compiled Flex time / fastattn time", quotient(ms("flex"), ms(main_key)), ">=", 1.5),
            (f"window {window}, S={S}: SDPA bool-mask time / fastattn time", quotient(ms("sdpa_bool"), ms(main_key)), ">=", 10.0),
            (f"window {window}: time S={S} / time S={S // 2}", quotient(ms(main_key), ms(f"win{S // 2}")), "<=", 2.3),
            (f"window {window}: time S={2 * S} / time S={S}", quotient(ms(f"win{2 * S}"), ms(main_key)), "<=", 2.3),
            (f"S={S}: span past S time / span {span:g} ramp {ramp:g} time", quotient(ms("span_past"), ms("span")), ">=", 10.0),
        ]
        ref_key = main_key
    verdicts = []
    for desc, val, op, target in checks:
        verdict = "n/a" if val is None else ("PASS" if (val >= target if op == ">=" else val <= target) else "FAIL")
        verdicts.append((desc, val, op, target, verdict))

    rows = []
    for key, r in results.items():
        rows.append([r["label"], r["ms"], r["pairs"] / 1e6, r["tflops"],
                     quotient(r["ms"], ms(ref_key)) if ref_key in results else None,
                     None if r["mem"] is None else r["mem"] / MB])
    standard = ((B, H, D, S, window, dtype) == (1, 8, 64, 8192, (256, 256), torch.float32)) if not cuda \
        else ((D, S, window, dtype) == (128, 16384, (1024, 0), torch.bfloat16))
    dev_name = torch.cuda.get_device_name(dev) if cuda else f"CPU, {torch.get_num_threads()} threads"
    header = (f"B={B} H={H} D={D} {str(dtype).replace('torch.', '')}, forward (no autograd); {dev_name}; "
              f"torch {torch.__version__}")
    mem_label = "peak MB" if cuda else "peak MB (RSS rise, fresh process)"
    table_md = markdown_table(["case", "ms", "unmasked pairs (M)", "TFLOP/s (unmasked)",
                               f"time / {results[ref_key]['label'] if ref_key in results else ref_key}", mem_label], rows)
    checks_md = markdown_table(["target (issue 4)", "measured", "needed", "verdict"],
                               [[d, "n/a" if v is None else v, f"{op} {t:g}", vd] for d, v, op, t, vd in verdicts])
    report(title="windowed / adaptive-span attention", header=header, sections=[table_md, checks_md],
           verdicts=verdicts, notes=notes, standard=standard, record=args.record,
           argv=list(argv) if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
