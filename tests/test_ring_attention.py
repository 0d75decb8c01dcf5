"""Ring attention (fastattn.distributed): the sharded call against the unsharded
fastattn.attention on the whole sequence, in processes on this machine (gloo, loopback only).

One spawn per (world size, layout); each rank loops over every case, so the ranks stay in step
and the start-up cost is paid once. A rank records its failures and raises them at the end, after
the last collective, so that one failing comparison never leaves the other ranks waiting."""
from __future__ import annotations

import datetime
import math
import os
import time
import traceback
import zlib

import pytest
import torch

import fastattn
from fastattn import distributed as fdist

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available")

PG_TIMEOUT_S = 30
JOIN_TIMEOUT_S = 120


# ------------------------------------------------------------------------------ process helpers
def _spawn(fn, world: int, tmp_path, *args, join_timeout: float = JOIN_TIMEOUT_S):
    """Runs fn(rank, world, init_method, *args) in `world` processes; fails (and kills them)
    past join_timeout instead of hanging."""
    ctx = torch.multiprocessing.start_processes(
        fn, args=(world, f"file://{tmp_path / 'rendezvous'}") + args, nprocs=world, join=False,
        start_method="spawn")
    deadline = time.monotonic() + join_timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"ring attention workers did not finish within {join_timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _init(rank, world, init_method, timeout_s=PG_TIMEOUT_S):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _shutdown():
    import gc
    import torch.distributed as dist
    gc.collect()
    # wait for the other ranks before tearing gloo down (a group freed while its peer is gone
    # can abort the process from gloo's own threads)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ the cases
# Whole-sequence shapes: B, Hq, Hkv, Sq, Sk, D. Tensors named in `learn` require grad.
SMALL = dict(B=2, Hq=4, Hkv=2, Sq=16, Sk=16, D=8)
CASES = [
    dict(name="full"),
    dict(name="causal", causal=True),
    dict(name="causal window table", causal=True, window=(3, 0), rel_bias=5, learn=("rel_bias",)),
    dict(name="window alibi scale", window=(2, 3), alibi=True, scale=0.7,
         learn=("alibi_slopes", "scale")),
    dict(name="alibi and table", causal=True, alibi=True, rel_bias=4, learn=("alibi_slopes", "rel_bias")),
    dict(name="span", causal=True, span=(2.5, 1.0), span_ramp=2.0, learn=("span",)),
    dict(name="span both sides", span=(1.0, 3.0), span_ramp=1.5, learn=("span",)),
    dict(name="global tokens", causal=True, window=(1, 1), num_global=3),
    dict(name="global bidirectional", window=(1, 0), num_global=2, rel_bias=3, learn=("rel_bias",)),
    dict(name="key lengths softcap", causal=True, key_lengths=(11, 5), softcap=5.0),
    dict(name="key lengths zero", key_lengths=(0, 16), window=(4, 4)),
    dict(name="dropout", causal=True, rel_bias=5, dropout_p=0.3, learn=("rel_bias",)),
    dict(name="lse used, per-batch alibi", alibi_batch=True, return_lse=True, causal=True),
    dict(name="mqa cross lengths", Hkv=1, Sq=8, causal=True, window=(6, -1), rel_bias=6,
         learn=("rel_bias",)),
]


def _inputs(case, dtype):
    """The whole sequence's q, k, v and option tensors, the same on every rank."""
    shape = {**SMALL, **{k: case[k] for k in SMALL if k in case}}
    B, Hq, Hkv, Sq, Sk, D = (shape[k] for k in ("B", "Hq", "Hkv", "Sq", "Sk", "D"))
    if "total" in case:
        Sq = Sk = case["total"]
    g = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    tensors = dict(q=r(B, Hq, Sq, D), k=r(B, Hkv, Sk, D), v=r(B, Hkv, Sk, D))
    opts = {k: case[k] for k in ("causal", "window", "num_global", "softcap", "span_ramp", "dropout_p",
                                 "return_lse") if k in case}
    if "rel_bias" in case:
        tensors["rel_bias"] = r(2 * case["rel_bias"] - 1, Hq)
    if case.get("alibi"):
        tensors["alibi_slopes"] = torch.rand(Hq, generator=g, dtype=torch.float64).to(dtype) * 0.5 + 0.1
    if case.get("alibi_batch"):
        tensors["alibi_slopes"] = torch.rand(B, Hq, generator=g, dtype=torch.float64).to(dtype) * 0.5
    if "span" in case:
        lo, hi = case["span"]
        tensors["span"] = torch.linspace(lo, hi, B * Hq, dtype=torch.float64).view(B, Hq).to(dtype)
    if "scale" in case:
        tensors["scale"] = torch.tensor(case["scale"], dtype=dtype)
    if "key_lengths" in case:
        opts["key_lengths"] = torch.tensor(case["key_lengths"], dtype=torch.int64)
    for name in case.get("learn", ()):
        tensors[name].requires_grad_(True)
    for name in ("q", "k", "v"):
        tensors[name].requires_grad_(True)
    return tensors, opts


def _loss_weights(out, lse, seed):
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    w_lse = None if lse is None else torch.randn(lse.shape, generator=g, dtype=torch.float64)
    return w_out, w_lse


def _run_case(case, dtype, world, rank, layout, seed=0):
    """Whole-sequence call and ring call; returns (want, got): dicts of the rank's output shard,
    lse shard and gradients (q, k, v shards; parameters whole)."""
    tensors, opts = _inputs(case, dtype)
    lse_used = opts.get("return_lse", False)
    params = [n for n in ("scale", "rel_bias", "alibi_slopes", "span") if n in tensors]
    shard = lambda x: fdist.shard_sequence(x, world, rank, layout)  # noqa: E731

    def run(fn, q, k, v):
        torch.manual_seed(1234 + seed)  # dropout draws from the default generator
        res = fn(q, k, v, **{n: tensors[n] for n in params}, **opts)
        out, lse = res if lse_used else (res, None)
        return out, lse

    def grads_of(out, lse, leaves):
        w_out, w_lse = _loss_weights(out, lse, 7 + rank)
        loss = (out * w_out).sum() + ((lse * w_lse).sum() if lse is not None else 0)
        need = [t for t in leaves if t.requires_grad]
        gs = torch.autograd.grad(loss, need)
        return dict(zip([id(t) for t in need], gs))

    # whole call: every rank weighs its own shard's output the same way as in the ring call
    out, lse = run(fastattn.attention, tensors["q"], tensors["k"], tensors["v"])
    want = {"out": shard(out).detach()}
    if lse is not None:
        want["lse"] = shard(lse.unsqueeze(-1)).squeeze(-1).detach()
    w_out, w_lse = _loss_weights(want["out"], want.get("lse"), 7 + rank)
    # the whole-sequence loss is the sum over ranks of each rank's weighted shard
    loss = 0
    for r in range(world):
        sr = lambda x: fdist.shard_sequence(x, world, r, layout)  # noqa: E731
        wo, wl = _loss_weights(want["out"], want.get("lse"), 7 + r)
        loss = loss + (sr(out) * wo).sum()
        if lse is not None:
            loss = loss + (sr(lse.unsqueeze(-1)).squeeze(-1) * wl).sum()
    leaves = [tensors["q"], tensors["k"], tensors["v"]] + [tensors[n] for n in params if tensors[n].requires_grad]
    names = ["q", "k", "v"] + [n for n in params if tensors[n].requires_grad]
    for n, g in zip(names, torch.autograd.grad(loss, leaves)):
        want["d" + n] = shard(g) if n in ("q", "k", "v") else g

    qs, ks, vs = (shard(tensors[n].detach()).requires_grad_(True) for n in ("q", "k", "v"))
    out_r, lse_r = run(lambda *a, **kw: fdist.ring_attention(*a, layout=layout, **kw), qs, ks, vs)
    got = {"out": out_r.detach()}
    if lse_r is not None:
        got["lse"] = lse_r.detach()
    loss_r = (out_r * w_out).sum() + ((lse_r * w_lse).sum() if lse_r is not None else 0)
    for n, g in zip(names, torch.autograd.grad(loss_r, [qs, ks, vs] + leaves[3:])):
        got["d" + n] = g
    return want, got


def _compare(want, got, tol, label, failures):
    for key, w in want.items():
        g = got.get(key)
        try:
            assert g is not None, f"no {key}"
            torch.testing.assert_close(g, w, **tol)
        except AssertionError as e:
            failures.append(f"{label}: {key}: {e}")


def _same_on_every_rank(tensors: dict, world) -> list:
    """Names of the tensors whose bits differ between ranks."""
    import torch.distributed as dist
    bad = []
    for name, t in tensors.items():
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        if not all(torch.equal(parts[0], p) for p in parts[1:]):
            bad.append(name)
    return bad


def _cases_worker(rank, world, init_method, layout, out_dir):
    _init(rank, world, init_method)
    failures = []
    try:
        tol64 = dict(rtol=2e-6, atol=2e-6)  # the kernels' lse is float32, also for float64 inputs
        for case in CASES:
            label = f"world {world} {layout} {case['name']}"
            try:
                want, got = _run_case(case, torch.float64, world, rank, layout)
                _compare(want, got, tol64, label, failures)
                params = {k: v for k, v in got.items() if k in ("dscale", "drel_bias", "dalibi_slopes", "dspan")}
                for name in _same_on_every_rank(params, world):
                    failures.append(f"{label}: {name} differs between ranks")
            except Exception:  # noqa: BLE001 (recorded; the ranks stay in step)
                failures.append(f"{label}: {traceback.format_exc()}")
        # reproducible: the same gradients, bit for bit, from a second run
        case = next(c for c in CASES if c["name"] == "alibi and table")
        _, first = _run_case(case, torch.float64, world, rank, layout)
        _, second = _run_case(case, torch.float64, world, rank, layout)
        for key in first:
            if not torch.equal(first[key], second[key]):
                failures.append(f"world {world} {layout}: {key} differs between two runs")
        if world == 2 and layout == "zigzag":
            case = dict(name="float32 long", total=512, causal=True, rel_bias=64, dropout_p=0.1,
                        B=1, Hq=2, Hkv=1, D=32, learn=("rel_bias",))
            want, got = _run_case(case, torch.float32, world, rank, layout)
            _compare(want, got, dict(rtol=2e-4, atol=2e-4), "float32 long", failures)
    finally:
        _shutdown()
    (out_dir / f"rank{rank}.txt").write_text("\n".join(failures))


@needs_gloo
@pytest.mark.parametrize("world,layout", [(2, "contiguous"), (2, "zigzag"), (4, "contiguous"), (4, "zigzag")])
def test_ring_attention_equals_the_whole_call(tmp_path, world, layout):
    _spawn(_cases_worker, world, tmp_path, layout, tmp_path)
    failures = [line for r in range(world) for line in (tmp_path / f"rank{r}.txt").read_text().splitlines()]
    assert not failures, "\n".join(failures[:20])
