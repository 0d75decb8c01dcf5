"""What every benchmark script shares: the command line, timing, memory, and the report.

    from common import make_parser, parse_args, time_fn, Report, Check

    p = make_parser(__doc__, warmup=2, repeats=7, quick="smoke run: small S")
    p.add_argument("--S", type=int, default=2048)        # the script's own options
    args = parse_args(p, argv)                           # + args.dev, args.cuda, args.argv
    t = time_fn(lambda: f(x), **timing(args))            # -> Timing(median_ms=..., ...)
    report = Report("title", "B=1 H=8 ...", args.dev)
    report.table(["case", "ms"], rows)
    report.checks([Check(TARGETS["cpu_fwd_vs_sdpa_bias"], value)])
    report.emit(args)                                    # print; with --record FILE, append

Common options (make_parser): --device, --quick (a smoke run: 1 warm-up call, 3 timed calls,
and each script's small shapes), --record FILE.md, --warmup, --repeats.

Timing. time_fn runs `fn` a few times to warm up (allocator, caches, torch.compile, lazy
init), then times `repeats` calls and reports the median (robust against a noisy shared
machine) and the minimum. On CPU each call is timed with time.perf_counter; on CUDA with a
pair of CUDA events around each call, after a synchronize, so that only GPU time between the
events counts. That is a call's latency: the GPU waits while the host prepares the call, so
the host time before the launch counts too. time_back_to_back measures throughput instead,
as a training loop sees it: `calls` calls queued one after another between two events, so
the host prepares the next call while the GPU runs the current one, and per-call host time
counts only where it exceeds the kernel's. (On CPU, where calls are synchronous, the two are
the same.) time_many times several callables round-robin.

Memory. peak_memory reports how far memory rose above its level before the call: on CUDA from
torch.cuda.max_memory_allocated; on CPU from the process's peak resident set (Linux VmHWM,
reset through /proc/self/clear_refs), which also counts allocator and page-cache effects, so
read it as an estimate. For CPU figures worth comparing, the scripts measure in a fresh child
process (measure_in_child) whose malloc maps every block above 128 KiB on its own and unmaps
it on free (fresh_allocator), so that a call's new allocations show up as new resident pages.

Report. Report prints a benchmark's tables, notes and target checks (targets come from
benchmarks/targets.py); with --record it appends them to a markdown file under a heading
`## title — date` and a table of date, commit, torch version, machine and command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from targets import Target

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

__all__ = ["Timing", "time_fn", "time_back_to_back", "time_many", "peak_memory", "sync", "markdown_table",
           "gbps", "with_tuning", "make_parser", "parse_args", "timing", "load_fastattn", "machine", "commit",
           "Check", "Report", "attention_flops", "materialized_bias", "fresh_allocator", "measure_in_child", "run"]


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def make_parser(doc: str, *, warmup: int, repeats: int, quick: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the options every script takes; add the script's own to it."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("common options (benchmarks/common.py)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    g.add_argument("--quick", action="store_true", help=f"smoke run: 1 warm-up, 3 repeats; {quick}")
    g.add_argument("--record", metavar="FILE.md",
                   help="append the tables to FILE.md, under a table of date, commit, torch, machine, command")
    g.add_argument("--warmup", type=int, default=warmup, help=f"untimed calls per case (default {warmup})")
    g.add_argument("--repeats", type=int, default=repeats,
                   help=f"timed calls per case; the median is reported (default {repeats})")
    return p


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parser.parse_args, plus args.dev (torch.device), args.cuda (bool) and args.argv (the
    arguments, for the recorded command); --quick sets 1 warm-up call and 3 timed calls."""
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.dev = torch.device(args.device)
    args.cuda = args.dev.type == "cuda"
    if args.quick:
        args.warmup, args.repeats = 1, 3
    return args


def timing(args: argparse.Namespace) -> dict:
    """The keyword arguments of time_fn / time_many / time_back_to_back for these args."""
    return dict(device=args.dev, warmup=args.warmup, repeats=args.repeats)


def load_fastattn():
    """import fastattn: the installed package, else this checkout's python/ (which JIT-builds
    the kernels on first use). Called after the command line is parsed, so --help is instant."""
    try:
        import fastattn
    except ImportError:
        sys.path.insert(0, os.path.join(REPO, "python"))
        import fastattn
    return fastattn


def run(main: Callable[[], int]) -> None:
    """sys.exit(main()), with exit code 130 on Ctrl-C."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------
@dataclass
class Timing:
    median_ms: float
    min_ms: float
    repeats: int

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms (min {self.min_ms:.3f}, n={self.repeats})"


def sync(device) -> None:
    """Wait for queued work on `device` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, device="cpu", warmup: int = 3, repeats: int = 10,
            max_seconds: Optional[float] = 20.0) -> Timing:
    """Median and minimum wall time of fn() in milliseconds.

    warmup: untimed calls first. repeats: timed calls (fewer if they would take longer than
    max_seconds in total, but at least 3).
    """
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    start_all = time.perf_counter()
    for i in range(repeats):
        times.append(_time_once(fn, dev))
        if (max_seconds is not None and i >= 2
                and time.perf_counter() - start_all > max_seconds):
            break
    return Timing(statistics.median(times), min(times), len(times))


def _time_once(fn, dev) -> float:
    if dev.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_back_to_back(fn: Callable[[], object], *, device="cpu", warmup: int = 3, repeats: int = 10,
                      calls: int = 20, max_seconds: Optional[float] = 20.0) -> Timing:
    """Median and minimum time per call, in milliseconds, of `calls` consecutive calls timed
    together (throughput; see the module docstring); `repeats` such groups."""
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    start_all = time.perf_counter()
    for i in range(repeats):
        if dev.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
        if max_seconds is not None and i >= 2 and time.perf_counter() - start_all > max_seconds:
            break
    return Timing(statistics.median(times), min(times), len(times))


def time_many(fns: dict, *, device="cpu", warmup: int = 3, repeats: int = 10,
              max_seconds: Optional[float] = 120.0) -> dict:
    """Like time_fn for several callables, timed round-robin (a, b, c, a, b, c, ...), so that
    a change in machine load hits all of them alike. Returns {name: Timing}."""
    dev = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(dev)
    times = {name: [] for name in fns}
    start_all = time.perf_counter()
    for i in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, dev))
        if max_seconds is not None and i >= 2 and time.perf_counter() - start_all > max_seconds:
            break
    return {name: Timing(statistics.median(v), min(v), len(v)) for name, v in times.items()}


def _cpu_rss_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(fn: Callable[[], object], *, device="cpu") -> Optional[int]:
    """Bytes by which memory peaked above its level before fn() (None if not measurable)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        return None
    base = _cpu_rss_bytes("VmRSS")
    fn()
    peak = _cpu_rss_bytes("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, peak - base)


def with_tuning(call: Callable[[], object], **switches) -> object:
    """call() with fastattn's CUDA switches (fastattn.tuning.cuda_tuning: kv_splits,
    rescale_slack, unordered_dq) set for its duration, so that one run can time a kernel with
    and without an optimization."""
    import fastattn
    with fastattn.tuning.cuda_tuning(**switches):
        return call()


def gbps(nbytes: float, ms: float) -> float:
    """Throughput in GB/s (1e9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; floats are printed with 3 significant decimals."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def materialized_bias(table: torch.Tensor, Sq: int, Sk: int) -> torch.Tensor:
    """(1, H, Sq, Sk) from the table: table[clamp(i - j) + max_dist - 1], bottom-right aligned."""
    max_dist = (table.shape[0] + 1) // 2
    pos = (torch.arange(Sk - Sq, Sk, device=table.device)[:, None]
           - torch.arange(Sk, device=table.device)[None, :])
    idx = pos.clamp(-max_dist + 1, max_dist - 1) + max_dist - 1
    return table[idx].permute(2, 0, 1).unsqueeze(0)


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


def fresh_allocator() -> None:
    """glibc: mmap (and unmap on free) every block above 128 KiB, so RSS follows allocations."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)  # also stops glibc's dynamic threshold growth
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def child_result(value) -> None:
    """In a child started by measure_in_child: hand `value` (JSON) back to the parent."""
    print("MEMJSON " + json.dumps(value), flush=True)


def measure_in_child(script: str, argv_child: list) -> dict:
    """Run `script` with argv_child (its memory-child mode) in a fresh process, with the same
    fastattn on its path; returns what it passed to child_result."""
    env = dict(os.environ)
    fastattn = sys.modules.get("fastattn")
    if fastattn is not None:
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, os.path.abspath(script)] + argv_child, env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMJSON "):
            return json.loads(line[len("MEMJSON "):])
    raise RuntimeError(f"memory child failed (rc {proc.returncode}): {proc.stderr.strip()[-800:]}")


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def machine(dev) -> str:
    """What ran the benchmark: the GPU's name, or the CPU's model, threads and vector ISA."""
    dev = torch.device(dev)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name" and val.strip():
                    model = val.strip()
                elif key.strip() == "flags":
                    flags = set(val.split())
                    break
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return (f"{model}{' VM' if 'hypervisor' in flags else ''}, {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} threads" + (f" ({isa})" if isa else ""))


def commit() -> str:
    """The checkout's short commit, marked when tracked files have uncommitted changes."""
    try:
        sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + (" (with uncommitted changes)" if sha and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Check:
    """One measured value against a target of benchmarks/targets.py.

    label: what was measured, when more precise than the target's description (e.g. with the
    sizes of this run). minimum: the same ratio from the minimum times (printed for reference).
    info: print the value without a verdict (a target set for another device)."""
    target: Target
    value: Optional[float]
    label: Optional[str] = None
    minimum: Optional[float] = None
    info: bool = False

    @property
    def verdict(self) -> str:
        return "info" if self.info and self.value is not None else self.target.verdict(self.value)


class Report:
    """A benchmark's output: a setup line, markdown tables, target checks and notes."""

    def __init__(self, title: str, setup: str, dev):
        self.title, self.setup, self.dev = title, setup, torch.device(dev)
        self.sections: list = []
        self.notes: list = []
        self.verdicts: list = []

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        if rows:
            self.sections.append(markdown_table(headers, rows))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def checks(self, checks: Sequence[Check], *, default_shape: bool = True) -> None:
        """A table of the checks (target name, what, measured, needed, verdict)."""
        if not checks:
            return
        with_min = any(c.minimum is not None for c in checks)
        headers = ["target", "what", "measured"] + (["(minimums)"] if with_min else []) + ["needed", "verdict"]
        rows = []
        for c in checks:
            row = [c.target.name, c.label or c.target.description, "n/a" if c.value is None else c.value]
            if with_min:
                row.append(c.minimum)
            rows.append(row + [c.target.needed, c.verdict])
            self.verdicts.append(f"{c.verdict}: {c.target.name}: {c.label or c.target.description} = "
                                 f"{'n/a' if c.value is None else f'{c.value:.3f}'} (needed {c.target.needed})")
        self.table(headers, rows)
        if not default_shape:
            self.note("not the default shapes: the verdicts are indicative only")

    def text(self) -> str:
        parts = [self.setup, *self.sections]
        out = "\n\n".join(parts) + "\n"
        if self.notes:
            out += "\n" + "\n".join(f"note: {n}  " for n in self.notes) + "\n"
        return out

    def emit(self, args: argparse.Namespace) -> None:
        """Print the report; with args.record, append it to that markdown file."""
        print()
        print(self.text())
        for line in self.verdicts:
            print(line)
        if args.record:
            self.record(args.record, args.argv)
            print(f"\nappended to {args.record}")

    def record(self, path: str, argv: Sequence[str]) -> None:
        script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
        cmd = "python " + " ".join([script] + list(argv))
        now = datetime.datetime.now()
        header = markdown_table(["date", "commit", "torch", "machine", "command"],
                                [[now.strftime("%Y-%m-%d %H:%M"), commit(), torch.__version__, machine(self.dev),
                                  f"`{cmd}`"]])
        new_file = not os.path.exists(path) or os.path.getsize(path) == 0
        with open(path, "a") as f:
            if new_file:
                f.write(f"# Benchmark results: {machine(self.dev)}\n")
            f.write(f"\n## {self.title} — {now.strftime('%Y-%m-%d %H:%M')}\n\n{header}\n\n{self.text()}")
