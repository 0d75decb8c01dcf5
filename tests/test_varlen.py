"""fastattn.attention_varlen (packed sequences, FlashAttention's varlen layout) and the packing
functions unpad / pad: the packed call against one fastattn.attention call per sequence (bitwise),
against the padded batch with key_lengths and q_offset, against reference.attention_varlen and
against an independent block-diagonal formulation over the packed row written here from the
spec; every option, dropout, zero-length sequences and tile edges, prefill then decode,
gradcheck, bitwise reproducibility across runs and thread counts, bad input, torch.compile."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from fastattn.functional import dropout_seed
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter

from conftest import assert_close, assert_lse_close, per_sequence_calls, random_settings, seeded_sequence_calls

F32, F64 = torch.float32, torch.float64
HQ, HKV, D, DV = 4, 2, 8, 6

# (lengths of the queries, lengths of the keys) per sequence. "mixed": empty sequences (no
# queries; no keys, so its queries see nothing), one-token sequences, Sq < Sk and Sq == Sk;
# "tiles": lengths around the CPU kernel's 32-row tiles and 128-key blocks, Sq != Sk.
LENGTHS = {
    "mixed": ([3, 0, 17, 1, 4, 0], [5, 2, 17, 0, 40, 0]),
    "tiles": ([31, 129, 32, 1, 127], [33, 130, 128, 32, 127]),
}


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def _packed(lengths="mixed", Hq=HQ, Hkv=HKV, dtype=F64, seed=0, requires_grad=True):
    lq, lk = LENGTHS[lengths] if isinstance(lengths, str) else lengths
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), Hq, D, generator=g, dtype=dtype)
    k = torch.randn(sum(lk), Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(sum(lk), Hkv, DV, generator=g, dtype=dtype)
    q, k, v = (t.requires_grad_(requires_grad) for t in (q, k, v))
    return q, k, v, _cu(lq), _cu(lk), max(lq, default=0), max(lk, default=0)


# Named option sets; each covers some options, together every option of attention_varlen.
# Tensors are built per test (_options) so that leaves are fresh.
OPTIONS = {
    "plain": {},
    "causal-table": dict(causal=True, rel_bias=(9, "grad")),
    "alibi-window": dict(alibi="h", window=(5, 2)),
    "alibi-per-sequence": dict(alibi="s", causal=True),
    "span-global": dict(span="h", span_ramp=4.0, num_global=2, causal=True),
    "span-per-sequence-window": dict(span="s", span_ramp=3.0, window=(6, 6)),
    "softcap-scale": dict(softcap=5.0, scale="tensor", rel_bias=(3, "grad")),
    "global-window-table": dict(num_global=3, window=(2, 0), rel_bias=(5, "fixed"), causal=True),
}


def _options(name: str, n_seq: int, Hq=HQ, dtype=F64, seed=3) -> dict:
    return _build_options(OPTIONS[name], n_seq, Hq, dtype, seed)


def _build_options(spec: dict, n_seq: int, Hq=HQ, dtype=F64, seed=3) -> dict:
    """The options of an OPTIONS-style spec, with fresh tensors: ("rows", "grad"|"fixed")
    tables, "h" / "s" (per head / per sequence) ALiBi slopes and spans, a "tensor" scale."""
    g = torch.Generator().manual_seed(seed)
    o = dict(spec)
    if "rel_bias" in o:
        rows, grad = o.pop("rel_bias")
        o["rel_bias"] = (0.5 * torch.randn(2 * rows - 1, Hq, generator=g, dtype=dtype)).requires_grad_(grad == "grad")
    if "alibi" in o:
        shape = (Hq,) if o.pop("alibi") == "h" else (n_seq, Hq)
        o["alibi_slopes"] = (0.05 + 0.3 * torch.rand(shape, generator=g, dtype=dtype)).requires_grad_()
    if "span" in o:
        shape = (Hq,) if o.pop("span") == "h" else (n_seq, Hq)
        # values off the integer kinks of clamp((R + span - |d|) / R, 0, 1)
        o["span"] = (2.3 + 9 * torch.rand(shape, generator=g, dtype=dtype)).requires_grad_()
    if o.get("scale") == "tensor":
        o["scale"] = torch.tensor(0.41, dtype=dtype, requires_grad=True)
    return o


def _leaves(q, k, v, options) -> list:
    return [q, k, v] + [t for t in options.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def _cotangents(out, lse, seed=5):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=F64).to(out.device, out.dtype)
    return go, torch.randn(lse.shape, generator=g, dtype=F64).to(lse.device)


def _grads(out, lse, leaves, seed=5):
    """Gradients of sum(out * g) + sum(finite lse * h) with fixed random g, h."""
    go, gl = _cotangents(out, lse, seed)
    loss = (out.double() * go.double()).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * gl).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


# ---------------------------------------------------------------------------------------------
# the packed call against its peers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("name", list(OPTIONS))
def test_equals_one_call_per_sequence_bitwise(name, lengths):
    """The same kernel on the same views: outputs, lse and q/k/v gradients are bitwise those of
    per-sequence fastattn.attention calls; a shared parameter's gradient is the sum of the
    sequences' gradients, added last sequence first (autograd's order)."""
    q, k, v, cu_q, cu_k, mq, mk = _packed(lengths, dtype=F32)
    o = _options(name, len(cu_q) - 1, dtype=F32)
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, **o)
    assert out.shape == (q.shape[0], HQ, DV) and out.dtype == F32
    assert lse.shape == (HQ, q.shape[0]) and lse.dtype == F32
    assert out.abs().sum() > 0  # (a real output: some rows see keys)
    want, want_lse = per_sequence_calls(q, k, v, cu_q, cu_k, o)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    leaves = _leaves(q, k, v, o)
    got = _grads(out, lse, leaves)
    for a, b in zip(got, _grads(want, want_lse, leaves)):
        assert torch.equal(a, b)
    if len(leaves) == 3:
        return
    # each sequence alone, with its rows of the same cotangents
    go, gl = _cotangents(out, lse)
    bq, bk, parts = cu_q.tolist(), cu_k.tolist(), []
    for s in range(len(bq) - 1):
        rows, keys = slice(bq[s], bq[s + 1]), slice(bk[s], bk[s + 1])
        cu_one = [_cu([b[s + 1] - b[s]]) for b in (bq, bk)]
        kw = {n: (t[s:s + 1] if n in ("alibi_slopes", "span") and t.dim() == 2 else t) for n, t in o.items()}
        os_, ls = fastattn.attention_varlen(q[rows], k[keys], v[keys], *cu_one, mq, mk, return_lse=True, **kw)
        loss = (os_.double() * go[rows].double()).sum() + (torch.where(torch.isfinite(ls), ls, 0).double()
                                                           * gl[:, rows]).sum()
        parts.append(torch.autograd.grad(loss, leaves[3:], allow_unused=True))
    for i, packed in enumerate(got[3:]):
        total = None
        for part in reversed(parts):
            if part[i] is not None:
                total = part[i] if total is None else total + part[i]
        assert torch.equal(packed, total)


@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("name", list(OPTIONS))
def test_against_reference_varlen(name, lengths):
    q, k, v, cu_q, cu_k, mq, mk = _packed(lengths)
    o = _options(name, len(cu_q) - 1)
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, **o)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, **o)
    assert_close("out", out, ref, F64)
    assert_lse_close("lse", lse, ref_lse, F64)
    leaves = _leaves(q, k, v, o)
    for i, (a, b) in enumerate(zip(_grads(out, lse, leaves), _grads(ref, ref_lse, leaves))):
        assert a is not None and b is not None
        assert_close(f"gradient of leaf {i}", a, b, F64, extra_atol=1e-6)


def block_diagonal_attention(q, k, v, lq, lk, *, causal=False, window=(-1, -1), rel_bias=None,
                             alibi_slopes=None, num_global=0):
    """The spec over the packed row, with no per-sequence call: token t of sequence s stands at
    len_k(s) - len_q(s) + (its index in s) as a query, at its index in s as a key; a pair is
    visible only within a sequence; then SDPA over the whole row with the (Hq, total_q,
    total_k) additive mask (a query that sees no key gives zeros)."""
    seq_q = torch.repeat_interleave(torch.arange(len(lq)), torch.tensor(lq))
    seq_k = torch.repeat_interleave(torch.arange(len(lk)), torch.tensor(lk))
    start_q = torch.tensor([0, *itertools.accumulate(lq)])[seq_q]
    start_k = torch.tensor([0, *itertools.accumulate(lk)])[seq_k]
    pos_q = (torch.arange(len(seq_q)) - start_q + torch.tensor(lk)[seq_q] - torch.tensor(lq)[seq_q]).view(-1, 1)
    pos_k = (torch.arange(len(seq_k)) - start_k).view(1, -1)
    d = pos_q - pos_k
    ok = seq_q.view(-1, 1) == seq_k.view(1, -1)
    if causal:
        ok = ok & (d >= 0)
    local = torch.ones_like(ok)
    if window[0] >= 0:
        local = local & (d <= window[0])
    if window[1] >= 0:
        local = local & (d >= -window[1])
    ok = ok & (local | ((num_global > 0) & ((pos_k < num_global) | (pos_q < num_global))))
    Hq = q.shape[1]
    bias = torch.zeros(Hq, *d.shape, dtype=q.dtype)
    if rel_bias is not None:
        m = (rel_bias.shape[0] + 1) // 2
        bias = bias + rel_bias[d.clamp(1 - m, m - 1) + m - 1].permute(2, 0, 1)
    if alibi_slopes is not None:
        slopes = alibi_slopes.view(Hq, 1, 1) if alibi_slopes.dim() == 1 else alibi_slopes[seq_q].t().unsqueeze(-1)
        bias = bias - slopes * d.abs()
    empty = ~ok.any(1)
    mask = torch.where(ok | empty.view(-1, 1), bias, -math.inf)
    group = Hq // k.shape[1]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(group, 0),
                                         v.transpose(0, 1).repeat_interleave(group, 0), attn_mask=mask)
    return torch.where(empty.view(1, -1, 1), 0, out).transpose(0, 1)


@pytest.mark.parametrize("name", ["plain", "causal-table", "alibi-window", "alibi-per-sequence",
                                  "global-window-table"])
@pytest.mark.parametrize("lengths", list(LENGTHS))
def test_against_a_block_diagonal_mask_over_the_packed_row(name, lengths):
    q, k, v, cu_q, cu_k, mq, mk = _packed(lengths)
    o = _options(name, len(cu_q) - 1)
    out = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, **o)
    want = block_diagonal_attention(q, k, v, *LENGTHS[lengths], **o)
    torch.testing.assert_close(out, want)
    leaves = _leaves(q, k, v, o)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["causal-table", "alibi-per-sequence", "span-per-sequence-window",
                                  "span-global", "softcap-scale"])
@pytest.mark.parametrize("same_q", [False, True], ids=["lengths-differ", "same-Sq"])
def test_equals_the_padded_call_on_the_real_tokens(name, same_q):
    """Right padding: the padded batch with key_lengths = len_k and q_offset = len_k - len_q
    (FlashAttention's cache_seqlens convention when every sequence has the same Sq:
    q_offset = key_lengths - Sq) gives the packed call's values on the real queries."""
    lq, lk = ([4, 4, 4, 4], [9, 4, 30, 5]) if same_q else ([3, 1, 17, 5], [5, 2, 40, 5])
    q, k, v, cu_q, cu_k, mq, mk = _packed((lq, lk))
    o = _options(name, len(lq))
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, **o)

    def padded(t, lengths, S):
        rows = torch.split(t, lengths)
        return torch.stack([F.pad(r, (0, 0, 0, 0, 0, S - r.shape[0])) for r in rows]).transpose(1, 2)

    kl, lq_t = torch.tensor(lk), torch.tensor(lq)
    q_offset = kl - 4 if same_q else kl - lq_t
    pout, plse = fastattn.attention(padded(q, lq, mq), padded(k, lk, mk), padded(v, lk, mk), key_lengths=kl,
                                    q_offset=q_offset, return_lse=True, **o)
    real = torch.arange(mq).view(1, -1) < lq_t.view(-1, 1)            # (B, max_q)
    torch.testing.assert_close(out, pout.transpose(1, 2)[real], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, plse.transpose(1, 2)[real].t(), rtol=1e-6, atol=1e-6)
    leaves = _leaves(q, k, v, o)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(pout.transpose(1, 2)[real], leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_decode_step_of_many_sequences_on_any_thread_count():
    """A decode step of 24 one-query sequences (run side by side on the CPU threads, one call
    per thread): bitwise the per-sequence calls, on 1, 2 and 3 threads, with dropout."""
    lq, lk = [1] * 24, [(7 * s) % 45 + 1 for s in range(24)]
    q, k, v, cu_q, cu_k, mq, mk = _packed((lq, lk), dtype=F32, requires_grad=False)
    o = dict(causal=True, window=(20, 0), rel_bias=torch.randn(41, HQ), dropout_p=0.1)
    before, outs = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True,
                                                  generator=torch.Generator().manual_seed(3), **o))
    finally:
        torch.set_num_threads(before)
    drawn = dropout_seed(0.1, torch.Generator().manual_seed(3), q)
    want = per_sequence_calls(q, k, v, cu_q, cu_k, o, fn=seeded_sequence_calls(drawn, 24))
    for out, lse in outs:
        assert torch.equal(out, want[0]) and torch.equal(lse, want[1])


def test_prefill_then_decode_equals_the_full_pass():
    """A packed batch prefilled with all but its last tokens, then one decode step per sequence
    (one query over the whole sequence's keys), gives the rows of the full causal pass."""
    lengths = [7, 40, 1, 129]
    q, k, v, cu, _, m, _ = _packed((lengths, lengths), dtype=F32, requires_grad=False)
    o = dict(causal=True, rel_bias=torch.randn(17, HQ), alibi_slopes=torch.rand(HQ) * 0.1, window=(30, 0),
             num_global=2)
    full, full_lse = fastattn.attention_varlen(q, k, v, cu, cu, m, m, return_lse=True, **o)
    bounds = cu.tolist()
    last = torch.tensor([b - 1 for b in bounds[1:]])
    keep = torch.ones(q.shape[0], dtype=torch.bool)
    keep[last] = False
    prefix = [n - 1 for n in lengths]
    pre = fastattn.attention_varlen(q[keep], k[keep], v[keep], _cu(prefix), _cu(prefix), max(prefix), max(prefix),
                                    **o)
    step, step_lse = fastattn.attention_varlen(q[last], k, v, _cu([1] * len(lengths)), cu, 1, m, return_lse=True,
                                               **o)
    torch.testing.assert_close(pre, full[keep], rtol=0, atol=2e-6)
    torch.testing.assert_close(step, full[last], rtol=0, atol=2e-6)
    torch.testing.assert_close(step_lse, full_lse[:, last], rtol=0, atol=2e-6)


def _op_calls(fn) -> dict:
    """How many times each fastattn op ran (through the dispatcher, nested calls included)
    while fn() ran, on one thread (the profiler records the calling thread's ops, and
    attention_varlen runs decode-sized sequences on the other threads too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.set_num_threads(before)
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("fastattn::")}


def test_one_autograd_node_and_one_backward_op():
    """The packed call is one autograd node straight to the leaves (no per-sequence view or
    concatenation nodes), and its backward is one attention_varlen_backward op that runs the
    attention backward kernel once per sequence with queries."""
    q, k, v, cu_q, cu_k, mq, mk = _packed("mixed", dtype=F32)
    span = torch.rand(len(cu_q) - 1, HQ, requires_grad=True)
    out = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, span=span)
    assert "VarlenFunction" in out.grad_fn.name()
    leaves = [n.variable for n, _ in out.grad_fn.next_functions if n is not None]
    assert [id(t) for t in leaves] == [id(t) for t in (q, k, v, span)]
    with_queries = sum(n > 0 for n in LENGTHS["mixed"][0])
    calls = _op_calls(lambda: torch.autograd.grad(out.sum(), (q, k, v, span)))
    assert calls == {"fastattn::attention_varlen_backward": 1, "fastattn::attention_backward": with_queries}
    with torch.no_grad():  # (a recorded call is counted twice: at autograd and at the kernel)
        calls = _op_calls(lambda: fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, span=span))
    assert calls == {"fastattn::attention_varlen": 1, "fastattn::attention": with_queries}


def test_one_sequence_is_the_plain_call():
    q, k, v, cu_q, cu_k, mq, mk = _packed(([13], [29]), dtype=F32, requires_grad=False)
    got = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True)
    want = fastattn.attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal=True)
    assert torch.equal(got, want[0].transpose(0, 1))


@pytest.mark.parametrize("Hkv", [1, 2, 4], ids=["mqa", "gqa", "mha"])
def test_gqa_and_mqa(Hkv):
    q, k, v, cu_q, cu_k, mq, mk = _packed("mixed", Hkv=Hkv)
    out = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True)
    torch.testing.assert_close(out, reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_equals_per_sequence_calls(dtype):
    q, k, v, cu_q, cu_k, mq, mk = _packed("tiles", dtype=dtype)
    table = torch.randn(9, HQ, requires_grad=True)
    out = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, rel_bias=table)
    want, _ = per_sequence_calls(q, k, v, cu_q, cu_k, dict(causal=True, rel_bias=table))
    assert out.dtype == dtype and torch.equal(out, want)


def test_empty_batches():
    """No sequence at all, and sequences with no tokens: empty or zero outputs, -inf lse, and
    gradients (zeros) still flow."""
    q, k, v, cu_q, cu_k, _, _ = _packed(([], []))
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, 0, 0, return_lse=True, causal=True)
    assert out.shape == (0, HQ, DV) and lse.shape == (HQ, 0) and lse.dtype == F32
    q, k, v, cu_q, cu_k, mq, mk = _packed(([0, 2, 0], [3, 0, 0]))
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True)
    assert torch.equal(out, torch.zeros(2, HQ, DV, dtype=F64)) and bool(torch.isneginf(lse).all())
    gq, gk = torch.autograd.grad(out.sum(), (q, k))
    assert torch.equal(gq, torch.zeros_like(q)) and torch.equal(gk, torch.zeros_like(k))


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["plain", "causal-table", "span-per-sequence-window"])
def test_dropout_is_one_draw_with_offset_plus_s_per_sequence(name):
    """The generator gives one [seed, offset]; sequence s gets the mask of a call with
    [seed, offset + s]: equal to direct op calls with those [seed, offset] pairs and to the reference's
    masks, gradients too."""
    p = 0.3
    q, k, v, cu_q, cu_k, mq, mk = _packed("tiles")
    o = _options(name, len(cu_q) - 1)
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, dropout_p=p, return_lse=True,
                                         generator=torch.Generator().manual_seed(42), **o)
    drawn = dropout_seed(p, torch.Generator().manual_seed(42), q)
    want, want_lse = per_sequence_calls(q, k, v, cu_q, cu_k, dict(o, dropout_p=p),
                                        fn=seeded_sequence_calls(drawn, len(cu_q) - 1))
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, dropout_p=p, dropout_seed=drawn,
                                              return_lse=True, **o)
    assert_close("out", out, ref, F64)
    leaves = _leaves(q, k, v, o)
    for i, (a, b) in enumerate(zip(_grads(out, lse, leaves), _grads(ref, ref_lse, leaves))):
        assert_close(f"gradient of leaf {i}", a, b, F64, extra_atol=1e-6)
    # without dropout the result differs (the mask did something)
    assert (out - fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, **o)).abs().max() > 0.1


def test_on_each_device_with_dropout_equals_per_sequence_op_calls(device):
    """CPU and (with a GPU) CUDA: the packed call with a table and dropout is bitwise the op
    called per sequence with [seed, offset + s]; gradients too."""
    dtype, p = (F32 if device == "cpu" else torch.bfloat16), 0.2
    lq, lk = LENGTHS["tiles"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 32, generator=g).to(device, dtype).requires_grad_()
               for n, h in ((sum(lq), HQ), (sum(lk), HKV), (sum(lk), HKV)))
    cu_q, cu_k = _cu(lq).to(device), _cu(lk).to(device)
    table = torch.randn(9, HQ, generator=g).to(device).requires_grad_()
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True, rel_bias=table,
                                         dropout_p=p, generator=torch.Generator(device=device).manual_seed(3),
                                         return_lse=True)
    assert out.device.type == torch.device(device).type and out.dtype == dtype
    drawn = dropout_seed(p, torch.Generator(device=device).manual_seed(3), q)
    want, want_lse = per_sequence_calls(q, k, v, cu_q.cpu(), cu_k.cpu(),
                                        dict(causal=True, rel_bias=table, dropout_p=p),
                                        fn=seeded_sequence_calls(drawn, len(lq)))
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    leaves = [q, k, v, table]
    got, exp = _grads(out, lse, leaves), _grads(want, want_lse, leaves)
    for a, b in zip(got[:3], exp[:3]):
        assert torch.equal(a, b)
    torch.testing.assert_close(got[3], exp[3], rtol=1e-5, atol=1e-5)


def test_dropout_masks_differ_between_identical_sequences():
    """Two sequences with the same tokens draw different masks (offset + s), so their outputs
    differ; without dropout they are equal."""
    q, k, v, _, _, _, _ = _packed(([20], [20]), dtype=F32, requires_grad=False)
    q2, k2, v2 = (torch.cat([t, t]) for t in (q, k, v))
    cu = _cu([20, 20])
    plain = fastattn.attention_varlen(q2, k2, v2, cu, cu, 20, 20)
    assert torch.equal(plain[:20], plain[20:])
    dropped = fastattn.attention_varlen(q2, k2, v2, cu, cu, 20, 20, dropout_p=0.5,
                                        generator=torch.Generator().manual_seed(1))
    assert (dropped[:20] - dropped[20:]).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# gradcheck, reproducibility, compile
# ---------------------------------------------------------------------------------------------
def test_gradcheck_every_gradient():
    q, k, v, cu_q, cu_k, mq, mk = _packed(([3, 0, 4], [5, 1, 4]))
    table = torch.randn(5, HQ, dtype=F64, requires_grad=True)
    slopes = torch.tensor([0.2, 0.05, 0.1, 0.3], dtype=F64, requires_grad=True)
    span = torch.tensor([[2.3, 3.6, 1.7, 4.4], [1.2, 2.6, 3.3, 0.7], [2.9, 1.4, 3.8, 2.1]], dtype=F64,
                        requires_grad=True)
    scale = torch.tensor(0.6, dtype=F64, requires_grad=True)

    def f(q, k, v, table, slopes, span, scale):
        return fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, rel_bias=table,
                                         alibi_slopes=slopes, span=span, span_ramp=2.0, num_global=1,
                                         scale=scale)

    # (out only: lse is float32, too coarse for finite differences; its gradient is checked
    # against the reference above)
    assert torch.autograd.gradcheck(f, (q, k, v, table, slopes, span, scale))


def test_gradients_are_bitwise_the_same_across_runs_and_thread_counts():
    q, k, v, cu_q, cu_k, mq, mk = _packed(([130, 64, 257, 7], [130, 200, 257, 7]), dtype=F32)
    o = dict(causal=True, rel_bias=torch.randn(63, HQ, requires_grad=True),
             span=torch.tensor([20.5, 50.25, 9.75, 100.5], requires_grad=True), span_ramp=8.0,
             scale=torch.tensor(0.3, requires_grad=True), dropout_p=0.1)
    leaves = _leaves(q, k, v, o)
    before, runs = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3, 2):
            torch.set_num_threads(threads)
            out = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, generator=torch.Generator().manual_seed(9),
                                            **o)
            runs.append(torch.autograd.grad(out.square().sum(), leaves))
    finally:
        torch.set_num_threads(before)
    assert runs[0][3].abs().max() > 1e-3 and runs[0][4].abs().max() > 1e-3  # real gradients
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_torch_compile_fullgraph_and_opcheck():
    """torch.compile(fullgraph=True) keeps the op in its graph: outputs and gradients equal the
    eager call's, and another batch's lengths with the same totals reuse the compiled graph
    (cu_seqlens are data, not guards). opcheck runs the op's schema, fake kernel, autograd
    registration and AOT dispatch checks on it and on its backward."""
    table = torch.randn(9, HQ, requires_grad=True)

    def block(q, k, v, cu_q, cu_k, mq, mk):
        out = fastattn.attention_varlen(q * 2.0, k, v, cu_q, cu_k, mq, mk, causal=True, rel_bias=table)
        return out.sin().sum()

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    lengths = ([3, 0, 17, 1, 4, 0], [5, 2, 17, 0, 40, 0])
    shuffled = ([0, 17, 4, 3, 1, 0], [2, 17, 40, 5, 0, 0])  # the same totals, other bounds
    for lq_lk in (lengths, shuffled):
        inputs = _packed(lq_lk, dtype=F32)
        eager, got = block(*inputs), compiled(*inputs)
        torch.testing.assert_close(got, eager)
        leaves = (*inputs[:3], table)
        for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(eager, leaves)):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1
    inductor = torch.compile(block, fullgraph=True)  # and through AOTAutograd and Inductor
    inputs = _packed("tiles", dtype=F32)
    torch.testing.assert_close(inductor(*inputs), block(*inputs))
    torch._dynamo.reset()

    q, k, v, cu_q, cu_k, mq, mk = _packed("mixed")
    o = _options("softcap-scale", len(cu_q) - 1)
    args = (cu_q, cu_k, mq, mk, q, k, v, None, o["scale"], False, -1, -1, o["rel_bias"], None, None, 32.0, 0,
            None, 5.0, 0.0, None, None, None, None)
    torch.library.opcheck(torch.ops.fastattn.attention_varlen.default, args)


# ---------------------------------------------------------------------------------------------
# bad input: every check, before any kernel runs
# ---------------------------------------------------------------------------------------------
def _bad_calls():
    q, k, v, cu_q, cu_k, mq, mk = _packed("mixed", requires_grad=False)
    n = len(cu_q) - 1
    i64 = lambda t: t.long()  # noqa: E731
    good = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk)
    bad = [
        ("q", dict(q=q.numpy()), TypeError),
        ("q", dict(q=q[None]), ValueError),
        ("k", dict(k=k[:, :, None]), ValueError),
        ("v", dict(v=v[:-1]), ValueError),
        ("v", dict(v=torch.randn(k.shape[0], 3, DV, dtype=F64)), ValueError),
        ("Hq", dict(k=torch.randn(k.shape[0], 3, D, dtype=F64), v=torch.randn(k.shape[0], 3, DV, dtype=F64)),
         ValueError),
        ("Dqk", dict(k=torch.randn(k.shape[0], HKV, D + 1, dtype=F64)), ValueError),
        ("k", dict(k=k.to("meta")), ValueError),
        ("cu_seqlens_q", dict(cu_seqlens_q=cu_q.tolist()), TypeError),
        ("cu_seqlens_q", dict(cu_seqlens_q=cu_q.float()), TypeError),
        ("cu_seqlens_k", dict(cu_seqlens_k=cu_k.to(torch.int16)), TypeError),
        ("cu_seqlens_q", dict(cu_seqlens_q=cu_q[None]), ValueError),
        ("cu_seqlens_k", dict(cu_seqlens_k=cu_k[:0]), ValueError),
        ("cu_seqlens_q", dict(cu_seqlens_q=cu_q.to("meta")), ValueError),
        ("cu_seqlens_q and cu_seqlens_k", dict(cu_seqlens_q=cu_q[:-1]), ValueError),
        ("cu_seqlens_q must start at 0", dict(cu_seqlens_q=i64(cu_q) + 1), ValueError),
        ("cu_seqlens_k must be non-decreasing", dict(cu_seqlens_k=torch.tensor([0, 5, 4, 21, 21, 61, 61])),
         ValueError),
        ("cu_seqlens_q must end at total_q", dict(cu_seqlens_q=torch.tensor([0, 3, 3, 20, 21, 24, 24])), ValueError),
        ("cu_seqlens_k must end at total_k", dict(cu_seqlens_k=torch.tensor([0, 5, 7, 24, 24, 63, 63])), ValueError),
        ("max_seqlen_q", dict(max_seqlen_q=mq - 1), ValueError),
        ("max_seqlen_k", dict(max_seqlen_k=mk - 1), ValueError),
        ("max_seqlen_k", dict(max_seqlen_k=float(mk)), TypeError),
        ("max_seqlen_q", dict(max_seqlen_q=True), TypeError),
        ("alibi_slopes", dict(alibi_slopes=torch.rand(n + 1, HQ, dtype=F64)), ValueError),
        ("span", dict(span=torch.rand(n - 1, HQ, dtype=F64)), ValueError),
        ("span", dict(span=torch.rand(HQ + 1, dtype=F64)), ValueError),
        ("rel_bias", dict(rel_bias=torch.rand(4, HQ, dtype=F64)), ValueError),
        ("window", dict(window=(1,)), TypeError),
        ("softcap", dict(softcap=-1.0), ValueError),
        ("dropout_p", dict(dropout_p=1.0), ValueError),
        ("dropout_p", dict(dropout_p="0.1"), TypeError),
        ("generator", dict(dropout_p=0.1, generator=42), TypeError),
        ("num_global", dict(num_global=-1), ValueError),
    ]
    return good, bad


@pytest.mark.parametrize("i", range(len(_bad_calls()[1])), ids=lambda i: _bad_calls()[1][i][0])
def test_bad_input_raises_before_any_kernel_runs(i):
    good, bad = _bad_calls()
    match, change, err = bad[i]

    def bad_call():
        with pytest.raises(err, match=match):
            fastattn.attention_varlen(**dict(good, **change))

    # every check runs before the first sequence's attention kernel
    assert "fastattn::attention" not in _op_calls(bad_call)
    assert _op_calls(lambda: fastattn.attention_varlen(**good))["fastattn::attention"] == 4


def test_option_errors_raise_without_any_sequence():
    q, k, v, cu_q, cu_k, _, _ = _packed(([], []))
    with pytest.raises(ValueError, match="rel_bias"):
        fastattn.attention_varlen(q, k, v, cu_q, cu_k, 0, 0, rel_bias=torch.rand(4, HQ, dtype=F64))
    with pytest.raises(ValueError, match="window"):
        fastattn.attention_varlen(q, k, v, cu_q, cu_k, 0, 0, window=(-5, 0))


# ---------------------------------------------------------------------------------------------
# unpad / pad
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32])
def test_unpad_pad_round_trip(side, mask_dtype):
    lengths = [5, 0, 8, 3]
    B, S = len(lengths), 8
    x = torch.randn(B, S, 3, 2, dtype=F64, requires_grad=True)
    pos = torch.arange(S).view(1, S)
    n = torch.tensor(lengths).view(B, 1)
    mask = pos < n if side == "right" else pos >= S - n
    packed, indices, cu, max_len = fastattn.unpad(x, mask.to(mask_dtype))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 5, 13, 16] and max_len == 8
    assert indices.dtype == torch.int64 and packed.shape == (16, 3, 2)
    for b, (start, end) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):  # row b's tokens, in order
        assert torch.equal(packed[start:end], x[b][mask[b]])
    back = fastattn.pad(packed, indices, B, S)
    assert torch.equal(back, torch.where(mask.view(B, S, 1, 1), x, 0))
    g = torch.randn_like(back)
    (gx,) = torch.autograd.grad(back, x, g)
    assert torch.equal(gx, torch.where(mask.view(B, S, 1, 1), g, 0))
    assert torch.autograd.gradcheck(lambda x: fastattn.pad(fastattn.unpad(x, mask)[0], indices, B, S), (x,))


def test_unpad_then_varlen_equals_the_padded_call_with_left_padding():
    """Left padding: unpad, attend per sequence, pad back; equals the padded call that places
    each row's tokens with k_offset (its first real key at position 0)."""
    B, S = 3, 12
    lengths = torch.tensor([12, 5, 9])
    mask = torch.arange(S).view(1, S) >= S - lengths.view(B, 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S, HQ, D, generator=g, dtype=F64) for _ in range(3))
    (qp, idx, cu, m), kp, vp = fastattn.unpad(q, mask), fastattn.unpad(k, mask)[0], fastattn.unpad(v, mask)[0]
    out = fastattn.pad(fastattn.attention_varlen(qp, kp, vp, cu, cu, m, m, causal=True, window=(4, 0)), idx, B, S)
    shift = S - lengths
    want = fastattn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, window=(4, 0),
                              attn_mask=mask.view(B, 1, 1, S), q_offset=-shift, k_offset=-shift).transpose(1, 2)
    torch.testing.assert_close(out, torch.where(mask.view(B, S, 1, 1), want, 0))


def test_unpad_pad_bad_input():
    x = torch.randn(2, 4, 3)
    mask = torch.ones(2, 4, dtype=torch.bool)
    cases = [
        (lambda: fastattn.unpad(x.numpy(), mask), TypeError, "x"),
        (lambda: fastattn.unpad(x[0, 0], mask), ValueError, "x"),
        (lambda: fastattn.unpad(x, mask.tolist()), TypeError, "attention_mask"),
        (lambda: fastattn.unpad(x, mask.float()), TypeError, "attention_mask"),
        (lambda: fastattn.unpad(x, mask[:, :3]), ValueError, "attention_mask"),
        (lambda: fastattn.unpad(x, mask.long() * 2), ValueError, "attention_mask"),
        (lambda: fastattn.unpad(x, mask.to("meta")), ValueError, "attention_mask"),
        (lambda: fastattn.pad(x.numpy(), torch.arange(2), 2, 4), TypeError, "x_packed"),
        (lambda: fastattn.pad(x[0, 0, 0], torch.arange(2), 2, 4), ValueError, "x_packed"),
        (lambda: fastattn.pad(x[0], [0, 1, 2, 3], 2, 4), TypeError, "indices"),
        (lambda: fastattn.pad(x[0], torch.arange(4.0), 2, 4), TypeError, "indices"),
        (lambda: fastattn.pad(x[0], torch.arange(3), 2, 4), ValueError, "indices"),
        (lambda: fastattn.pad(x[0], torch.arange(4) + 5, 2, 4), ValueError, "indices"),
        (lambda: fastattn.pad(x[0], torch.arange(4) - 1, 2, 4), ValueError, "indices"),
        (lambda: fastattn.pad(x[0], torch.arange(4), 2.0, 4), TypeError, "batch"),
        (lambda: fastattn.pad(x[0], torch.arange(4), 2, -4), ValueError, "seqlen"),
    ]
    for call, err, name in cases:
        with pytest.raises(err, match=name):
            call()


# ---------------------------------------------------------------------------------------------
# modules: packed input and attn_mask
# ---------------------------------------------------------------------------------------------
D_MODEL = 32


def _module(name: str, impl: str = "fused"):
    torch.manual_seed(0)
    fnn = fastattn.nn
    builders = {
        "mha-rope-gqa-table": lambda: fnn.MultiheadAttention(
            D_MODEL, 4, 2, rotary="rope", causal=True, rel_bias_max_dist=6, alibi=True,
            learnable_temperature=True, impl=impl),
        "mha-givens-window-softcap": lambda: fnn.MultiheadAttention(
            D_MODEL, 4, rotary="givens", n_rotations=5, window=(3, 2), softcap=2.0, num_global=1, impl=impl),
        "mla": lambda: fnn.MultiheadLatentAttention(D_MODEL, 4, 12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                    v_head_dim=6, impl=impl),
        "adaptive-span": lambda: fnn.AdaptiveSpanAttention(D_MODEL, 4, max_span=6.5, span_ramp=3, rotary="rope",
                                                           impl=impl),
        "hybrid": lambda: fnn.HybridAttention(D_MODEL, 4, max_span=5.5, span_ramp=2, rotary="rope",
                                              rel_bias_max_dist=4, impl=impl),
    }
    m = builders[name]()
    with torch.no_grad():  # learned positions away from their (zero / identity) start
        for p_name, p in m.named_parameters():
            if "pos_bias" in p_name or "thetas" in p_name:
                p.normal_()
    return m


MODULES = ["mha-rope-gqa-table", "mha-givens-window-softcap", "mla", "adaptive-span", "hybrid"]


def _param_grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("name", MODULES)
def test_packed_module_equals_the_padded_module_on_the_real_tokens(name, impl):
    """A right-padded batch through the module with key_lengths, and the same tokens packed
    (rotary positions restart at 0 per sequence): equal outputs on the real tokens, and equal
    parameter gradients for a loss on them."""
    lengths = torch.tensor([9, 1, 33, 0, 20])
    B, S = len(lengths), 33
    mask = torch.arange(S).view(1, S) < lengths.view(B, 1)
    x = torch.randn(B, S, D_MODEL, generator=torch.Generator().manual_seed(1))
    m = _module(name, impl)
    kw = [dict(absorb=False), dict(absorb=True)] if name == "mla" else [{}]
    for extra in kw:
        m.zero_grad()
        padded = m(x, key_lengths=lengths, **extra)[mask]
        g = torch.randn(padded.shape, generator=torch.Generator().manual_seed(2))
        (padded * g).sum().backward()
        want = _param_grads(m)
        m.zero_grad()
        xp, _, cu, max_len = fastattn.unpad(x, mask)
        packed = m(xp, cu_seqlens=cu, max_seqlen=max_len, **extra)
        assert packed.shape == (int(lengths.sum()), D_MODEL)
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
        (packed * g).sum().backward()
        got = _param_grads(m)
        assert set(got) == set(want) and len(got) >= 4
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=lambda s: f"grad {n}: {s}")


def test_packed_module_fused_equals_reference_with_dropout_off_and_on():
    """impl="fused" against impl="reference" on a packed batch (attention_varlen and its twin);
    in training mode with dropout both draw masks (different ones: the reference draws its
    own seed), so only the eval outputs are compared, and training mode must differ."""
    fused = _module("mha-rope-gqa-table", "fused")
    ref = fastattn.nn.set_impl(_module("mha-rope-gqa-table", "fused"), "reference")
    lengths = [5, 17, 1]
    x = torch.randn(sum(lengths), D_MODEL)
    cu = _cu(lengths)
    torch.testing.assert_close(fused(x, cu_seqlens=cu, max_seqlen=17), ref(x, cu_seqlens=cu, max_seqlen=17),
                               rtol=1e-5, atol=1e-5)
    fused.dropout = 0.5
    fused.train()
    dropped = fused(x, cu_seqlens=cu, max_seqlen=17)
    fused.eval()
    assert (dropped - fused(x, cu_seqlens=cu, max_seqlen=17)).abs().max() > 0.01


@pytest.mark.parametrize("kind", ["bool", "float_grad"])
@pytest.mark.parametrize("name", ["mha-rope-gqa-table", "mla"])
def test_attn_mask_through_the_module_equals_the_reference_module(name, kind):
    B, S = 2, 23
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, S, D_MODEL, generator=g)
    if kind == "bool":
        mask = torch.rand(B, 1, S, S, generator=g) < 0.7
    else:
        mask = (0.5 * torch.randn(1, 4, S, S, generator=g)).requires_grad_()
    fused = _module(name, "fused")
    ref = fastattn.nn.set_impl(_module(name, "fused"), "reference")
    for extra in ([dict(absorb=False), dict(absorb=True)] if name == "mla" else [{}]):
        out, want = fused(x, attn_mask=mask, **extra), ref(x, attn_mask=mask, **extra)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert (out - fused(x, **extra)).abs().max() > 1e-3  # the mask changed something
        if mask.requires_grad:
            gy = torch.randn(out.shape, generator=g)
            (got,), (exp,) = torch.autograd.grad(out, mask, gy), torch.autograd.grad(want, mask, gy)
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6)


def test_attn_mask_in_the_module_masks_like_key_lengths_and_with_a_cache():
    """A bool mask hiding the keys past each row's length gives key_lengths' result; in KV-cache
    decoding, each step's (B, 1, 1, Sk) mask over the cached keys gives the rows of the full
    pass with the full mask."""
    m = _module("mha-rope-gqa-table", "fused")
    B, S = 2, 12
    x = torch.randn(B, S, D_MODEL, generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([12, 7])
    keep = torch.arange(S).view(1, S) < lengths.view(B, 1)
    torch.testing.assert_close(m(x, attn_mask=keep.view(B, 1, 1, S)), m(x, key_lengths=lengths))
    hidden = torch.zeros(B, S, dtype=torch.bool)
    hidden[0, 3] = hidden[1, 0] = True  # keys no query may see (e.g. padding inside the row)
    full = m(x, attn_mask=~hidden.view(B, 1, 1, S))
    with torch.no_grad():
        outs, cache = [], {}
        for t in range(S):
            o, cache = m(x[:, t:t + 1], cache=cache, attn_mask=~hidden[:, :t + 1].view(B, 1, 1, t + 1))
            outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_packed_module_under_torch_compile():
    m = _module("mha-rope-gqa-table", "fused")
    lengths = [5, 17, 1]
    x = torch.randn(sum(lengths), D_MODEL, requires_grad=True)
    cu = _cu(lengths)
    torch._dynamo.reset()
    eager = m(x, cu_seqlens=cu, max_seqlen=17)
    compiled = torch.compile(m)(x, cu_seqlens=cu, max_seqlen=17)
    torch.testing.assert_close(compiled, eager)
    g = torch.randn_like(eager)
    torch.testing.assert_close(torch.autograd.grad(compiled, x, g)[0], torch.autograd.grad(eager, x, g)[0])
    torch._dynamo.reset()


def test_packed_module_bad_input():
    m = _module("mha-rope-gqa-table", "fused")
    mla = _module("mla", "fused")
    hybrid = _module("hybrid", "fused")
    x, cu = torch.randn(6, D_MODEL), _cu([2, 4])
    cases = [
        (lambda: m(x, cu_seqlens=cu), ValueError, "max_seqlen"),
        (lambda: m(x, max_seqlen=4), ValueError, "cu_seqlens"),
        (lambda: m(x, cu_seqlens=cu.tolist(), max_seqlen=4), TypeError, "cu_seqlens"),
        (lambda: m(x, cu_seqlens=cu.float(), max_seqlen=4), TypeError, "cu_seqlens"),
        (lambda: m(x[None], cu_seqlens=cu, max_seqlen=4), ValueError, "total, d_model"),
        (lambda: m(x[:, :8], cu_seqlens=cu, max_seqlen=4), ValueError, "d_model=32"),
        (lambda: m(x.long(), cu_seqlens=cu, max_seqlen=4), TypeError, "floating"),
        (lambda: m(x, x, cu_seqlens=cu, max_seqlen=4), ValueError, "xa"),
        (lambda: m(x, cache={}, cu_seqlens=cu, max_seqlen=4), ValueError, "cache"),
        (lambda: m(x, key_lengths=torch.tensor([2, 4]), cu_seqlens=cu, max_seqlen=4), ValueError, "key_lengths"),
        (lambda: m(x, attn_mask=torch.ones(6, 6, dtype=torch.bool), cu_seqlens=cu, max_seqlen=4), ValueError,
         "attn_mask"),
        (lambda: m(x, need_weights=True, cu_seqlens=cu, max_seqlen=4), ValueError, "need_weights"),
        (lambda: m(x, cu_seqlens=cu, max_seqlen=3), ValueError, "max_seqlen"),
        (lambda: m(x, cu_seqlens=_cu([2, 3]), max_seqlen=4), ValueError, "cu_seqlens"),
        (lambda: mla(x, cache={}, cu_seqlens=cu, max_seqlen=4), ValueError, "cache"),
        (lambda: mla(x, cu_seqlens=cu, max_seqlen=3), ValueError, "max_seqlen"),
        (lambda: hybrid(x, key_lengths=torch.tensor([2, 4]), cu_seqlens=cu, max_seqlen=4), ValueError,
         "key_lengths"),
        (lambda: hybrid(x, need_weights=True, cu_seqlens=cu, max_seqlen=4), ValueError, "need_weights"),
        (lambda: hybrid(x, cu_seqlens=cu, max_seqlen=3), ValueError, "max_seqlen"),
        (lambda: hybrid(x, cu_seqlens=cu), ValueError, "max_seqlen"),
        (lambda: m(torch.randn(2, 5, D_MODEL), attn_mask=torch.ones(3, 1, 5, 5, dtype=torch.bool)), ValueError,
         "attn_mask"),
    ]
    for call, err, match in cases:
        with pytest.raises(err, match=match):
            call()


def test_packed_rotary_positions_restart_at_zero_in_each_sequence(monkeypatch):
    """(RoPE scores depend on position differences only, so outputs barely tell where positions
    start: the positions the modules hand to the rotary embedding are checked directly.)"""
    from fastattn.nn._common import packed_positions
    cu = _cu([3, 0, 1, 4])
    assert packed_positions(cu, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert packed_positions(cu.long(), 8).dtype == torch.int64
    for name in ("mha-rope-gqa-table", "mla"):
        m = _module(name)
        seen = []
        real = m.rotary.rotate
        monkeypatch.setattr(m.rotary, "rotate", lambda xs, **kw: seen.append(kw["positions"]) or real(xs, **kw))
        m(torch.randn(8, D_MODEL), cu_seqlens=cu, max_seqlen=4)
        assert len(seen) == 1 and seen[0].tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
        seen.clear()
        m(torch.randn(2, 4, D_MODEL))  # a padded batch: the default positions
        assert seen == [None]


# ---------------------------------------------------------------------------------------------
# every option with every other (pairwise), and random packed calls
# ---------------------------------------------------------------------------------------------
VARLEN_FACTORS = {
    "lengths": ["mixed", "tiles"],
    "Hkv": [1, 2, 4],
    "causal": [False, True],
    "window": [(-1, -1), (5, 2), (2, 0)],
    "rel_bias": [None, (5, "grad"), (3, "fixed")],
    "alibi": [None, "h", "s"],
    "span": [None, "h", "s"],
    "num_global": [0, 2],
    "softcap": [0.0, 5.0],
    "scale": [None, "tensor"],
    "dropout": [0.0, 0.3],
}


def _grid_options(row: dict, n_seq: int) -> dict:
    spec = {n: row[n] for n in ("causal", "window", "num_global", "softcap", "scale", "rel_bias", "alibi", "span")
            if row[n] is not None}
    if row["span"] is not None:
        spec["span_ramp"] = 3.0
    return _build_options(spec, n_seq)


def _check_varlen_call(lengths, Hkv, options, dropout_p):
    """The packed call against one call per sequence (bitwise, gradients too) and against
    reference.attention_varlen (float64), with dropout drawn from a seeded generator."""
    q, k, v, cu_q, cu_k, mq, mk = _packed(lengths, Hkv=Hkv)
    gen = (lambda: torch.Generator().manual_seed(7)) if dropout_p else (lambda: None)
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, dropout_p=dropout_p,
                                         generator=gen(), **options)
    leaves = _leaves(q, k, v, options)
    got = _grads(out, lse, leaves)
    drawn = dropout_seed(dropout_p, gen(), q)
    want, want_lse = per_sequence_calls(q, k, v, cu_q, cu_k, dict(options, dropout_p=dropout_p),
                                        fn=seeded_sequence_calls(drawn, len(cu_q) - 1))
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    for a, b in zip(got, _grads(want, want_lse, leaves)):
        assert (a is None and b is None) or torch.equal(a, b)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, dropout_p=dropout_p,
                                              dropout_seed=drawn, **options)
    assert_close("out", out, ref, F64)
    assert_lse_close("lse", lse, ref_lse, F64)
    for i, (a, b) in enumerate(zip(got, _grads(ref, ref_lse, leaves))):
        assert a is not None and b is not None, i
        assert_close(f"gradient of leaf {i}", a, b, F64, extra_atol=1e-6)


def _pairwise_varlen():
    from conftest import pairwise
    return pairwise(VARLEN_FACTORS, seed=11)


@pytest.mark.parametrize("row", _pairwise_varlen(),
                         ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items() if v not in (None, 0, 0.0, False)))
def test_every_option_pairwise(row):
    lq = LENGTHS[row["lengths"]][0]
    options = _grid_options(row, len(lq))
    _check_varlen_call(row["lengths"], row["Hkv"], options, row["dropout"])


@st.composite
def _varlen_calls(draw):
    n_seq = draw(st.integers(1, 5))  # (no sequence at all: test_empty_batches)
    edge = st.sampled_from((0, 1, 2, 31, 32, 33, 127, 128, 129))
    lq = [draw(st.one_of(edge, st.integers(0, 40))) for _ in range(n_seq)]
    lk = [draw(st.one_of(st.just(n), edge, st.integers(0, 40))) for n in lq]
    row = {name: draw(st.sampled_from(values)) for name, values in VARLEN_FACTORS.items()
           if name not in ("lengths", "Hkv")}
    return (lq, lk), draw(st.sampled_from([1, 2, 4])), row


@random_settings(15)
@given(call=_varlen_calls())
def test_random_packed_calls(call):
    """Random packed batches (1 to 5 sequences, lengths 0, 1, at the tile edges or anything
    up to 40, Sq and Sk drawn apart) with random options, judged as the pairwise grid."""
    lengths, Hkv, row = call
    options = _grid_options(row, len(lengths[0]))
    _check_varlen_call(lengths, Hkv, options, row["dropout"])
