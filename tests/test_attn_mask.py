"""attn_mask: SDPA's dense mask (bool: True may attend; float: added to the logits), any
broadcast shape, read in place; against SDPA with the same mask and against reference.py with
every option; the float mask's gradient (its own shape, deterministic, gradcheck); checks,
opcheck, compile. CUDA through the emulator in tests/test_cuda_emulation.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from conftest import attention_op_args

F32, F64 = torch.float32, torch.float64
B, HQ, HKV, SQ, SK, D = 2, 4, 2, 37, 45, 8

SHAPES = [(B, HQ, SQ, SK), (1, HQ, SQ, SK), (B, 1, SQ, SK), (SQ, SK), (SK,), (B, 1, 1, SK), (HQ, 1, SK),
          (1, 1, 1, 1)]


def _qkv(dtype=F64, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, s, D, generator=g, dtype=dtype).requires_grad_(requires_grad)
                 for h, s in ((HQ, SQ), (HKV, SK), (HKV, SK)))


def _mask(shape, kind, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        m = torch.rand(shape, generator=g) < 0.7
        m[..., 0] = True  # every row keeps a key: SDPA gives NaN for a row it hides entirely
        return m
    m = torch.randn(shape, generator=g, dtype=dtype)
    return m.requires_grad_(kind == "float_grad")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["bool", "float", "float_grad"])
def test_against_sdpa(shape, kind):
    q, k, v = _qkv()
    m = _mask(shape, kind)
    out = fastattn.attention(q, k, v, attn_mask=m)
    sdpa_mask = m if m.dim() >= 2 else m.expand(SQ, SK)  # (SDPA takes no 1-d mask; the gradient sums back)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          attn_mask=sdpa_mask)
    torch.testing.assert_close(out, want)
    leaves = [q, k, v] + ([m] if m.requires_grad else [])
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b)
        assert a.shape == b.shape


@pytest.mark.parametrize("kind", ["bool", "float_grad"])
def test_combined_with_every_option(kind):
    q, k, v = _qkv()
    m = _mask((1, HQ, SQ, SK), kind)
    table = torch.randn(9, HQ, dtype=F64, requires_grad=True)
    span = torch.tensor([9.5, 20.0, 4.25, 30.0], dtype=F64, requires_grad=True)
    o = dict(causal=True, window=(20, 0), rel_bias=table, alibi_slopes=torch.rand(HQ, dtype=F64) * 0.1,
             span=span, span_ramp=4.0, num_global=2, key_lengths=torch.tensor([45, 30]), softcap=3.0,
             q_offset=torch.tensor([10, 3]), k_offset=torch.tensor([0, -2]))
    out = fastattn.attention(q, k, v, attn_mask=m, dropout_p=0.2, generator=torch.Generator().manual_seed(2), **o)
    seed = fastattn.functional.dropout_seed(0.2, torch.Generator().manual_seed(2), q)
    want = reference.attention(q, k, v, attn_mask=m, dropout_p=0.2, dropout_seed=seed, **o)
    torch.testing.assert_close(out, want)
    leaves = [t for t in (q, k, v, table, span, m) if t.requires_grad]
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b)


def test_mask_gradient_gradcheck_and_bitwise_on_any_thread_count():
    q, k, v = _qkv()
    m = torch.randn(HQ, SQ, SK, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, m: fastattn.attention(q, k, v, attn_mask=m, causal=True, rel_bias=torch.ones(3, HQ, dtype=F64)),
        (q[:, :, :6].detach().requires_grad_(), m[:, :6].detach().requires_grad_()))
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    m32 = torch.randn(1, 1, SQ, SK, requires_grad=True)  # summed over batch and heads
    grads, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            out = fastattn.attention(q32, k32, v32, attn_mask=m32, causal=True)
            grads.append(torch.autograd.grad(out.square().sum(), m32)[0])
    finally:
        torch.set_num_threads(before)
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


def test_a_hidden_key_never_reaches_a_row():
    """A NaN key hidden by a bool mask (or a -inf float mask) leaves the rows finite."""
    q, k, v = _qkv(requires_grad=False)
    k = k.clone()
    k[:, :, 5] = math.nan
    bmask = torch.ones(SQ, SK, dtype=torch.bool)
    bmask[:, 5] = False
    fmask = torch.zeros(SQ, SK, dtype=F64)
    fmask[:, 5] = -math.inf
    for m in (bmask, fmask):
        out = fastattn.attention(q, k, v, attn_mask=m)
        assert torch.isfinite(out).all()
    # a row the mask hides entirely gives zeros (lse -inf), as with every other mask
    bmask[3] = False
    out, lse = fastattn.attention(q, k, v, attn_mask=bmask, return_lse=True)
    assert (out[:, :, 3] == 0).all() and torch.isneginf(lse[:, :, 3]).all()


def test_expanded_views_are_read_in_place():
    q, k, v = _qkv(requires_grad=False)
    row = torch.randn(SK, dtype=F64)
    expanded = row.expand(B, HQ, SQ, SK)  # stride 0 on every dim but the last
    torch.testing.assert_close(fastattn.attention(q, k, v, attn_mask=expanded),
                               fastattn.attention(q, k, v, attn_mask=row))


def test_bad_masks_raise():
    q, k, v = _qkv(requires_grad=False)
    for bad, err in ((torch.ones(SQ, SK, dtype=torch.int64), TypeError), (torch.ones(3, SQ, SK), ValueError),
                     (torch.ones(SQ, SK + 1), ValueError), (torch.ones(1, 1, 1, SQ, SK), ValueError),
                     (torch.ones(SQ, SK, device="meta"), ValueError)):
        with pytest.raises(err, match="attn_mask"):
            fastattn.attention(q, k, v, attn_mask=bad)
    with pytest.raises(TypeError, match="attn_mask"):
        fastattn.attention(q, k, v, attn_mask=[[True]])


def test_opcheck_and_compile():
    q, k, v = _qkv(dtype=F32)
    m = torch.randn(1, HQ, SQ, SK, requires_grad=True)
    torch.library.opcheck(torch.ops.fastattn.attention.default, attention_op_args(q, k, v, attn_mask=m))
    torch._dynamo.reset()

    def block(q, k, v, m):
        return fastattn.attention(q * 1.0, k, v, attn_mask=m).square().sum()

    eager = torch.autograd.grad(block(q, k, v, m), m)[0]
    compiled = torch.autograd.grad(torch.compile(block, fullgraph=True)(q, k, v, m), m)[0]
    torch.testing.assert_close(compiled, eager)


def test_block_diagonal_mask_skips_hidden_tiles_and_matches_per_block_calls():
    """Documents packed in one row with a block-diagonal bool mask: tiles the mask hides entirely
    are skipped (no contribution, forward or backward), and each block equals its own call."""
    g = torch.Generator().manual_seed(5)
    lengths = [150, 3, 200, 60]
    S = sum(lengths)
    q, k, v = (torch.randn(1, 2, S, 16, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (doc[:, None] == doc[None, :]) & (torch.arange(S)[:, None] >= torch.arange(S)[None, :])
    out = fastattn.attention(q, k, v, attn_mask=mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        qs, ks, vs = (t.detach()[:, :, sl].requires_grad_() for t in (q, k, v))
        own = fastattn.attention(qs, ks, vs, causal=True)
        torch.testing.assert_close(out[:, :, sl], own)
        for a, b in zip(grads, torch.autograd.grad(own.square().sum(), (qs, ks, vs))):
            torch.testing.assert_close(a[:, :, sl], b)
        start += n
