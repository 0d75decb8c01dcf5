"""`python -m fastattn`: build info, a self-check of every op against fastattn.reference, and a
short benchmark of each op against its PyTorch peers (median ms and the ratio to fastattn).

    python -m fastattn                 # all three, on CUDA if available else CPU
    python -m fastattn --quick         # smaller benchmark shapes
    python -m fastattn --no-bench      # build info and self-check only
    python -m fastattn --plot out.png  # also save the benchmark table as a bar chart

Exit code 1 when any self-check fails.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import fastattn
from fastattn import reference


# ---------------------------------------------------------------------------------------------
# self-check
# ---------------------------------------------------------------------------------------------
def _max_err(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(_max_err(x, y) for x, y in zip(a, b))
    if a is None and b is None:
        return 0.0
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _compare(fused_fn, ref_fn, inputs: dict, grads: list[str]):
    """Forward and input-gradient error of fused_fn vs ref_fn on the same inputs."""
    errs = []
    outs = []
    for fn in (fused_fn, ref_fn):
        leaf = {k: (v.detach().clone().requires_grad_(k in grads) if torch.is_tensor(v) else v)
                for k, v in inputs.items()}
        out = fn(leaf)
        g = torch.randn_like(out, generator=None) if not outs else outs[0][1]
        out.backward(g.to(out.dtype))
        outs.append((out.detach(), g, [leaf[k].grad for k in grads]))
    errs.append(_max_err(outs[0][0], outs[1][0]))
    errs.append(_max_err(outs[0][2], outs[1][2]))
    return max(errs)


def self_check(device: str) -> list[tuple[str, bool, float, float]]:
    """Run every op (forward + backward) on small inputs; returns (name, ok, err, tol)."""
    torch.manual_seed(0)
    results = []
    dt = torch.float32
    tol = 2e-4

    x = torch.randn(2, 3, 17, 16, device=device, dtype=dt)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 12, 2, device=device, dtype=dt) / 12))
    rot = torch.linalg.qr(torch.randn(16, 16, device=device, dtype=dt))[0]
    cases = {
        "rotary (inv_freq, half-split, partial)": (
            dict(x=x, inv_freq=inv_freq),
            lambda f, a: f.rotary(a["x"], inv_freq=a["inv_freq"], rotary_dim=12), ["x", "inv_freq"]),
        "rotary (cos/sin, interleaved, rotation)": (
            dict(x=x, cos=torch.cos(torch.arange(20.0, device=device)[:, None] * inv_freq[None, :]),
                 sin=torch.sin(torch.arange(20.0, device=device)[:, None] * inv_freq[None, :]), rot=rot),
            lambda f, a: f.rotary(a["x"], cos=a["cos"], sin=a["sin"], rotary_dim=12, interleaved=True,
                                  rotation=a["rot"], offset=2), ["x", "cos", "sin", "rot"]),
    }
    q = torch.randn(2, 4, 33, 32, device=device, dtype=dt)
    k = torch.randn(2, 2, 40, 32, device=device, dtype=dt)
    v = torch.randn(2, 2, 40, 24, device=device, dtype=dt)
    table = 0.5 * torch.randn(2 * 16 - 1, 4, device=device, dtype=dt)
    span = torch.tensor([3.0, 10.0, 30.0, 60.0], device=device)
    cases.update({
        "attention (causal, GQA, rel_bias)": (
            dict(q=q, k=k, v=v, table=table),
            lambda f, a: f.attention(a["q"], a["k"], a["v"], causal=True, rel_bias=a["table"]),
            ["q", "k", "v", "table"]),
        "attention (window, global, alibi, key_lengths)": (
            dict(q=q, k=k, v=v),
            lambda f, a: f.attention(a["q"], a["k"], a["v"], window=(7, 3), num_global=2,
                                     alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device),
                                     key_lengths=torch.tensor([40, 25], device=device)),
            ["q", "k", "v"]),
        "attention (adaptive span)": (
            dict(q=q, k=k, v=v, span=span),
            lambda f, a: f.attention(a["q"], a["k"], a["v"], span=a["span"], span_ramp=8.0),
            ["q", "k", "v", "span"]),
    })
    # packed: sequences of 0, 1, 20 and 45 queries over 3, 0, 20 and 57 keys
    cu_q = torch.tensor([0, 0, 1, 21, 66], device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 3, 23, 80], device=device, dtype=torch.int32)
    cases["attention_varlen (causal, GQA, rel_bias)"] = (
        dict(q=q.transpose(1, 2).reshape(66, 4, 32), k=k.transpose(1, 2).reshape(80, 2, 32),
             v=v.transpose(1, 2).reshape(80, 2, 24), table=table),
        lambda f, a: f.attention_varlen(a["q"], a["k"], a["v"], cu_q, cu_k, 45, 57, causal=True,
                                        rel_bias=a["table"]),
        ["q", "k", "v", "table"])
    for name, (inputs, call, grads) in cases.items():
        try:
            err = _compare(lambda a: call(fastattn, a), lambda a: call(reference, a), inputs, grads)
            results.append((name, err <= tol, err, tol))
        except Exception as exc:  # report, don't crash: the point is a pass/fail table
            results.append((name + f"  [{type(exc).__name__}: {exc}]", False, float("nan"), tol))
    return results


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------
def _time(fn, device: str, reps: int) -> float:
    """Median milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def benchmark(device: str, quick: bool):
    """Rows of (op, implementation, ms) for forward + backward of each op."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    S = (512 if quick else 1024) if device == "cpu" else (1024 if quick else 4096)
    H, D = 8, 64
    reps = 3 if device == "cpu" else 10
    rows = []

    x = torch.randn(2, H, S, D, device=device, dtype=dt, requires_grad=True)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))

    def rot_fwd_bwd(f):
        def run():
            f.rotary(x, inv_freq=inv_freq).sum().backward()
        return run

    q = torch.randn(1, H, S, D, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(1, H, S, D, device=device, dtype=dt, requires_grad=True)
    v = torch.randn(1, H, S, D, device=device, dtype=dt, requires_grad=True)
    max_dist = 128
    table = torch.zeros(2 * max_dist - 1, H, device=device, requires_grad=True)

    def materialized_bias():
        d = torch.arange(S, device=device)[:, None] - torch.arange(S, device=device)[None, :]
        idx = d.clamp(1 - max_dist, max_dist - 1) + max_dist - 1
        return table[idx].permute(2, 0, 1).unsqueeze(0).to(dt)

    # A KV-cache decode step: one new query per sequence against a cache of 4 S keys, GQA with
    # 8 query heads per kv head (forward only: generation runs without autograd).
    q1 = torch.randn(4, 4 * H, 1, D, device=device, dtype=dt)
    k1 = torch.randn(4, H // 2, 4 * S, D, device=device, dtype=dt)
    v1 = torch.randn(4, H // 2, 4 * S, D, device=device, dtype=dt)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    cases = [
        ("rotary fwd+bwd", "fastattn", rot_fwd_bwd(fastattn)),
        ("rotary fwd+bwd", "eager reference", rot_fwd_bwd(reference)),
        ("attention+rel_bias fwd+bwd", "fastattn",
         lambda: fastattn.attention(q, k, v, causal=True, rel_bias=table).sum().backward()),
        ("attention+rel_bias fwd+bwd", "SDPA + materialized bias",
         lambda: F.scaled_dot_product_attention(
             q, k, v, attn_mask=materialized_bias() + torch.full((S, S), float("-inf"), device=device, dtype=dt).triu(1)
         ).sum().backward()),
        ("attention+rel_bias fwd+bwd", "SDPA, no bias (floor)",
         lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()),
        ("attention decode step, GQA 32/4", "fastattn", no_grad(lambda: fastattn.attention(q1, k1, v1))),
        ("attention decode step, GQA 32/4", "SDPA",
         no_grad(lambda: F.scaled_dot_product_attention(q1, k1, v1, enable_gqa=True))),
    ]
    try:
        from tqdm import tqdm
        it = tqdm(cases, desc="benchmark", unit="case", file=sys.stderr)
    except ImportError:
        it = cases
    for op, impl, fn in it:
        try:
            rows.append((op, impl, _time(fn, device, reps)))
        except Exception as exc:
            rows.append((op, impl + f" [failed: {type(exc).__name__}]", float("nan")))
    return rows, dict(device=device, dtype=str(dt).replace("torch.", ""), S=S, H=H, D=D)


def _plot(rows, cfg, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{op}\n{impl}" for op, impl, _ in rows]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    ax.barh(labels, [ms for _, _, ms in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms (lower is better)")
    ax.set_title(f"fastattn vs PyTorch on {cfg['device']} ({cfg['dtype']}, S={cfg['S']}, H={cfg['H']}, D={cfg['D']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _print_build(device: str) -> None:
    info = fastattn.build_info()
    print("== build")
    for key in ("fastattn", "torch", "library", "cuda", "cuda_archs", "cpu_isa", "compiler"):
        print(f"  {key:10s} {info[key]}")
    print(f"  {'device':10s} {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    print("  ops        " + ", ".join(f"{n} [{'/'.join(d) or 'no kernel'}]" for n, d in info["ops"].items()))


def _print_self_check(device: str) -> tuple[int, int]:
    """Print the self-check's table; returns the number of failed cases."""
    print(f"== self-check against fastattn.reference ({device}, float32, forward + backward)")
    results = self_check(device)
    for name, ok, err, tol in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}  (max err {err:.2e}, tol {tol:.0e})")
    return sum(not ok for _, ok, _, _ in results), len(results)


def _print_benchmark(rows, cfg) -> None:
    """The benchmark table: op, implementation, median ms, and time / fastattn's time for the
    same op (above 1: fastattn is faster)."""
    print(f"== benchmark ({cfg['device']}, {cfg['dtype']}, S={cfg['S']}, H={cfg['H']}, D={cfg['D']}; median ms)")
    ours = {op: ms for op, impl, ms in rows if impl == "fastattn"}
    w_op = max(len(op) for op, _, _ in rows)
    w_impl = max(len("implementation"), *(len(impl) for _, impl, _ in rows))
    print(f"  | {'op':{w_op}s} | {'implementation':{w_impl}s} | {'ms':>9s} | {'time / fastattn':>16s} |")
    print(f"  |{'-' * (w_op + 2)}|{'-' * (w_impl + 2)}|{'-' * 11}|{'-' * 18}|")
    for op, impl, ms in rows:
        print(f"  | {op:{w_op}s} | {impl:{w_impl}s} | {ms:9.2f} | {ms / ours.get(op, float('nan')):16.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastattn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smaller benchmark shapes")
    ap.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    ap.add_argument("--plot", metavar="PNG", help="save the benchmark table as a chart")
    args = ap.parse_args(argv)

    _print_build(args.device)
    failed, total = _print_self_check(args.device)
    if not args.no_bench:
        rows, cfg = benchmark(args.device, args.quick)
        _print_benchmark(rows, cfg)
        if args.plot:
            _plot(rows, cfg, args.plot)
            print(f"  chart saved to {args.plot}")
    print(f"== self-check: {total - failed} of {total} cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
