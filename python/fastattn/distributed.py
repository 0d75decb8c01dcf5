"""Context parallelism: ring attention over torch.distributed.

`ring_attention` computes `fastattn.attention` over a sequence split across the ranks of a
process group: each rank holds a shard of q, k and v (along the sequence dim) and gets its
shard of the output. K/V shards travel around the ring (rank r sends to r + 1) with
point-to-point messages posted before each step's kernel, so the transfer overlaps the compute;
partial results are merged by their log-sum-exp. Each kernel call gets its shards' global
positions (q_offset, k_offset), so tables, ALiBi, windows, spans, global tokens, causality and
the dropout mask see the whole sequence. The design is in docs/ARCHITECTURE.md ("Ring attention
(context parallelism)").

Layouts (`layout=`):
  - "contiguous": rank r holds tokens [r * n, (r + 1) * n), n = S / world.
  - "zigzag": the sequence is cut into 2 * world chunks of c = S / (2 * world); rank r holds
    chunks r and 2 * world - 1 - r (in that order), which balances causal work across ranks.

`shard_indices`, `shard_sequence` and `unshard_sequence` split and rebuild a full sequence in
either layout; `merge_partials` is the log-sum-exp merge of two partial attention results.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import functional
from .functional import _fail

__all__ = ["ring_attention", "shard_indices", "shard_sequence", "unshard_sequence", "merge_partials",
           "LAYOUTS"]

LAYOUTS = ("contiguous", "zigzag")
_NO_BOUND = 1 << 62


# ---------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------
def _check_layout(layout) -> str:
    if layout not in LAYOUTS:
        _fail(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def layout_pieces(seq_len: int, world: int, rank: int, layout: str) -> List[Tuple[int, int]]:
    """The (start, length) runs of global token indices that rank `rank` holds, in the order its
    shard stores them. `seq_len` is the whole sequence's length."""
    _check_layout(layout)
    parts = world if layout == "contiguous" else 2 * world
    if seq_len % parts != 0:
        _fail(f"the sequence length must be divisible by {parts} for layout={layout!r} with "
              f"world size {world}, got {seq_len}")
    n = seq_len // parts
    if layout == "contiguous":
        return [(rank * n, n)]
    return [(rank * n, n), ((2 * world - 1 - rank) * n, n)]


def shard_indices(seq_len: int, world: int, rank: int, layout: str = "contiguous",
                  device=None) -> Tensor:
    """The global token indices (int64, in shard order) of rank `rank`'s shard: e.g. the
    rotary positions of its tokens."""
    return torch.cat([torch.arange(s, s + n, dtype=torch.int64, device=device)
                      for s, n in layout_pieces(seq_len, world, rank, layout)])


def shard_sequence(x: Tensor, world: int, rank: int, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """Rank `rank`'s shard of the full sequence `x` (sequence along `dim`)."""
    return torch.cat([x.narrow(dim, s, n) for s, n in layout_pieces(x.shape[dim], world, rank, layout)], dim)


def unshard_sequence(shards: Sequence[Tensor], layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The full sequence from every rank's shard (in rank order): the inverse of shard_sequence."""
    world = len(shards)
    n_local = shards[0].shape[dim]
    pieces = []
    for r, t in enumerate(shards):
        runs = layout_pieces(n_local * world, world, r, layout)
        pieces += [(start, t.narrow(dim, at, n)) for (start, _), (at, n) in zip(runs, _local_runs(runs))]
    return torch.cat([p for _, p in sorted(pieces, key=lambda sp: sp[0])], dim)


# ---------------------------------------------------------------------------------------------
# the log-sum-exp merge
# ---------------------------------------------------------------------------------------------
def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Merges two partial attention results over disjoint key sets: out (..., S, Dv), lse
    (..., S). lse = log(exp(lse_a) + exp(lse_b)); out is the lse-weighted mean. A row with no
    visible key on one side (lse -inf, out 0) takes the other side as is; on both sides it stays
    out 0, lse -inf. Computed in out_a's dtype (the ring accumulates in float32 / float64)."""
    lse = torch.logaddexp(lse_a, lse_b)
    # exp(-inf - -inf) would be NaN: such rows weigh both sides 0.
    ref = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a - ref).to(out_a.dtype).unsqueeze(-1)
    wb = torch.exp(lse_b - ref).to(out_a.dtype).unsqueeze(-1)
    return out_a * wa + out_b.to(out_a.dtype) * wb, lse


# ---------------------------------------------------------------------------------------------
# the call's plan: every rank computes the same one
# ---------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    world: int
    rank: int
    ranks: List[int]                       # the group's global ranks, in group order
    group: object
    q_pieces: List[List[Tuple[int, int]]]  # per rank: (global start, length) of its queries
    k_pieces: List[List[Tuple[int, int]]]  # per rank: the same for its keys
    shift: int                             # query index i stands at position shift + i
    scale: Optional[float]
    causal: bool
    left: int
    right: int
    span_ramp: float
    num_global: int
    softcap: float
    dropout_p: float
    seed: Optional[Tensor]
    key_lengths: Optional[Tensor]          # (B,) int64, in global key indices
    key_limit: Optional[int]               # max(key_lengths): no key at or past it is seen
    span_reach: Optional[float]            # max(span) + span_ramp: no |d| beyond it is seen
    param_grads: str = "sum"               # "sum": the whole group's; "local": this rank's share
    needed: List[List[bool]] = None        # needed[r][s]: rank r's queries see rank s's keys
    # hops[c][s]: how many ranks chain c carries shard s to (_CHAINS: chain 0 to s + 1, s + 2,
    # ...; chain 1 to s - 1, s - 2, ...); steps: the ring steps after the first, max of hops
    hops: List[List[int]] = None
    steps: int = 0

    def visible(self, qp: Tuple[int, int], kp: Tuple[int, int]) -> bool:
        """Whether some (query, key) pair of the two runs may be visible: False only when a
        rule hides every pair (the step is then skipped)."""
        (qs, nq), (ks, nk) = qp, kp
        if nq == 0 or nk == 0:
            return False
        q_lo, q_hi = self.shift + qs, self.shift + qs + nq - 1
        k_lo, k_hi = ks, ks + nk - 1
        d_min, d_max = q_lo - k_hi, q_hi - k_lo
        if self.causal and d_max < 0:
            return False
        if self.key_limit is not None and ks >= self.key_limit:
            return False
        if self.num_global > 0 and (k_lo < self.num_global or q_lo < self.num_global):
            return True  # global pairs ignore the window and the span
        if 0 <= self.left < d_min or (self.right >= 0 and d_max < -self.right):
            return False
        if self.span_reach is not None:
            nearest = 0 if d_min <= 0 <= d_max else min(abs(d_min), abs(d_max))
            if nearest > self.span_reach:
                return False
        return True

    def schedule(self) -> None:
        w = self.world
        self.needed = [[any(self.visible(qp, kp) for qp in self.q_pieces[r] for kp in self.k_pieces[s])
                        for s in range(w)] for r in range(w)]
        split = [_split_hops([h for h in range(1, w) if self.needed[(s + h) % w][s]], w) for s in range(w)]
        self.hops = [[f for f, _ in split], [b for _, b in split]]
        self.steps = max(self.hops[0] + self.hops[1] + [0])

    def held(self, c: int, step: int) -> int:
        """The shard this rank holds on chain c at `step` (its own at step 0)."""
        return (self.rank - _CHAINS[c] * step) % self.world

    def peer(self, c: int, toward: bool) -> int:
        """The next rank along chain c (toward=True), or the one before."""
        return (self.rank + (_CHAINS[c] if toward else -_CHAINS[c])) % self.world

    def pieces_of(self, x: Tensor, pieces: List[Tuple[int, int]]) -> List[Tensor]:
        """x's runs (views along dim 2, the sequence dim of q, k, v, out and lse)."""
        return [x.narrow(2, at, n) for at, n in _local_runs(pieces)]

    def op_args(self, q: Tensor, k: Tensor, v: Tensor, qp, kp, t: dict) -> list:
        """The attention op's 20 arguments for queries `qp` against keys `kp`."""
        B = q.shape[0]
        kl = None
        if self.key_lengths is not None:  # global lengths, read against this run's keys
            kl = (self.key_lengths - kp[0]).clamp(0, kp[1])
        q_off = torch.full((B,), self.shift + qp[0], dtype=torch.int64, device=q.device)
        k_off = torch.full((B,), kp[0], dtype=torch.int64, device=q.device)
        return [q, k, v, self.scale, t["scale"], self.causal, self.left, self.right, t["rel_bias"],
                t["alibi_slopes"], t["span"], self.span_ramp, self.num_global, kl, self.softcap,
                self.dropout_p, self.seed, q_off, k_off, None]


# The two directions a shard can travel in: chain 0 passes it to the next rank, chain 1 to the
# one before. A shard goes one way unless the other saves messages (a two-sided window).
_CHAINS = (1, -1)


def _split_hops(hops: List[int], world: int) -> Tuple[int, int]:
    """(F, B): chain 0 carries a shard to the F ranks after its own, chain 1 to the B ranks
    before, so that every rank that needs it (`hops`, ascending: h for the rank h after,
    1 <= h < world) gets it with the fewest messages (F + B), on chain 0 alone when that is as
    few (one chain holds less memory than two)."""
    best = None
    for f in [0] + hops:
        rest = [h for h in hops if h > f]  # what chain 1 must reach: back to the nearest of them
        b = world - rest[0] if rest else 0
        key = (f + b, b)
        if best is None or key < best[0]:
            best = (key, f, b)
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------
# point-to-point
# ---------------------------------------------------------------------------------------------
_STATS: Optional[dict] = None


class ring_stats:
    """Context manager that times the ring (for benchmarks): `wait_s`, the time spent waiting
    for messages after the step's compute; `compute_s`, the kernels' time; `steps`."""

    def __enter__(self) -> dict:
        global _STATS
        _STATS = {"wait_s": 0.0, "compute_s": 0.0, "steps": 0, "bytes_sent": 0}
        return _STATS

    def __exit__(self, *exc) -> None:
        global _STATS
        _STATS = None


def _post(plan: _Plan, sends: list, recvs: list) -> list:
    """Posts (tensor, group rank) sends and receives as one batch; returns the works. Every
    pair of ranks posts its messages in the same order on both sides (the matching rule of
    backends without tags, NCCL)."""
    import torch.distributed as dist
    ops = [dist.P2POp(dist.isend, t, plan.ranks[peer], plan.group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, plan.ranks[peer], plan.group) for t, peer in recvs]
    if _STATS is not None:
        _STATS["bytes_sent"] += sum(t.numel() * t.element_size() for t, _ in sends)
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: list) -> None:
    start = time.perf_counter()
    for w in works:
        w.wait()
    if _STATS is not None:
        _STATS["wait_s"] += time.perf_counter() - start


class _Timed:
    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if _STATS is not None:
            _STATS["compute_s"] += time.perf_counter() - self.start


def _pass_shards(plan: _Plan, step: int, held: list, k: Tensor, v: Tensor) -> Tuple[list, list]:
    """Posts the step's K/V messages on each chain: the held shard (k and v, two messages: no
    packed copy) on to the chain's next rank while a later rank of the chain needs it, and the
    receive of the shard held at the next step. The receive mirrors the sender's decision
    (every rank has the same schedule), so the last step sends nothing. Returns the works and
    the arriving (k, v) per chain (None where nothing arrives)."""
    sends, recvs, arriving = [], [], [None, None]
    for c in range(len(_CHAINS)):
        if step < plan.hops[c][plan.held(c, step)]:
            sends += [(held[c][0], plan.peer(c, True)), (held[c][1], plan.peer(c, True))]
        if step < plan.hops[c][plan.held(c, step + 1)]:
            arriving[c] = (torch.empty_like(k), torch.empty_like(v))
            recvs += [(arriving[c][0], plan.peer(c, False)), (arriving[c][1], plan.peer(c, False))]
    return _post(plan, sends, recvs), arriving


def _unpack(flat: Tensor, *likes: Tensor) -> List[Tensor]:
    out, at = [], 0
    for t in likes:
        out.append(flat.narrow(0, at, t.numel()).view(t.shape))
        at += t.numel()
    return out


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _recomputes_lse(q: Tensor) -> bool:
    # The CPU backward kernel in float64 recomputes each row's lse from the keys of its call
    # (the float32 lse it is given would cost float64 accuracy) instead of reading the passed
    # one: for a K/V shard that is the shard's own lse, not the merged one (see _backward_step).
    return q.dtype == torch.float64 and q.device.type == "cpu"


def _forward_step(plan: _Plan, s: int, kv: Tensor, k: Tensor, v: Tensor, q_parts: list, parts: list,
                  t: dict, step_lse: Optional[dict]) -> None:
    """This rank's queries against the K/V shard of rank s: one kernel call per visible pair of
    runs, each merged into that query run's partial (out, lse). `step_lse`, when given, keeps
    each call's own lse by (query run, shard, key run)."""
    k_s, v_s = kv
    k_parts, v_parts = plan.pieces_of(k_s, plan.k_pieces[s]), plan.pieces_of(v_s, plan.k_pieces[s])
    for i, (qp, q_i) in enumerate(zip(plan.q_pieces[plan.rank], q_parts)):
        for j, (kp, k_j, v_j) in enumerate(zip(plan.k_pieces[s], k_parts, v_parts)):
            if not plan.visible(qp, kp):
                continue
            o, l = torch.ops.fastattn.attention(*plan.op_args(q_i, k_j, v_j, qp, kp, t))
            if step_lse is not None:
                step_lse[i, s, j] = l
            if parts[i] is None:
                parts[i] = (o.to(_acc_dtype(q_i)), l)
            else:
                parts[i] = merge_partials(*parts[i], o, l)


def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor, t: dict) -> Tuple[Tensor, Tensor, Optional[dict]]:
    me = plan.rank
    q_parts = plan.pieces_of(q, plan.q_pieces[me])
    parts = [None] * len(q_parts)
    step_lse = {} if _recomputes_lse(q) else None
    held = [(k, v), (k, v)]  # the shard held on each chain
    for step in range(plan.steps + 1):
        works, arriving = _pass_shards(plan, step, held, k, v)
        for c in range(len(_CHAINS)) if step > 0 else (0,):  # (step 0: the own shard, once)
            s = plan.held(c, step)
            if (step == 0 or step <= plan.hops[c][s]) and plan.needed[me][s]:
                with _Timed():
                    _forward_step(plan, s, held[c], k, v, q_parts, parts, t, step_lse)
        _wait(works)
        if _STATS is not None:
            _STATS["steps"] += 1
        held = arriving
    outs, lses = [], []
    for q_i, part in zip(q_parts, parts):
        if part is None:  # no visible key for the whole run: out 0, lse -inf
            shape = q_i.shape[:3]
            part = (q_i.new_zeros((*shape, v.shape[-1])),
                    torch.full(shape, -math.inf, dtype=torch.float32, device=q.device))
        outs.append(part[0].to(q.dtype))
        lses.append(part[1])
    return torch.cat(outs, 2), torch.cat(lses, 2), step_lse


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
@dataclass
class _Grads:
    """This rank's running sums of the step gradients (float64 for the parameters)."""
    dq: Tensor
    need_table: bool
    need_span: bool
    table: Optional[Tensor] = None
    span: Optional[Tensor] = None

    def add(self, name: str, g: Tensor) -> None:
        g = g.to(torch.float64)
        setattr(self, name, g if getattr(self, name) is None else getattr(self, name) + g)


def _rescaled(go: Tensor, glse: Optional[Tensor], lse: Tensor, lse_call: Tensor):
    both = torch.isfinite(lse) & torch.isfinite(lse_call)
    factor = torch.where(both, torch.exp(lse_call.double() - lse.double()), torch.ones_like(lse, dtype=torch.float64))
    return go * factor.unsqueeze(-1).to(go.dtype), None if glse is None else glse * factor.to(glse.dtype)


def _backward_step(plan: _Plan, s: int, kv: Tensor, k: Tensor, v: Tensor, rows: list, grads: _Grads,
                   t: dict, step_lse: Optional[dict]) -> Tensor:
    """The gradients of the K/V shard of rank s from this rank's queries (flat, dk then dv, in
    the accumulation dtype); adds the queries' and the parameters' shares to `grads`. Each call
    gets the merged out and lse of its query rows, so its dq, dk, dv are exact partials."""
    k_s, v_s = kv
    flat = torch.zeros(k.numel() + v.numel(), dtype=_acc_dtype(k), device=k.device)
    dk, dv = _unpack(flat, k, v)
    kps = plan.k_pieces[s]
    k_parts, v_parts = plan.pieces_of(k_s, kps), plan.pieces_of(v_s, kps)
    dk_parts, dv_parts = plan.pieces_of(dk, kps), plan.pieces_of(dv, kps)
    dq_parts = plan.pieces_of(grads.dq, plan.q_pieces[plan.rank])
    for i, (qp, dq_i, (q_i, go_i, o_i, lse_i, glse_i)) in enumerate(zip(plan.q_pieces[plan.rank], dq_parts, rows)):
        for j, (kp, k_j, v_j, dk_j, dv_j) in enumerate(zip(kps, k_parts, v_parts, dk_parts, dv_parts)):
            if not plan.visible(qp, kp):
                continue
            if step_lse is not None:
                # The kernel weighs row i by exp(s - lse_call) instead of exp(s - lse): dS, dV
                # and the parameter sums scale by exp(lse - lse_call) per row, so dO and
                # grad_lse (D's two terms) come in divided by it.
                go_i, glse_i = _rescaled(rows[i][1], rows[i][4], lse_i, step_lse[i, s, j])
            g = torch.ops.fastattn.attention_backward(
                go_i, o_i, lse_i, glse_i, grads.need_table, grads.need_span, False,
                *plan.op_args(q_i, k_j, v_j, qp, kp, t))
            dq_i += g[0]
            dk_j += g[1]
            dv_j += g[2]
            if grads.need_table:
                grads.add("table", g[3])
            if grads.need_span:
                grads.add("span", g[4])
    return flat


def _backward_ring(plan: _Plan, q, k, v, rows: list, grads: _Grads, t: dict, step_lse: Optional[dict]) -> Tensor:
    """Runs the backward around the ring; returns this rank's own (dk, dv), flat. The K/V shards
    travel as in the forward; each shard's gradient accumulator travels with it along each
    chain (a holder adds its share, then passes it on) and, after the chain's last rank, goes
    straight home to the shard's rank: one message per chain. The own share starts the first
    chain's accumulator (kept at home when no chain leaves)."""
    me = plan.rank
    acc = _acc_dtype(k)
    flat = k.numel() + v.numel()
    zeros = lambda: torch.zeros(flat, dtype=acc, device=k.device)  # noqa: E731
    chains = range(len(_CHAINS))
    first = next((c for c in chains if plan.hops[c][me] > 0), None)  # the chain that takes the own share
    held, dkv_in, home = [(k, v), (k, v)], [None, None], [None, None]
    own, dkv_works = None, []
    for step in range(plan.steps + 1):
        kv_works, arriving = _pass_shards(plan, step, held, k, v)
        parts = [None, None]
        for c in chains if step > 0 else ():
            s = plan.held(c, step)
            if step <= plan.hops[c][s] and plan.needed[me][s]:
                with _Timed():
                    parts[c] = _backward_step(plan, s, held[c], k, v, rows, grads, t, step_lse)
        if step == 0 and plan.needed[me][me]:
            with _Timed():
                own = _backward_step(plan, me, (k, v), k, v, rows, grads, t, step_lse)
        _wait(dkv_works)  # the accumulators of the held shards from their previous holders
        sends, recvs = [], []
        for c in chains:
            s = plan.held(c, step)
            if step == 0:  # the own shard's accumulator starts here
                dkv = None if plan.hops[c][me] == 0 else (own if c == first and own is not None else zeros())
            elif step <= plan.hops[c][s]:
                dkv = dkv_in[c] if parts[c] is None else dkv_in[c].add_(parts[c])
            else:
                dkv = None
            if dkv is not None:  # on to the chain's next rank, or home after its last
                sends.append((dkv, plan.peer(c, True) if step < plan.hops[c][s] else s))
            dkv_in[c] = None
            if step < plan.hops[c][plan.held(c, step + 1)]:
                dkv_in[c] = torch.empty(flat, dtype=acc, device=k.device)
                recvs.append((dkv_in[c], plan.peer(c, False)))
            if step > 0 and step == plan.hops[c][me]:  # the own shard's accumulator, from its last holder
                home[c] = torch.empty(flat, dtype=acc, device=k.device)
                recvs.append((home[c], (me + _CHAINS[c] * step) % plan.world))
        dkv_works = _post(plan, sends, recvs)
        _wait(kv_works)
        if _STATS is not None:
            _STATS["steps"] += 1
        held = arriving
    _wait(dkv_works)
    total = own if first is None else None
    for c in chains:
        if home[c] is not None:
            total = home[c] if total is None else total.add_(home[c])
    return zeros() if total is None else total


def _ordered_sum(x: Tensor, dim: int = 0) -> Tensor:
    """A sum along `dim` added in index order (a scan is sequential): bitwise reproducible
    whatever the thread count."""
    if x.shape[dim] == 0:
        return x.sum(dim)
    return x.cumsum(dim).select(dim, x.shape[dim] - 1)


def _rank_ordered_total(plan: _Plan, local: Tensor) -> Tensor:
    """The sum over the group of every rank's `local` (float64), gathered and added in rank
    order: the same bits on every rank, and from run to run for a given world size."""
    import torch.distributed as dist
    parts = [torch.empty_like(local) for _ in range(plan.world)]
    dist.all_gather(parts, local, group=plan.group)
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _distance_table(plan: _Plan, table: Optional[Tensor], slopes: Tensor, hq: int, sq: int, sk: int):
    """For learned ALiBi slopes (as csrc/common/autograd.cpp): a table of one row per distance
    of the whole sequence (d in [1 - M, M - 1], nothing clamps) holding the call's own table
    values (zero without one). Its gradient is the sum of dS per distance. Returns (table,
    reach M)."""
    d_min, d_max = plan.shift - (sk - 1), plan.shift + sq - 1
    reach = max(abs(d_min), abs(d_max), 0) + 1
    rows = 2 * reach - 1
    if table is None:
        return torch.zeros((rows, hq), dtype=slopes.dtype, device=slopes.device), reach
    user_reach = (table.shape[0] + 1) // 2
    idx = (torch.arange(rows, device=table.device) - (reach - 1)).clamp(1 - user_reach, user_reach - 1)
    dtype = torch.promote_types(table.dtype, slopes.dtype)
    return table.detach().index_select(0, idx + user_reach - 1).to(dtype), reach


def _fold_table_grad(grad: Tensor, reach: int, table: Tensor) -> Tensor:
    """The call's table gradient from the per-distance one: each row sums the distances that
    clamp to it, in distance order (fold_table_grad in csrc/common/autograd.cpp)."""
    out = torch.zeros(table.shape, dtype=torch.float64, device=grad.device)
    user_reach = (table.shape[0] + 1) // 2
    d = torch.arange(grad.shape[0], device=grad.device) - (reach - 1)
    row = d.clamp(1 - user_reach, user_reach - 1) + user_reach - 1
    first, last = int(row[0]), int(row[-1])
    lo = row == first
    out[first] = _ordered_sum(grad[lo], 0)
    if last != first:
        hi = row == last
        out[last] = _ordered_sum(grad[hi], 0)
        inner = ~(lo | hi)
        out[row[inner]] = grad[inner]
    return out.to(table.dtype)


def _parameter_grads(plan: _Plan, grads: _Grads, q: Tensor, t: dict, need: dict, reach: int) -> dict:
    """The scale, table, ALiBi-slope and span gradients of the whole call: this rank's shares,
    gathered and summed in rank order (one all_gather of one flat float64 vector)."""
    pieces = []
    if grads.need_table:
        pieces.append(grads.table if grads.table is not None else torch.zeros(t["bwd_table"].shape, dtype=torch.float64, device=q.device))
    if grads.need_span:
        pieces.append(grads.span if grads.span is not None else torch.zeros(t["span"].shape, dtype=torch.float64, device=q.device))
    if need["scale"]:  # d/ds of cap(s * q.k) summed over pairs = sum(q * dq) / s
        pieces.append(_ordered_sum((q.to(torch.float64) * grads.dq.to(torch.float64)).reshape(-1)).reshape(1))
    if not pieces:
        return {}
    local = torch.cat([p.reshape(-1) for p in pieces])
    total = _rank_ordered_total(plan, local) if plan.param_grads == "sum" else local
    out, at = {}, 0
    if grads.need_table:
        g = total.narrow(0, at, t["bwd_table"].numel()).view(t["bwd_table"].shape)
        at += g.numel()
        if need["alibi_slopes"]:
            d = (torch.arange(g.shape[0], device=g.device, dtype=torch.float64) - (reach - 1)).abs()
            out["alibi_slopes"] = _ordered_sum(g * -d.unsqueeze(1), 0).to(t["alibi_slopes"].dtype)
            if need["rel_bias"]:
                out["rel_bias"] = _fold_table_grad(g, reach, t["rel_bias"])
        else:
            out["rel_bias"] = g.to(t["rel_bias"].dtype)
    if grads.need_span:
        out["span"] = total.narrow(0, at, t["span"].numel()).view(t["span"].shape).to(t["span"].dtype)
        at += t["span"].numel()
    if need["scale"]:
        s = t["scale"]
        out["scale"] = (total[at] / s.to(torch.float64)).to(s.dtype).reshape(s.shape)
    return out


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------
class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, q, k, v, scale, rel_bias, alibi_slopes, span):
        t = dict(scale=scale, rel_bias=rel_bias, alibi_slopes=alibi_slopes, span=span)
        out, lse, ctx.step_lse = _forward(plan, q, k, v, t)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, scale, rel_bias, alibi_slopes, span)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        plan: _Plan = ctx.plan
        q, k, v, out, lse, scale, rel_bias, alibi_slopes, span = ctx.saved_tensors
        names = ("q", "k", "v", "scale", "rel_bias", "alibi_slopes", "span")
        need = dict(zip(names, ctx.needs_input_grad[1:]))
        t = dict(scale=scale, rel_bias=rel_bias, alibi_slopes=alibi_slopes, span=span)
        reach = 0
        t["bwd_table"] = rel_bias
        if need["alibi_slopes"]:
            t["bwd_table"], reach = _distance_table(plan, rel_bias, alibi_slopes, q.shape[1],
                                                    q.shape[2] * plan.world, k.shape[2] * plan.world)
        tk = dict(t, rel_bias=t["bwd_table"])  # the kernels' table: the same logits either way
        grads = _Grads(dq=torch.zeros(q.shape, dtype=_acc_dtype(q), device=q.device),
                       need_table=need["rel_bias"] or need["alibi_slopes"], need_span=need["span"])
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        me = plan.rank
        runs = plan.q_pieces[me]
        glse_rows = [None] * len(runs) if grad_lse is None else plan.pieces_of(grad_lse, runs)
        rows = list(zip(*(plan.pieces_of(x, runs) for x in (q, grad_out, out, lse)), glse_rows))
        dkv = _backward_ring(plan, q, k, v, rows, grads, tk, ctx.step_lse)
        dk, dv = _unpack(dkv, k, v)
        params = _parameter_grads(plan, grads, q, t, need, reach)
        return (None, grads.dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), params.get("scale"),
                params.get("rel_bias"), params.get("alibi_slopes"), params.get("span"))


def _local_runs(pieces) -> List[Tuple[int, int]]:
    """(local start, length) of each run of a shard."""
    out, at = [], 0
    for _, n in pieces:
        out.append((at, n))
        at += n
    return out


# ---------------------------------------------------------------------------------------------
# the public function
# ---------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_same_on_every_rank(group, world: int, q: Tensor, k: Tensor, v: Tensor, fields: dict) -> None:
    """One small all_gather of this rank's shapes and options: every rank raises the same
    ValueError, naming the argument, when the ranks disagree (instead of a hang or a garbled
    message in the ring)."""
    import torch.distributed as dist
    named = {"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape),
             "dtype": (_DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1,), **fields}
    mine = torch.tensor([x for val in named.values() for x in val], dtype=torch.int64, device=q.device)
    # A differing number of dims would give vectors of different lengths: pad to a fixed size.
    width = 64
    if mine.numel() > width:
        _fail(f"q, k and v must have 4 dimensions, got shapes {named['q']}, {named['k']}, {named['v']}")
    mine = torch.cat([mine, mine.new_full((width - mine.numel(),), -2)])
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    for r, other in enumerate(got):
        if torch.equal(other, got[0]):
            continue
        at = 0
        for name, val in named.items():
            n = len(val)
            a, b = got[0][at:at + n].tolist(), other[at:at + n].tolist()
            if a != b:
                what = "shape" if name in ("q", "k", "v") else "value"
                _fail(f"{name} must have the same {what} on every rank of the group (each rank holds a "
                      f"shard of one sequence), got {tuple(a)} on group rank 0 and {tuple(b)} on group rank {r}")
            at += n
        _fail(f"the shard shapes differ between group rank 0 and group rank {r}")


def _check_unsupported(attn_mask, q_offset, k_offset, alibi_slopes) -> None:
    if attn_mask is not None:
        raise NotImplementedError("fastattn: ring_attention does not implement attn_mask (a dense "
                                  "mask would have to be sharded along both sequence dims); got a tensor")
    for name, val in (("q_offset", q_offset), ("k_offset", k_offset)):
        if val is not None:
            raise NotImplementedError(f"fastattn: ring_attention sets {name} itself (the shards' global "
                                      f"positions: query i at (Sk - Sq) + i, key j at j); got {name}={val!r}")
    if (isinstance(alibi_slopes, Tensor) and alibi_slopes.dim() == 2 and alibi_slopes.requires_grad
            and torch.is_grad_enabled()):
        raise NotImplementedError("fastattn: ring_attention does not implement the gradient of per-batch "
                                  "alibi_slopes (B, Hq); use (Hq,) slopes to learn them, or detach them")


def _host_limits(key_lengths, span, span_ramp: float, sk_total: int):
    """The host values the step-skipping rule needs (one read each): the largest key length
    and the largest span."""
    key_limit = span_reach = None
    if key_lengths is not None:
        if not isinstance(key_lengths, Tensor) or key_lengths.dtype not in (torch.int32, torch.int64):
            _fail(f"key_lengths must be an int32 or int64 tensor, got "
                  f"{key_lengths.dtype if isinstance(key_lengths, Tensor) else type(key_lengths).__name__}",
                  TypeError)
        if key_lengths.numel() > 0:
            lo, hi = int(key_lengths.min()), int(key_lengths.max())
            if lo < 0 or hi > sk_total:
                _fail(f"key_lengths must lie in [0, {sk_total}] (the whole sequence's keys), got values "
                      f"in [{lo}, {hi}]")
            key_limit = hi
    if isinstance(span, Tensor) and span.numel() > 0:
        span_reach = float(span.detach().max()) + span_ramp
        if not math.isfinite(span_reach):
            span_reach = None  # (NaN or inf spans: no skipping; the kernels decide)
    return key_limit, span_reach


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    layout: str = "contiguous",
    scale: Union[float, Tensor, None] = None,
    causal: bool = False,
    window: Sequence[int] = (-1, -1),
    rel_bias: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    span: Optional[Tensor] = None,
    span_ramp: float = 32.0,
    num_global: int = 0,
    key_lengths: Optional[Tensor] = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    return_lse: bool = False,
    param_grads: str = "sum",
    q_offset=None,
    k_offset=None,
    attn_mask=None,
):
    """fastattn.attention over a sequence sharded across the ranks of `group` (ring attention).

    Args:
        q: (B, Hq, Sq_local, Dqk), k: (B, Hkv, Sk_local, Dqk), v: (B, Hkv, Sk_local, Dv): this
            rank's shards of the whole q, k, v (the same shapes on every rank), split along the
            sequence as `layout` says (see shard_sequence). The whole call has Sq = Sq_local *
            world queries and Sk = Sk_local * world keys, positioned as fastattn.attention's
            defaults: query i at Sk - Sq + i, key j at j.
        group: the process group of the sequence's shards (default: the world).
        layout: "contiguous" or "zigzag" (the module docstring); zigzag needs even local lengths.
        scale, causal, window, rel_bias, alibi_slopes, span, span_ramp, num_global, softcap,
            dropout_p, generator, return_lse: as fastattn.attention, on the whole sequence.
            Tensors (tables, slopes, span, a scale tensor) are the same on every rank; their
            gradients are the whole call's, summed over the ranks in rank order (the same bits
            on every rank).
        key_lengths: (B,) integer, in keys of the whole sequence (the same on every rank).
        param_grads: the gradients of rel_bias, alibi_slopes, span and a scale tensor:
            "sum" (default), the whole call's on every rank (every rank's share gathered and
            added in rank order: the same bits on every rank); "local", this rank's share only
            (the gradient through this rank's output), for training loops that reduce every
            parameter's gradient over the context-parallel ranks themselves (DDP or FSDP over a
            mesh that includes them), which would count a summed gradient world times.
        q_offset, k_offset, attn_mask: not implemented (NotImplementedError): the shards'
            positions are set here.
    Every rank of the group must make the call (and, with autograd, the backward) with the
    same options. Dropout draws its [seed, offset] from `generator` on every rank (advancing
    each rank's generator as an unsharded call would) and uses group rank 0's draw.
    Communication waits are bounded by the process group's timeout: a rank that fails makes
    the others raise once it expires.
    Returns: out (B, Hq, Sq_local, Dv), this rank's shard of the whole call's output; with
    return_lse also lse (B, Hq, Sq_local) float32.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        _fail("ring_attention needs an initialized torch.distributed process group "
              "(torch.distributed.init_process_group)", RuntimeError)
    _check_unsupported(attn_mask, q_offset, k_offset, alibi_slopes)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        functional._check_tensor(t, name, 4)
    for t, name in ((rel_bias, "rel_bias"), (alibi_slopes, "alibi_slopes"), (span, "span"),
                    (key_lengths, "key_lengths")):
        if t is not None and not isinstance(t, Tensor):
            _fail(f"{name} must be a torch.Tensor or None, got {type(t).__name__}", TypeError)
    layout = _check_layout(layout)
    if param_grads not in ("sum", "local"):
        _fail(f"param_grads must be 'sum' or 'local', got {param_grads!r}")
    left, right = functional._window(window)
    num_global = functional._int(num_global, "num_global", "an int")
    span_ramp = functional._real(span_ramp, "span_ramp", "a number")
    softcap = functional._real(softcap, "softcap", "a number")
    dropout_p = functional._dropout_p(dropout_p)
    scale_f, scale_t = (None, scale) if isinstance(scale, Tensor) or scale is None else (
        functional._real(scale, "scale", "a float, a 0-dim tensor or None"), None)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_same_on_every_rank(group, world, q, k, v, {
        "layout": (LAYOUTS.index(layout),), "causal": (int(bool(causal)),), "window": (left, right),
        "num_global": (num_global,), "dropout_p": (int(dropout_p * 2 ** 32),),
        "rel_bias": tuple(rel_bias.shape) if rel_bias is not None else (-1,),
        "alibi_slopes": tuple(alibi_slopes.shape) if alibi_slopes is not None else (-1,),
        "span": tuple(span.shape) if span is not None else (-1,)})
    if layout == "zigzag":
        for t, name in ((q, "q"), (k, "k")):
            if t.shape[2] % 2 != 0:
                _fail(f"layout='zigzag' needs an even local sequence length (two chunks per rank), "
                      f"got {name} with S_local = {t.shape[2]}")
    sq, sk = q.shape[2] * world, k.shape[2] * world
    key_limit, span_reach = _host_limits(key_lengths, span, span_ramp, sk)
    seed = functional.dropout_seed(dropout_p, generator, q)
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    if seed is not None and world > 1:
        dist.broadcast(seed, src=ranks[0], group=group)
    plan = _Plan(world=world, rank=rank, ranks=ranks, group=group,
                 q_pieces=[layout_pieces(sq, world, r, layout) for r in range(world)],
                 k_pieces=[layout_pieces(sk, world, r, layout) for r in range(world)],
                 shift=sk - sq, scale=scale_f, causal=bool(causal), left=left, right=right,
                 span_ramp=span_ramp, num_global=num_global, softcap=softcap, dropout_p=dropout_p,
                 seed=seed, key_lengths=None if key_lengths is None else key_lengths.long(),
                 key_limit=key_limit, span_reach=span_reach, param_grads=param_grads)
    plan.schedule()
    # k and v travel as they are: messages need contiguous tensors
    q, k, v = functional._last_dim_contiguous(q), k.contiguous(), v.contiguous()
    # The op's own checks (dtypes, shapes, tables, ranges) on an empty query run, before any
    # message is posted: a bad argument raises on every rank alike, not mid-ring.
    no_grad_t = dict(scale=scale_t, rel_bias=rel_bias, alibi_slopes=alibi_slopes, span=span)
    with torch.no_grad():
        torch.ops.fastattn.attention(*plan.op_args(q.narrow(2, 0, 0), k, v, (0, 0), (0, k.shape[2]), no_grad_t))
    out_dtype = q.dtype
    # As fastattn.attention: a learnable scale's gradient, sum(q * dq) / s, needs fp32 q and dq.
    if (scale_t is not None and scale_t.requires_grad and torch.is_grad_enabled()
            and out_dtype in (torch.float16, torch.bfloat16)):
        q, k, v = q.float(), k.float(), v.float()
    out, lse = _RingAttention.apply(plan, q, k, v, scale_t, rel_bias, alibi_slopes, span)
    out = out if out.dtype == out_dtype else out.to(out_dtype)
    return (out, lse) if return_lse else out
