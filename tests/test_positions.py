"""Explicit positions (q_offset, k_offset) and per-batch ALiBi slopes: every rule sees the true
distance; a chunk of a sequence equals the rows of the full call; against reference.py and an
independent dense formulation (SDPA with a mask built here from the spec); gradients, gradcheck,
opcheck, compile, bad input, and any int64 a direct op call passes. CUDA through the emulator in
tests/test_cuda_emulation.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from conftest import attention_op_args

F64 = torch.float64


def _qkv(B=2, Hq=4, Hkv=2, Sq=12, Sk=30, D=8, dtype=F64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, s, D, generator=g, dtype=dtype).requires_grad_(requires_grad)
                 for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))


def dense_positions_attention(q, k, v, q_offset, k_offset, *, causal=False, window=(-1, -1),
                              rel_bias=None, alibi_slopes=None, num_global=0, key_lengths=None):
    """The spec, written out per batch row: query i at q_offset[b] + i, key j at k_offset[b] + j,
    d their difference; then SDPA with the materialized additive mask (rows with no visible key
    give zeros)."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    rows = []
    for b in range(B):
        pq = q_offset[b] + torch.arange(Sq).view(Sq, 1)
        pk = k_offset[b] + torch.arange(Sk).view(1, Sk)
        d = pq - pk
        ok = torch.ones(Sq, Sk, dtype=torch.bool)
        if causal:
            ok &= d >= 0
        glob = (num_global > 0) & ((pk < num_global) | (pq < num_global))
        local = torch.ones_like(ok)
        if window[0] >= 0:
            local &= d <= window[0]
        if window[1] >= 0:
            local &= d >= -window[1]
        ok &= glob | local
        if key_lengths is not None:
            ok &= torch.arange(Sk).view(1, Sk) < int(key_lengths[b])
        bias = torch.zeros(Hq, Sq, Sk, dtype=q.dtype)
        if rel_bias is not None:
            m = (rel_bias.shape[0] + 1) // 2
            bias = bias + rel_bias[(d.clamp(1 - m, m - 1) + m - 1)].permute(2, 0, 1)
        if alibi_slopes is not None:
            s = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            bias = bias - s.view(Hq, 1, 1) * d.abs()
        mask = torch.where(ok, bias, torch.full((), -math.inf, dtype=q.dtype))
        empty = ~ok.any(-1)
        safe = torch.where(empty.view(1, Sq, 1), torch.zeros((), dtype=q.dtype), mask)
        kb = k[b].repeat_interleave(Hq // k.shape[1], 0)
        vb = v[b].repeat_interleave(Hq // k.shape[1], 0)
        o = F.scaled_dot_product_attention(q[b:b + 1], kb[None], vb[None], attn_mask=safe[None])[0]
        rows.append(torch.where(empty.view(1, Sq, 1), torch.zeros((), dtype=q.dtype), o))
    return torch.stack(rows)


CASES = {
    "causal-table": dict(causal=True, rel_bias=True),
    "window-alibi": dict(window=(4, 2), alibi=True),
    "global-lengths": dict(num_global=3, key_lengths=True, causal=True),
    "batch-alibi-window": dict(alibi="bh", window=(6, 0)),
}


def _options(name, B=2, Hq=4, dtype=F64):
    o = dict(CASES[name])
    g = torch.Generator().manual_seed(3)
    if o.pop("rel_bias", False):
        o["rel_bias"] = torch.randn(9, Hq, generator=g, dtype=dtype)
    alibi = o.pop("alibi", False)
    if alibi:
        o["alibi_slopes"] = torch.rand((B, Hq) if alibi == "bh" else (Hq,), generator=g, dtype=dtype) * 0.3
    if o.pop("key_lengths", False):
        o["key_lengths"] = torch.tensor([30, 17])
    return o


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("offsets", [((0, 0), (0, 0)), ((25, -3), (0, 4)), ((-6, 40), (5, -20))],
                         ids=["zero", "mixed", "negative"])
def test_against_reference_and_dense_formulation(name, offsets):
    q, k, v = _qkv(requires_grad=True)
    o = _options(name)
    qo, ko = (torch.tensor(x) for x in offsets)
    out = fastattn.attention(q, k, v, q_offset=qo, k_offset=ko, **o)
    ref = reference.attention(q, k, v, q_offset=qo, k_offset=ko, **o)
    dense = dense_positions_attention(q, k, v, qo.tolist(), ko.tolist(), **o)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out, dense)
    leaves = [q, k, v]
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(dense, leaves, g)):
        torch.testing.assert_close(a, b)


def test_a_chunk_equals_the_rows_of_the_full_call():
    """Chunked prefill: queries 20..29 with q_offset = 20 (and keys 0..29) are rows 20..29 of
    the full causal call, with every rule on; and a key shard with k_offset too."""
    q, k, v = _qkv(B=2, Hq=2, Hkv=2, Sq=50, Sk=50)
    o = dict(causal=True, rel_bias=torch.randn(9, 2, dtype=F64), alibi_slopes=torch.tensor([0.1, 0.3], dtype=F64),
             window=(7, 0), span=torch.tensor([9.5, 30.0], dtype=F64), span_ramp=4.0)
    full, full_lse = fastattn.attention(q, k, v, num_global=3, return_lse=True, **o)
    chunk, lse = fastattn.attention(q[:, :, 20:30], k[:, :, :30], v[:, :, :30], q_offset=20, num_global=3,
                                    return_lse=True, **o)
    torch.testing.assert_close(chunk, full[:, :, 20:30], rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, full_lse[:, :, 20:30])
    # keys 10..49 only (no global tokens, which sit in keys 0..2): positions tell the kernel
    shard = fastattn.attention(q[:, :, 20:30], k[:, :, 10:], v[:, :, 10:], q_offset=20, k_offset=10, **o)
    want = reference.attention(q[:, :, 20:30], k[:, :, 10:], v[:, :, 10:], q_offset=20, k_offset=10, **o)
    torch.testing.assert_close(shard, want)


def test_new_tokens_appended_to_caches_of_different_lengths():
    """key_lengths = [10, 6], Sq = 3, causal: with q_offset = key_lengths - Sq (FlashAttention's
    cache_seqlens convention) the short row's first query sees keys 0..3, not 0..5."""
    q, k, v = _qkv(B=2, Hq=1, Hkv=1, Sq=3, Sk=10)
    kl = torch.tensor([10, 6])
    w = fastattn.attention_weights(q, k, causal=True, key_lengths=kl, q_offset=kl - 3)
    assert (w[1, 0, 0] > 0).nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert (w[0, 0, 0] > 0).nonzero().flatten().tolist() == list(range(8))
    for b, n in ((0, 10), (1, 6)):  # each row equals its own unpadded call
        own = fastattn.attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=True)
        got = fastattn.attention(q, k, v, causal=True, key_lengths=kl, q_offset=kl - 3)[b:b + 1]
        torch.testing.assert_close(got, own)


def test_gradcheck_with_offsets_and_every_gradient():
    q, k, v = _qkv(B=2, Hq=2, Hkv=1, Sq=5, Sk=9, D=4, requires_grad=True)
    table = torch.randn(7, 2, dtype=F64, requires_grad=True)
    slopes = torch.tensor([0.2, 0.05], dtype=F64, requires_grad=True)
    span = torch.tensor([3.3, 6.6], dtype=F64, requires_grad=True)
    qo, ko = torch.tensor([7, -2]), torch.tensor([1, 3])

    def f(q, k, v, table, slopes, span):
        return fastattn.attention(q, k, v, causal=True, rel_bias=table, alibi_slopes=slopes, span=span,
                                  span_ramp=2.0, num_global=2, q_offset=qo, k_offset=ko)

    assert torch.autograd.gradcheck(f, (q, k, v, table, slopes, span))


def test_per_batch_alibi_slopes_forward():
    q, k, v = _qkv()
    slopes = torch.rand(2, 4, dtype=F64)
    torch.testing.assert_close(fastattn.attention(q, k, v, alibi_slopes=slopes, causal=True),
                               reference.attention(q, k, v, alibi_slopes=slopes, causal=True))
    # the same slopes for every batch row give the (Hq,) result
    torch.testing.assert_close(fastattn.attention(q, k, v, alibi_slopes=slopes[0].expand(2, 4)),
                               fastattn.attention(q, k, v, alibi_slopes=slopes[0]))


def _per_batch_slopes_call(**extra):
    """A call with (B, Hq) slopes and every per-batch input at once: key_lengths, offsets, a
    (B, Hq) span, a per-batch bool mask row and a shared float mask (both with B = 3)."""
    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, Sq, Sk = 3, 4, 2, 6, 9
    q = torch.randn(B, Hq, Sq, 5, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, 5, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, 4, generator=g, dtype=F64, requires_grad=True)
    slopes = (0.05 + torch.rand(B, Hq, generator=g, dtype=F64)).requires_grad_()
    table = torch.randn(7, Hq, generator=g, dtype=F64, requires_grad=True)
    span = (3.3 + 4 * torch.rand(B, Hq, generator=g, dtype=F64)).requires_grad_()
    mask = (0.3 * torch.randn(Hq, Sq, Sk, generator=g, dtype=F64)).requires_grad_()
    options = dict(causal=True, rel_bias=table, span=span, span_ramp=2.0, num_global=1, attn_mask=mask,
                   key_lengths=torch.tensor([9, 4, 7]), q_offset=torch.tensor([3, 0, 5]),
                   k_offset=torch.tensor([0, -1, 2]), **extra)
    return (q, k, v, slopes), options


def test_per_batch_alibi_slopes_gradient_against_the_reference():
    """(B, Hq) slopes get their gradient: the backward runs once per batch row (each row's
    per-distance sums), the rows' other gradients joined; every gradient equals the reference's."""
    (q, k, v, slopes), o = _per_batch_slopes_call()
    leaves = [q, k, v, slopes, o["rel_bias"], o["span"], o["attn_mask"]]
    out = fastattn.attention(q, k, v, alibi_slopes=slopes, **o)
    ref = reference.attention(q, k, v, alibi_slopes=slopes, **o)
    torch.testing.assert_close(out, ref)
    gy = torch.randn_like(out)
    got = torch.autograd.grad((out * gy).sum(), leaves)
    want = torch.autograd.grad((ref * gy).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "slopes", "table", "span", "mask"), got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    # bitwise the same on another run and thread count
    with torch.enable_grad():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            again = torch.autograd.grad((fastattn.attention(q, k, v, alibi_slopes=slopes, **o) * gy).sum(), leaves)
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_per_batch_alibi_slopes_gradcheck():
    (q, k, v, slopes), o = _per_batch_slopes_call()

    def f(q, k, v, slopes, table):
        return fastattn.attention(q, k, v, alibi_slopes=slopes, **{**o, "rel_bias": table})

    assert torch.autograd.gradcheck(f, (q, k, v, slopes, o["rel_bias"]))


def test_per_batch_alibi_slopes_gradient_with_dropout_raises():
    """Dropout draws its mask by batch index, which the per-row backward would renumber."""
    (q, k, v, slopes), o = _per_batch_slopes_call(dropout_p=0.2)
    out = fastattn.attention(q, k, v, alibi_slopes=slopes, **o)
    with pytest.raises(NotImplementedError, match=r"per-batch alibi_slopes \(B, Hq\) with dropout"):
        out.sum().backward()


@pytest.mark.parametrize("value", [2 ** 63 - 1, -2 ** 63, 2 ** 62, -(2 ** 61)])
def test_any_int64_offset_is_safe(value):
    """Offsets anywhere in int64 are clamped to +-2^60 (documented) and then exact: the result
    equals the reference at the clamped positions, with no overflow into "everything visible"
    or "nothing visible"."""
    q, k, v = _qkv(dtype=torch.float32)
    table = torch.randn(9, 4)
    clamped = max(min(value, 2 ** 60), -2 ** 60)
    for qo, ko in ((value, 0), (0, value), (value, value)):
        out, lse = torch.ops.fastattn.attention(*attention_op_args(
            q, k, v, window_left=5, window_right=5, rel_bias=table, num_global=2, causal=True,
            q_offset=torch.full((2,), qo), k_offset=torch.full((2,), ko)))
        want, want_lse = reference.attention(
            q, k, v, window=(5, 5), rel_bias=table, num_global=2, causal=True, return_lse=True,
            q_offset=clamped if qo == value else 0, k_offset=clamped if ko == value else 0)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_offsets_in_check_options_and_bad_input():
    q, k, v = _qkv()
    for bad, err in ((torch.tensor([1.0, 2.0]), TypeError), (torch.tensor([1, 2, 3]), ValueError),
                     (torch.tensor([[1, 2]]), ValueError), (torch.zeros(2, dtype=torch.int64, device="meta"), ValueError)):
        for name in ("q_offset", "k_offset"):
            with pytest.raises(err, match=name):
                fastattn.attention(q, k, v, **{name: bad})
    with pytest.raises(TypeError, match="q_offset"):
        fastattn.attention(q, k, v, q_offset=1.5)
    with pytest.raises(ValueError, match="q_offset"):
        fastattn.attention(q, k, v, q_offset=2 ** 64)
    with pytest.raises(ValueError, match="alibi_slopes"):
        fastattn.attention(q, k, v, alibi_slopes=torch.rand(3, 4, dtype=F64))


def test_opcheck_and_compile_with_offsets():
    q, k, v = _qkv(dtype=torch.float32, requires_grad=True)
    args = attention_op_args(q, k, v, causal=True, rel_bias=torch.randn(5, 4, requires_grad=True),
                             q_offset=torch.tensor([4, 30]), k_offset=torch.tensor([0, 9]))
    torch.library.opcheck(torch.ops.fastattn.attention.default, args)
    torch._dynamo.reset()

    def block(q, k, v, qo):
        return fastattn.attention(q * 1.0, k, v, causal=True, q_offset=qo).square().sum()

    qo = torch.tensor([18, 3])
    eager = block(q, k, v, qo)
    compiled = torch.compile(block, fullgraph=True)(q, k, v, qo)
    torch.testing.assert_close(compiled, eager)
