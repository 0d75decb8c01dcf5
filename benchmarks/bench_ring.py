"""Benchmark ring attention (fastattn.distributed.ring_attention) on the CPU with gloo: memory
per rank, time per training step and how much of the communication the kernels hide, at world
sizes 1, 2 and 4 for one fixed whole sequence.

    python benchmarks/bench_ring.py                      # S=4096 B=1 H=8 D=64 float32, causal
    python benchmarks/bench_ring.py --quick              # smoke run, S=512
    python benchmarks/bench_ring.py --record benchmarks/results/ring-attention.md
    python benchmarks/bench_ring.py --layout contiguous --window 256,256 --compare-one-way

Each world size runs in fresh processes (loopback gloo), with torch threads per rank set so that
the ranks together use the machine's cores (at least 1 each: more ranks than cores share them).
Per rank, for one forward + backward step (after a warm-up step):
  - peak memory: the rise of the process's resident-set high-water mark (VmHWM, reset through
    /proc/self/clear_refs) over the resident memory before the step, with glibc's malloc
    returning large blocks to the system (MALLOC_MMAP_THRESHOLD_) and fastattn's CPU output
    buffer cache off, so it follows the live tensors; the rank's q, k, v shards (allocated
    before) are listed apart;
  - time per step (median over --steps);
  - wait: time spent waiting on the ring's messages after each step's kernels (ring_stats),
    against the same ring with the kernels skipped (communication alone): hidden share =
    1 - wait / communication alone;
  - sent: the bytes a rank sends in one step (K/V shards forward, shards and gradient
    accumulators backward), max over the ranks, and all ranks' together.
--window L,R (non-causal unless --causal) gives a two-sided window; --compare-one-way also runs
each world size with every shard sent one way round the ring as far as its farthest reader (a
one-directional ring), in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
os.environ.setdefault("FASTATTN_CPU_OUTPUT_CACHE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _step(fdist, q, k, v, args, world):
    opts = dict(causal=args.causal, window=args.window)
    out = fdist.ring_attention(q, k, v, layout=args.layout, **opts) if world > 1 else \
        __import__("fastattn").attention(q, k, v, **opts)
    out.backward(torch.ones_like(out))


def _rank(rank, world, init_method, args, threads, out_dir, one_way=False):
    import torch.distributed as dist
    import fastattn  # noqa: F401
    from fastattn import distributed as fdist
    if one_way:  # every shard one way round, as far as its farthest reader
        fdist._split_hops = lambda hops, w: (max(hops, default=0), 0)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    n = args.seq // world
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=g).requires_grad_(True) for _ in range(3))
    input_bytes = 3 * q.numel() * q.element_size()
    _step(fdist, q, k, v, args, world)  # warm-up
    times, waits, computes, sent = [], [], [], []
    peak = 0
    for _ in range(args.steps):
        q.grad = k.grad = v.grad = None
        dist.barrier()
        _reset_peak()
        base = _status("VmRSS")
        start = time.perf_counter()
        with fdist.ring_stats() as stats:
            _step(fdist, q, k, v, args, world)
        times.append(time.perf_counter() - start)
        peak = max(peak, _status("VmHWM") - base)
        sent.append(stats["bytes_sent"])
        waits.append(stats["wait_s"])
        computes.append(stats["compute_s"])
    comm_alone = 0.0
    if world > 1:  # the same ring with the kernels skipped: communication alone
        fdist._forward_step = lambda *a, **kw: None
        fdist._backward_step = lambda plan, s, kv, k_, v_, *rest: torch.zeros(
            k_.numel() + v_.numel(), dtype=torch.float32)
        alone = []
        for _ in range(args.steps):
            dist.barrier()
            with fdist.ring_stats() as stats:
                _step(fdist, q, k, v, args, world)
            alone.append(stats["wait_s"])
        comm_alone = statistics.median(alone)
    row = dict(rank=rank, world=world, threads=threads, input_mib=input_bytes / 2 ** 20,
               peak_mib=peak / 2 ** 20, step_s=statistics.median(times), wait_s=statistics.median(waits),
               compute_s=statistics.median(computes), comm_alone_s=comm_alone,
               sent_mib=max(sent) / 2 ** 20, one_way=one_way)
    with open(os.path.join(out_dir, f"{world}-{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096, help="the whole sequence's length")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--window", default="-1,-1", help="window L,R (default none)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                   help="causal (default: on without a window, off with one)")
    p.add_argument("--compare-one-way", action="store_true",
                   help="also run each world with every shard sent one way round the ring")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--record", help="append the table to this markdown file")
    args = p.parse_args()
    if args.quick:
        args.seq, args.steps = 512, 1
    args.window = tuple(int(x) for x in args.window.split(","))
    if args.causal is None:
        args.causal = args.window == (-1, -1)
    cores = os.cpu_count() or 1
    rows = []
    for world in (int(w) for w in args.worlds.split(",")):
        threads = max(1, cores // world)
        for one_way in (False, True) if args.compare_one_way and world > 2 else (False,):
            with tempfile.TemporaryDirectory() as d:
                torch.multiprocessing.spawn(_rank, args=(world, f"file://{d}/rv", args, threads, d, one_way),
                                            nprocs=world)
                rows += [json.load(open(os.path.join(d, f"{world}-{r}.json"))) for r in range(world)]
    lines = ["| world | shards sent | threads/rank | q,k,v per rank (MiB) | peak rise per rank, max (MiB) | "
             "step (s) | kernels (s) | wait (s) | comm alone (s) | hidden | sent per rank, max (MiB) | "
             "sent, all ranks (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for world, one_way in sorted({(r["world"], r["one_way"]) for r in rows}):
        rs = [r for r in rows if r["world"] == world and r["one_way"] == one_way]
        wait = max(r["wait_s"] for r in rs)
        alone = max(r["comm_alone_s"] for r in rs)
        hidden = f"{max(0.0, 1 - wait / alone):.0%}" if alone > 0 else "-"
        lines.append(f"| {world} | {'one way' if one_way else 'as needed'} | {rs[0]['threads']} | "
                     f"{rs[0]['input_mib']:.1f} | {max(r['peak_mib'] for r in rs):.1f} | "
                     f"{max(r['step_s'] for r in rs):.3f} | {max(r['compute_s'] for r in rs):.3f} | {wait:.3f} | "
                     f"{alone:.3f} | {hidden} | {max(r['sent_mib'] for r in rs):.1f} | "
                     f"{sum(r['sent_mib'] for r in rs):.1f} |")
    table = "\n".join(lines)
    mask = ("causal " if args.causal else "") + (f"window={args.window} " if args.window != (-1, -1) else "")
    print(f"S={args.seq} B=1 H={args.heads} D={args.dim} float32 {mask}layout={args.layout}, "
          f"forward + backward, torch {torch.__version__}, {cores} cores")
    print(table)
    if args.record:
        with open(args.record, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
