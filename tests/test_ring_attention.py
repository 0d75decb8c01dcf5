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


# ------------------------------------------------------------------------------ processes
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


# ------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("layout", fdist.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_indices_cover_the_sequence_once(world, layout):
    S = 4 * world
    idx = [fdist.shard_indices(S, world, r, layout) for r in range(world)]
    assert sorted(torch.cat(idx).tolist()) == list(range(S))
    x = torch.arange(2 * 3 * S).view(2, 3, S)
    shards = [fdist.shard_sequence(x, world, r, layout) for r in range(world)]
    for r in range(world):
        torch.testing.assert_close(shards[r], x[:, :, idx[r]], rtol=0, atol=0)
    torch.testing.assert_close(fdist.unshard_sequence(shards, layout), x, rtol=0, atol=0)


def test_zigzag_and_contiguous_indices_written_out():
    assert fdist.shard_indices(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert fdist.shard_indices(8, 2, 1, "zigzag").tolist() == [2, 3, 4, 5]
    assert fdist.shard_indices(8, 4, 1, "zigzag").tolist() == [1, 6]
    assert fdist.shard_indices(8, 2, 1, "contiguous").tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="divisible by 4 for layout='zigzag'"):
        fdist.shard_indices(6, 2, 0, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        fdist.shard_indices(8, 2, 0, "striped")


def test_merge_partials_equals_the_call_on_all_keys_including_empty_rows():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    # causal with q at positions 0..5 and keys split 0..2 | 3..5: row 0..2 see no key of the
    # second half (lse -inf there); key_lengths 0 on a third call empties every row
    whole, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
    a = fastattn.attention(q, k[:, :, :3], v[:, :, :3], causal=True, q_offset=0, k_offset=0, return_lse=True)
    b = fastattn.attention(q, k[:, :, 3:], v[:, :, 3:], causal=True, q_offset=0, k_offset=3, return_lse=True)
    assert torch.isneginf(b[1][0, :, :3]).all()
    out, got_lse = fdist.merge_partials(a[0], a[1], b[0], b[1])
    torch.testing.assert_close(out, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_lse, lse, rtol=1e-6, atol=1e-6)
    out2, lse2 = fdist.merge_partials(b[0], b[1], a[0], a[1])  # either order
    torch.testing.assert_close(out2, whole, rtol=1e-6, atol=1e-6)
    empty = torch.full_like(lse, -math.inf)
    out3, lse3 = fdist.merge_partials(torch.zeros_like(whole), empty, torch.zeros_like(whole), empty)
    assert torch.isneginf(lse3).all() and not out3.isnan().any() and (out3 == 0).all()
    out4, lse4 = fdist.merge_partials(torch.zeros_like(whole), empty, whole, lse)  # one side empty
    torch.testing.assert_close(out4, whole, rtol=0, atol=0)
    torch.testing.assert_close(lse4, lse, rtol=0, atol=0)


def _plan(world, layout, S, **kw):
    opts = dict(shift=0, scale=None, causal=False, left=-1, right=-1, span_ramp=32.0, num_global=0,
                softcap=0.0, dropout_p=0.0, seed=None, key_lengths=None, key_limit=None, span_reach=None)
    opts.update(kw)
    pieces = [fdist.layout_pieces(S, world, r, layout) for r in range(world)]
    plan = fdist._Plan(world=world, rank=0, ranks=list(range(world)), group=None, q_pieces=pieces,
                       k_pieces=pieces, **opts)
    plan.schedule()
    return plan


def test_schedule_skips_invisible_shards_and_stops_sending_them():
    # contiguous causal, 4 ranks: rank r sees shards 0..r; shard s is last needed by rank 3,
    # so the ring carries shard s for 3 - s hops and the last step sends nothing
    p = _plan(4, "contiguous", 16, causal=True)
    assert p.needed == [[r >= s for s in range(4)] for r in range(4)]
    assert p.hops == [[3, 2, 1, 0], [0, 0, 0, 0]] and p.steps == 3
    # zigzag balances it: every rank sees every shard (one of each pair of chunks), one way
    p = _plan(4, "zigzag", 16, causal=True)
    assert all(all(row) for row in p.needed) and p.hops == [[3, 3, 3, 3], [0, 0, 0, 0]]
    # a window of 2 tokens back: rank r needs its own shard and rank r - 1's
    p = _plan(4, "contiguous", 16, causal=True, left=2)
    assert p.needed == [[s in (r - 1, r) for s in range(4)] for r in range(4)]
    assert p.hops == [[1, 1, 1, 0], [0, 0, 0, 0]] and p.steps == 1
    # global tokens at positions 0..1: every rank needs shard 0 through them
    p = _plan(4, "contiguous", 16, causal=True, left=2, num_global=2)
    assert [row[0] for row in p.needed] == [True] * 4
    # a span reach of 4.5: |d| <= 4 passes, so only neighbouring shards of 4 tokens: a shard
    # goes one hop each way (the ends one way), one step and 6 messages, where one way round
    # the ring the middle shards would go three hops (10 messages, three steps)
    p = _plan(4, "contiguous", 16, span_reach=4.5)
    assert p.needed == [[abs(r - s) <= 1 for s in range(4)] for r in range(4)]
    assert p.hops == [[1, 1, 1, 0], [0, 1, 1, 1]] and p.steps == 1
    # the same with a two-sided window over 8 ranks: one hop each way, not seven one way
    p = _plan(8, "contiguous", 32, left=3, right=3)
    assert p.hops == [[1] * 7 + [0], [0] + [1] * 7] and p.steps == 1
    # keys past every key_length are never needed
    p = _plan(4, "contiguous", 16, key_limit=8)
    assert p.hops[0][2:] == [0, 0] and p.hops[1][2:] == [0, 0] and p.needed[0][:2] == [True, True]


def test_split_hops_takes_the_fewest_messages():
    assert fdist._split_hops([], 4) == (0, 0)
    assert fdist._split_hops([1, 2, 3], 4) == (3, 0)      # everyone: one way round
    assert fdist._split_hops([1, 7], 8) == (1, 1)         # both neighbours
    assert fdist._split_hops([6, 7], 8) == (0, 2)         # the two before
    assert fdist._split_hops([1, 2, 6, 7], 8) == (2, 2)
    assert fdist._split_hops([1, 5], 8) == (1, 3)         # 4 messages, against 5 one way


# ------------------------------------------------------------------------------ bad input, module
def _bad_input_cases(rank):
    q = torch.randn(1, 2, 4, 8)
    odd = torch.randn(1, 2, 3, 8)
    yield "shards of different lengths", ValueError, "q must have the same shape on every rank", \
        lambda: fdist.ring_attention(q if rank == 0 else torch.randn(1, 2, 6, 8), q, q)
    yield "different causal", ValueError, "causal must have the same value on every rank", \
        lambda: fdist.ring_attention(q, q, q, causal=rank == 1)
    yield "odd zigzag shard", ValueError, "layout='zigzag' needs an even local sequence length", \
        lambda: fdist.ring_attention(odd, odd, odd, layout="zigzag")
    yield "bad layout", ValueError, "layout must be one of", \
        lambda: fdist.ring_attention(q, q, q, layout="striped")
    yield "attn_mask", NotImplementedError, "does not implement attn_mask", \
        lambda: fdist.ring_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    yield "q_offset", NotImplementedError, "sets q_offset itself", \
        lambda: fdist.ring_attention(q, q, q, q_offset=3)
    yield "per-batch alibi gradient", NotImplementedError, "per-batch alibi_slopes", \
        lambda: fdist.ring_attention(q, q, q, alibi_slopes=torch.rand(1, 2, requires_grad=True))
    yield "key_lengths past the sequence", ValueError, r"key_lengths must lie in \[0, 8\]", \
        lambda: fdist.ring_attention(q, q, q, key_lengths=torch.tensor([9]))
    yield "param_grads", ValueError, "param_grads must be 'sum' or 'local'", \
        lambda: fdist.ring_attention(q, q, q, param_grads="mean")
    yield "a bad table (the op's check)", ValueError, "rel_bias", \
        lambda: fdist.ring_attention(q, q, q, rel_bias=torch.zeros(3, 5))
    yield "module with a cache", NotImplementedError, "does not implement cache", \
        lambda: fastattn.nn.MultiheadAttention(16, 2, context_parallel_group=torch.distributed.group.WORLD)(
            torch.randn(1, 4, 16), cache={})


def _module_case(rank, world, layout, failures):
    """MultiheadAttention with context_parallel_group against the same module on the whole
    sequence: output shards, and parameter gradients summed over the ranks (as DDP would
    reduce them over the context-parallel group)."""
    import torch.distributed as dist
    kw = dict(n_kv_head=2, causal=True, rotary="rope", rel_bias_max_dist=5, alibi=True,
              learnable_temperature=True, dtype=torch.float64)
    torch.manual_seed(3)
    whole = fastattn.nn.MultiheadAttention(16, 4, **kw)
    sharded = fastattn.nn.MultiheadAttention(16, 4, context_parallel_group=dist.group.WORLD,
                                             context_parallel_layout=layout, **kw)
    sharded.load_state_dict(whole.state_dict())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8 * world, 16, generator=g, dtype=torch.float64)
    w = torch.randn(2, 8 * world, 16, generator=g, dtype=torch.float64)
    shard = lambda t: fdist.shard_sequence(t, world, rank, layout, dim=1)  # noqa: E731
    want = whole(x)
    (want * w).sum().backward()
    got = sharded(shard(x))
    (got * shard(w)).sum().backward()
    try:
        torch.testing.assert_close(got, shard(want), rtol=2e-6, atol=2e-6)
    except AssertionError as e:
        failures.append(f"module {layout} out: {e}")
    for (name, pw), ps in zip(whole.named_parameters(), sharded.parameters()):
        grad = ps.grad.clone()
        dist.all_reduce(grad)
        try:
            torch.testing.assert_close(grad, pw.grad, rtol=2e-6, atol=2e-6)
        except AssertionError as e:
            failures.append(f"module {layout} grad {name}: {e}")


def _errors_worker(rank, world, init_method, out_dir):
    _init(rank, world, init_method)
    failures = []
    try:
        for label, exc, pattern, call in _bad_input_cases(rank):
            try:
                call()
                failures.append(f"{label}: no error")
            except exc as e:
                import re
                if not re.search(pattern, str(e)):
                    failures.append(f"{label}: message {str(e)!r} lacks {pattern!r}")
            except Exception as e:  # noqa: BLE001
                failures.append(f"{label}: {type(e).__name__} instead of {exc.__name__}: {e}")
        for layout in fdist.LAYOUTS:
            _module_case(rank, world, layout, failures)
    finally:
        _shutdown()
    (out_dir / f"rank{rank}.txt").write_text("\n".join(failures))


@needs_gloo
def test_bad_input_raises_on_every_rank_and_the_module_path(tmp_path):
    _spawn(_errors_worker, 2, tmp_path, tmp_path)
    failures = [line for r in range(2) for line in (tmp_path / f"rank{r}.txt").read_text().splitlines()]
    assert not failures, "\n".join(failures[:20])


# ------------------------------------------------------------------------------ a failing rank
FAIL_TIMEOUT_S = 4


def _failing_rank_worker(rank, world, init_method, out_dir, mode):
    """Rank 1 fails before it sends anything (mode "raise": its process then ends; "stall": it
    stays alive and silent). Rank 0 must raise within the process group's timeout."""
    _init(rank, world, init_method, timeout_s=FAIL_TIMEOUT_S)
    q = torch.randn(1, 2, 8, 8)
    if rank == 1:
        def fail(*args, **kwargs):
            raise RuntimeError("injected failure before the first send")
        fdist._post = fail
        try:
            fdist.ring_attention(q, q, q, causal=False)
        except RuntimeError:
            pass
        if mode == "stall":
            deadline = time.monotonic() + 3 * FAIL_TIMEOUT_S + 10
            while not (out_dir / "rank0.txt").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        os._exit(0)  # no teardown: the group is broken on purpose
    start = time.monotonic()
    try:
        fdist.ring_attention(q, q, q, causal=False)
        result = "no error"
    except Exception as e:  # noqa: BLE001
        result = f"{type(e).__name__} after {time.monotonic() - start:.1f} s"
    (out_dir / "rank0.txt").write_text(result)
    os._exit(0)


@needs_gloo
@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_a_failing_rank_makes_the_others_raise_within_the_timeout(tmp_path, mode):
    _spawn(_failing_rank_worker, 2, tmp_path, tmp_path, mode, join_timeout=60)
    result = (tmp_path / "rank0.txt").read_text()
    assert result != "no error"
    kind, _, rest = result.partition(" after ")
    assert kind == "RuntimeError", result
    assert float(rest.split()[0]) < FAIL_TIMEOUT_S + 5, result
