"""Benchmark fastattn.attention with a learned relative-position bias table against its peers,
all timed in the same run, and measure its memory at a long sequence.

    PYTHONPATH=python python benchmarks/bench_attention.py                 # B=1 H=8 S=2048 D=64 fp32 CPU
    PYTHONPATH=python python benchmarks/bench_attention.py --quick         # smoke run, small S
    PYTHONPATH=python python benchmarks/bench_attention.py --device cuda   # bf16 B=2 H=16 S=4096 D=128
    PYTHONPATH=python python benchmarks/bench_attention.py --record benchmarks/results/cpu-attention.md

What is timed (q, k, v (B, H, S, D); a learned table (2*max_dist - 1, H) indexed by the clamped
distance i - j, as the seeds' RelativePositionalBias):
  fastattn                  fastattn.attention(q, k, v, rel_bias=table)
  SDPA + materialized bias  the seeds' way: bias = table[clamped distances] -> (1, H, S, S),
                            then F.scaled_dot_product_attention(attn_mask=bias); building the
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
(VmHWM, reset through /proc/self/clear_refs), i.e. every page the call touched, including the
kernels' own scratch buffers that no torch profiler sees. To make that honest the CPU figures
come from a fresh child process (no pages cached by earlier calls) in which glibc's malloc is
told (mallopt) to serve every block above 128 KiB by mmap and to give it back on free, so a
call's new allocations show up as new resident pages; the timings are taken in the parent,
untouched by those settings.
The memory test runs one forward (no autograd) at --mem-S and reports what it used beyond its
output (q, k, v exist before the call and are not counted), next to the size of the
(1, H, S, S) bias SDPA would need (computed, not allocated).

Targets (issue 3), printed with PASS/FAIL:
  CPU (B=1 H=8 S=2048 D=64 fp32): fwd >= 2.5x faster than SDPA + bias, >= 2x faster than
  compiled FlexAttention, <= 1.15x the time of SDPA without bias; fwd+bwd >= 3x faster than
  SDPA + bias, <= 1.3x SDPA without bias; forward at S=16384 H=8 D=64 fp32 uses <= 64 MB
  beyond q, k, v and the output.
  CUDA (bf16 D=128 S=4096): fwd+bwd at least as fast as compiled FlexAttention with the same
  score_mod, and >= 0.7x the speed of SDPA's flash backend without bias.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import markdown_table, peak_memory, sync, time_fn  # noqa: E402

try:
    import fastattn  # noqa: E402
except ImportError:  # a source checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
    import fastattn  # noqa: E402
from fastattn import reference  # noqa: E402

MB = 1e6


def commit() -> str:
    root = os.path.dirname(HERE)
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "uncommitted") + (" (with uncommitted changes)" if sha and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"

def report(*, title: str, header: str, sections: list, verdicts: list, notes: list,
           standard: bool, record, argv: list) -> None:
    """Print a benchmark's tables, notes and PASS/FAIL lines; with `record` (a path), also
    append them to that markdown file under `## title — date`, with the commit and command."""
    print()
    print(header)
    print("\n\n".join(sections))
    if not standard:
        print("\n(not the issue's configuration: the verdicts are indicative only)")
    for n in notes:
        print(f"note: {n}")
    for desc, val, op, target, verdict in verdicts:
        print(f"{verdict}: {desc} = {'n/a' if val is None else f'{val:.3f}'} (needed {op} {target:g})")
    if not record:
        return
    script = os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(HERE))
    cmd = "python " + " ".join([script] + list(argv))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with open(record, "a") as f:
        f.write(f"\n## {title} — {stamp}\n\n")
        f.write(f"commit: {commit()}  \ncommand: `{cmd}`  \n{header}\n\n")
        f.write("\n\n".join(sections) + "\n")
        if not standard:
            f.write("\n(not the issue's configuration: the verdicts are indicative only)\n")
        for n in notes:
            f.write(f"\nnote: {n}  ")
        f.write("\n")
    print(f"\nappended to {record}")



def attention_flops(B, H, Sq, Sk, D, causal=False, window=(-1, -1)) -> float:
    """Forward FLOPs 4*B*H*D*(number of unmasked (query, key) pairs), bottom-right aligned."""
    pairs = 0
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        pairs = Sq * Sk
    else:
        for i in range(Sq):
            p = i + Sk - Sq
            lo = 0 if left < 0 else max(0, p - left)
            hi = Sk - 1 if right < 0 else min(Sk - 1, p + right)
            pairs += max(0, hi - lo + 1)
    return 4.0 * B * H * D * pairs


def seed_bias(table: torch.Tensor, Sq: int, Sk: int) -> torch.Tensor:
    """The seeds' RelativePositionalBias.forward: (1, H, Sq, Sk) from the table."""
    max_dist = (table.shape[0] + 1) // 2
    pos = (torch.arange(Sk - Sq, Sk, device=table.device)[:, None]
           - torch.arange(Sk, device=table.device)[None, :])
    idx = pos.clamp(-max_dist + 1, max_dist - 1) + max_dist - 1
    return table[idx].permute(2, 0, 1).unsqueeze(0)


def make_flex(table, causal, Sq, Sk, device, kernel_options=None):
    """torch.compile(flex_attention) with a score_mod reading the table, or None."""
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

    def run(q, k, v):
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=kernel_options)

    return run, None


# Smaller backward tiles for Flex: on an H100 with torch 2.11 its default backward config with
# a captured, differentiable table needed 233472 bytes of shared memory (limit 232448).
FLEX_SMALL_BWD = {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}


def fresh_allocator() -> None:
    """glibc: mmap (and unmap on free) every block above 128 KiB, so RSS follows allocations."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)  # also stops glibc's dynamic threshold growth
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def measure_in_child(argv_child: list, script: str = __file__) -> dict:
    """Run `script` with argv_child (its --_mem-child mode) in a fresh process; returns the
    JSON it prints on a line starting with MEMJSON."""
    import json

    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, os.path.abspath(script)] + argv_child, env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMJSON "):
            return json.loads(line[len("MEMJSON "):])
    raise RuntimeError(f"memory child failed (rc {proc.returncode}): {proc.stderr.strip()[-800:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "float64", "float16", "bfloat16"],
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--B", type=int, default=None, help="default 1 (CPU) / 2 (CUDA)")
    p.add_argument("--H", type=int, default=None, help="default 8 (CPU) / 16 (CUDA)")
    p.add_argument("--S", type=int, default=None, help="default 2048 (CPU) / 4096 (CUDA)")
    p.add_argument("--D", type=int, default=None, help="default 64 (CPU) / 128 (CUDA)")
    p.add_argument("--max-dist", type=int, default=256, help="table rows = 2 * max_dist - 1")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--mem-S", type=int, default=16384, help="sequence length of the memory test (0: skip)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes minutes on CPU)")
    p.add_argument("--no-reference", action="store_true", help="skip the eager reference")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="smoke run: S=256, memory test at S=1024, 1 warm-up, 3 repeats")
    p.add_argument("--record", metavar="FILE.md", help="append the tables (date, commit, command) to FILE.md")
    p.add_argument("--_mem-child", dest="mem_child", choices=["peers", "long"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mem_child:
        fresh_allocator()

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    B = args.B or (2 if cuda else 1)
    H = args.H or (16 if cuda else 8)
    S = args.S or (4096 if cuda else 2048)
    D = args.D or (128 if cuda else 64)
    mem_S = args.mem_S
    if args.quick:
        S, mem_S = min(S, 256), (min(mem_S, 1024) if mem_S else 0)
        args.warmup, args.repeats = 1, 3
    causal = args.causal
    timing = dict(device=dev, warmup=args.warmup, repeats=args.repeats)
    # What a memory child needs to rebuild the same problem.
    child_argv = ["--device", args.device, "--dtype", str(dtype).replace("torch.", ""), "--B", str(B),
                  "--H", str(H), "--S", str(S), "--D", str(D), "--max-dist", str(args.max_dist),
                  "--mem-S", str(mem_S)] + (["--causal"] if causal else [])

    def fa(q_, k_, v_, t_):
        return fastattn.attention(q_, k_, v_, rel_bias=t_, causal=causal)

    if args.mem_child == "long":
        # One forward at mem_S, q/k/v allocated directly (no temporaries to recycle).
        with torch.no_grad():
            small = torch.randn(1, H, 128, D, dtype=dtype, device=dev)
            fa(small, small, small, torch.zeros(2 * args.max_dist - 1, H, device=dev))  # threads up
            table = 0.1 * torch.randn(2 * args.max_dist - 1, H, device=dev)
            qm, km, vm = (torch.randn(1, H, mem_S, D, dtype=dtype, device=dev) for _ in range(3))
            used = peak_memory(lambda: fa(qm, km, vm, table), device=dev)
        import json
        print("MEMJSON " + json.dumps({"used": used, "out": qm.numel() * qm.element_size()}))
        return 0

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=gen).to(dev, dtype) for _ in range(3))
    grad_out = torch.randn(B, H, S, D, generator=gen).to(dev, dtype)
    table = (0.1 * torch.randn(2 * args.max_dist - 1, H, generator=gen)).to(dev, torch.float32)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    tg = table.clone().requires_grad_(True)

    # ---- the contenders: fn(q, k, v, table) -> out ------------------------------------------
    def sdpa_bias(q_, k_, v_, t_):
        bias = seed_bias(t_, S, S).to(q_.dtype)
        if causal:
            bias = bias.masked_fill(torch.ones(S, S, dtype=torch.bool, device=dev).triu(1), float("-inf"))
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=bias)

    def sdpa_plain(q_, k_, v_, t_):
        if cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal)
        return F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal)

    def ref(q_, k_, v_, t_):
        return reference.attention(q_, k_, v_, rel_bias=t_, causal=causal)

    plain = "SDPA, no bias" + (" (flash)" if cuda else "")
    contenders = [("fastattn", fa, True), ("SDPA + materialized bias", sdpa_bias, True), (plain, sdpa_plain, False)]
    notes = []
    flex_g_small = None
    if not args.no_flex and not args.mem_child:
        flex, why = make_flex(table, causal, S, S, dev)
        flex_g, _ = make_flex(tg, causal, S, S, dev) if flex is not None else (None, None)
        flex_g_small = None
        if flex_g is not None and cuda:
            flex_g_small, _ = make_flex(tg, causal, S, S, dev, kernel_options=FLEX_SMALL_BWD)
        if flex is None:
            notes.append(f"FlexAttention skipped: {why}")
        else:
            contenders.append(("FlexAttention (compiled)",
                               lambda q_, k_, v_, t_: (flex_g if t_ is tg else flex)(q_, k_, v_), True))
    if not args.no_reference:
        contenders.append(("eager reference", ref, True))

    def phases(fn, uses_table):
        def fwd():
            with torch.no_grad():
                return fn(q, k, v, table)

        grad_inputs = [qg, kg, vg] + ([tg] if uses_table else [])

        def fwd_bwd():
            out = fn(qg, kg, vg, tg)
            return torch.autograd.grad(out, grad_inputs, grad_out)

        return (("fwd", fwd), ("fwd+bwd", fwd_bwd))

    if args.mem_child == "peers":
        import json

        small = torch.randn(1, H, 128, D, dtype=dtype, device=dev)
        with torch.no_grad():
            fa(small, small, small, table)  # threads up
        peaks = {}
        for name, fn, uses_table in contenders:
            for phase, f in phases(fn, uses_table):
                try:
                    f()  # steady state: the first backward also starts autograd's machinery
                    peaks[f"{name}|{phase}"] = peak_memory(f, device=dev)
                except Exception:
                    peaks[f"{name}|{phase}"] = None
        print("MEMJSON " + json.dumps(peaks))
        return 0

    # Check fastattn against SDPA + bias before timing anything.
    with torch.no_grad():
        err = (fa(q, k, v, table).float() - sdpa_bias(q, k, v, table).float()).abs().max().item()
    print(f"max |fastattn - SDPA with materialized bias| = {err:.3g}", flush=True)

    fwd_flops = attention_flops(B, H, S, S, D, causal)
    flops_of = {"fwd": fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
    results = {}
    for name, fn, uses_table in contenders:
        results[name] = {}
        for phase, f in phases(fn, uses_table):
            try:
                t = time_fn(f, **timing)
                mem = peak_memory(f, device=dev) if cuda else None
                results[name][phase] = dict(ms=t.median_ms, tflops=flops_of[phase] / (t.median_ms * 1e-3) / 1e12,
                                            mem=mem)
                print(f"  {name:28s} {phase:8s} {t}", flush=True)
            except Exception as e:  # a peer that does not run here (e.g. Flex backward on CPU)
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                if name.startswith("FlexAttention") and phase == "fwd+bwd" and cuda and flex_g_small is not None:
                    try:  # retry with smaller backward tiles (see FLEX_SMALL_BWD)
                        def f_small():
                            out = flex_g_small(qg, kg, vg)
                            return torch.autograd.grad(out, [qg, kg, vg, tg], grad_out)
                        t = time_fn(f_small, **timing)
                        results[name][phase] = dict(ms=t.median_ms, tflops=flops_of[phase] / (t.median_ms * 1e-3) / 1e12,
                                                    mem=peak_memory(f_small, device=dev))
                        notes.append(f"{name} {phase}: the default config failed ({type(e).__name__}: {msg[:100]}); "
                                     f"ran with kernel_options={FLEX_SMALL_BWD}")
                        print(f"  {name:28s} {phase:8s} {t} (kernel_options={FLEX_SMALL_BWD})", flush=True)
                        continue
                    except Exception as e2:  # noqa: BLE001
                        msg += f"; with smaller tiles: {type(e2).__name__}: {str(e2).strip()[:80]}"
                notes.append(f"{name} {phase} skipped: {type(e).__name__}: {msg[:160]}")
                print(f"  {name:28s} {phase:8s} skipped ({type(e).__name__}: {msg[:120]})", flush=True)
            finally:
                sync(dev)

    if not cuda:  # peak memory from a fresh process (see the module docstring)
        try:
            peaks = measure_in_child(child_argv + ["--_mem-child", "peers"] + (["--no-reference"] if args.no_reference else []))
            for key, val in peaks.items():
                name, phase = key.split("|")
                if phase in results.get(name, {}):
                    results[name][phase]["mem"] = val
        except Exception as e:
            notes.append(f"peak memory of the peers not measured: {e}")

    fa_res = results["fastattn"]
    rows = []
    for name, _, _ in contenders:
        row = [name]
        for phase in ("fwd", "fwd+bwd"):
            r = results[name].get(phase)
            if r is None:
                row += ["n/a", "", "", ""]
                continue
            row += [r["ms"], r["tflops"], r["ms"] / fa_res[phase]["ms"] if phase in fa_res else None,
                    None if r["mem"] is None else r["mem"] / MB]
        rows.append(row)

    # ---- memory at a long sequence ----------------------------------------------------------
    mem_rows, mem_extra = [], None
    if mem_S:
        bias_bytes = H * mem_S * mem_S * torch.finfo(dtype).bits // 8
        try:
            if cuda:
                with torch.no_grad():
                    qm, km, vm = (torch.randn(1, H, mem_S, D, dtype=dtype, device=dev) for _ in range(3))
                    used = peak_memory(lambda: fa(qm, km, vm, table), device=dev)
                    out_bytes = qm.numel() * qm.element_size()
                    del qm, km, vm
            else:
                got = measure_in_child(child_argv + ["--_mem-child", "long"])
                used, out_bytes = got["used"], got["out"]
            if used is not None:
                mem_extra = used - out_bytes
                mem_rows.append([f"fastattn forward, B=1 H={H} S={mem_S} D={D}", used / MB, out_bytes / MB,
                                 mem_extra / MB])
        except Exception as e:
            notes.append(f"long-sequence memory test failed: {e}")
        mem_rows.append([f"SDPA + bias: the (1, {H}, {mem_S}, {mem_S}) bias alone (computed)", "", "",
                         bias_bytes / MB])

    # ---- targets ----------------------------------------------------------------------------
    def ratio(peer, phase, inverse=False):
        if phase not in results.get(peer, {}) or phase not in fa_res:
            return None
        r = results[peer][phase]["ms"] / fa_res[phase]["ms"]
        return 1.0 / r if inverse else r

    checks = []  # (description, value, op, target)
    if not cuda:
        checks += [
            ("fwd: SDPA + bias time / fastattn time", ratio("SDPA + materialized bias", "fwd"), ">=", 2.5),
            ("fwd: compiled Flex time / fastattn time", ratio("FlexAttention (compiled)", "fwd"), ">=", 2.0),
            ("fwd: fastattn time / SDPA no-bias time", ratio(plain, "fwd", inverse=True), "<=", 1.15),
            ("fwd+bwd: SDPA + bias time / fastattn time", ratio("SDPA + materialized bias", "fwd+bwd"), ">=", 3.0),
            ("fwd+bwd: fastattn time / SDPA no-bias time", ratio(plain, "fwd+bwd", inverse=True), "<=", 1.3),
        ]
        if mem_S:
            checks.append((f"memory: fastattn fwd at S={mem_S}, MB beyond q, k, v, out",
                           None if mem_extra is None else mem_extra / MB, "<=", 64.0))
    else:
        checks += [
            ("fwd+bwd: compiled Flex time / fastattn time", ratio("FlexAttention (compiled)", "fwd+bwd"), ">=", 1.0),
            ("fwd+bwd: SDPA flash (no bias) time / fastattn time", ratio(plain, "fwd+bwd"), ">=", 0.7),
        ]
    standard = ((B, H, S, D, dtype, causal) == (1, 8, 2048, 64, torch.float32, False) and mem_S == 16384) if not cuda \
        else ((S, D, dtype) == (4096, 128, torch.bfloat16))
    verdicts = []
    for desc, val, op, target in checks:
        verdict = "n/a" if val is None else ("PASS" if (val >= target if op == ">=" else val <= target) else "FAIL")
        verdicts.append((desc, val, op, target, verdict))
    check_rows = [[d, "n/a" if v is None else v, f"{op} {t:g}", verdict] for d, v, op, t, verdict in verdicts]

    dev_name = torch.cuda.get_device_name(dev) if cuda else f"CPU, {torch.get_num_threads()} threads"
    header = (f"B={B} H={H} S={S} D={D} {str(dtype).replace('torch.', '')}, {'causal' if causal else 'non-causal'}, "
              f"table ({2 * args.max_dist - 1}, {H}); {dev_name}; torch {torch.__version__}")
    mem_label = "peak MB" if cuda else "peak MB (RSS rise, fresh process)"
    table_md = markdown_table(["variant", "fwd ms", "fwd TFLOP/s", "fwd time / fastattn", f"fwd {mem_label}",
                               "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd time / fastattn", f"fwd+bwd {mem_label}"], rows)
    mem_md = markdown_table(["memory (forward, no autograd)", "peak rise MB", "output MB", "beyond q, k, v, out MB"],
                            mem_rows) if mem_rows else ""
    checks_md = markdown_table(["target (issue 3)", "measured", "needed", "verdict"], check_rows)
    report(title="attention with a learned bias table", header=header,
           sections=[table_md] + ([mem_md] if mem_md else []) + [checks_md], verdicts=verdicts,
           notes=notes, standard=standard, record=args.record,
           argv=list(argv) if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
