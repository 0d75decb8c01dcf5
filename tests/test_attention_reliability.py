"""fastattn.attention where a training library most easily goes silently wrong: non-finite
inputs in masked positions, integer arguments at the ends of int64, options past the sequence,
non-finite options, and autograd it has no formula for (double backward, forward-mode AD),
which must raise instead of returning zeros. CPU here; the CUDA kernels get the same checks
through the emulator (tests/test_cuda_emulation.py)."""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fastattn
from fastattn import reference

F32, F64 = torch.float32, torch.float64


def _qkv(B=1, Hq=2, Hkv=2, Sq=6, Sk=6, D=8, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, s, D, generator=g, dtype=dtype) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))


# ---- autograd without a formula -------------------------------------------------------------
def test_double_backward_raises_instead_of_returning_zeros():
    q, k, v = _qkv()
    q.requires_grad_()
    out = fastattn.attention(q, k, v, causal=True)
    g, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    # The first derivative itself is right (create_graph only keeps the graph).
    want, = torch.autograd.grad(reference.attention(q, k, v, causal=True).square().sum(), q)
    torch.testing.assert_close(g.detach(), want)
    with pytest.raises(RuntimeError, match="no second derivative"):
        g.sum().backward()


def test_forward_mode_ad_raises_instead_of_a_zero_tangent():
    q, k, v = _qkv()
    t = torch.randn_like(q)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            fastattn.attention(fwAD.make_dual(q, t), k, v)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda a: fastattn.attention(a, k, v), (q,), (t,))


# ---- integer arguments at the ends of int64 -------------------------------------------------
@pytest.mark.parametrize("Sq,Sk", [(6, 6), (9, 4), (3, 8)])
@pytest.mark.parametrize("window", [(-1, sys.maxsize), (2 ** 62, 2 ** 62), (sys.maxsize, -1),
                                    (sys.maxsize, sys.maxsize)])
def test_window_bounds_past_the_sequence_are_unbounded(Sq, Sk, window):
    """A window bound at or past every distance means "unbounded on that side" (it overflowed
    the kernels' position arithmetic to "nothing visible")."""
    q, k, v = _qkv(Sq=Sq, Sk=Sk, dtype=F32)
    out, lse = fastattn.attention(q, k, v, window=window, return_lse=True)
    want, want_lse = reference.attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_global", [6, 7, 100, sys.maxsize])
@pytest.mark.parametrize("causal", [False, True])
def test_num_global_past_the_keys_makes_every_key_global(num_global, causal):
    q, k, v = _qkv(Sq=4, Sk=6)
    for t in (q, k, v):
        t.requires_grad_()
    out = fastattn.attention(q, k, v, num_global=num_global, causal=causal, window=(1, 0))
    want = reference.attention(q, k, v, num_global=num_global, causal=causal, window=(1, 0))
    torch.testing.assert_close(out, want)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_want = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g, g_want):
        torch.testing.assert_close(a, b)


def test_decoding_from_an_empty_cache_with_global_tokens_matches_the_full_pass():
    torch.manual_seed(0)
    m = fastattn.nn.MultiheadAttention(32, 4, causal=True, num_global=2, window=(2, 0)).double()
    x = torch.randn(2, 5, 32, dtype=F64)
    with torch.no_grad():
        full = m(x)
        cache, steps = {}, []
        for i in range(x.shape[1]):
            out, cache = m(x[:, i:i + 1], cache=cache)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


# ---- non-finite options ---------------------------------------------------------------------
@pytest.mark.parametrize("span", [[3.0, math.nan], [math.inf, 2.0], [1.0, -math.inf]],
                         ids=["nan", "inf", "-inf"])
def test_non_finite_span_raises(span):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"\bspan\b"):
        fastattn.attention(q, k, v, span=torch.tensor(span, dtype=F64))


@pytest.mark.parametrize("ramp", [math.inf, math.nan, -math.inf])
def test_non_finite_span_ramp_raises(ramp):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="span_ramp"):
        fastattn.attention(q, k, v, span=torch.tensor([3.0, 2.0], dtype=F64), span_ramp=ramp)


@pytest.mark.parametrize("name,value", [("softcap", math.inf), ("softcap", math.nan), ("scale", math.nan),
                                        ("scale", -math.inf)])
def test_non_finite_scalar_options_raise(name, value):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=name):
        fastattn.attention(q, k, v, **{name: value})


# ---- gradients the kernels do not compute ---------------------------------------------------
def test_alibi_slopes_requiring_grad_raise_instead_of_none():
    q, k, v = _qkv()
    q.requires_grad_()
    slopes = torch.tensor([0.5, 0.25], dtype=F64, requires_grad=True)
    out = fastattn.attention(q, k, v, alibi_slopes=slopes)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        out.sum().backward()
    # Fixed slopes (no grad) train the rest as before.
    out = fastattn.attention(q, k, v, alibi_slopes=slopes.detach())
    g, = torch.autograd.grad(out.sum(), q)
    want, = torch.autograd.grad(reference.attention(q, k, v, alibi_slopes=slopes.detach()).sum(), q)
    torch.testing.assert_close(g, want)


# ---- non-finite values in positions a row cannot see ------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("mask,key,hidden_rows", [
    (dict(causal=True), -1, slice(0, 5)),            # the last key: every row but the last
    (dict(window=(1, 0)), 0, slice(2, 6)),          # key 0: rows 2.. (window of 1 to the left)
    (dict(window=(1, 0), rel_bias=True), 0, slice(2, 6)),
], ids=["causal", "window", "window-table"])
def test_non_finite_hidden_key_leaves_other_rows_finite(bad, mask, key, hidden_rows):
    """A NaN or +inf in a key that a row cannot see must not reach that row (masked scores are
    selected away, not offset by -inf), forward and backward, as in the reference."""
    q, k, v = _qkv(Sq=6, Sk=6, dtype=F32)
    k[:, :, key, 0] = bad
    kw = dict(mask)
    if kw.pop("rel_bias", False):
        kw["rel_bias"] = torch.randn(5, 2)
    q.requires_grad_()
    v.requires_grad_()
    out, lse = fastattn.attention(q, k, v, return_lse=True, **kw)
    want, want_lse = reference.attention(q, k, v, return_lse=True, **kw)
    assert torch.isfinite(out[:, :, hidden_rows]).all() and torch.isfinite(lse[:, :, hidden_rows]).all()
    torch.testing.assert_close(out[:, :, hidden_rows], want[:, :, hidden_rows], atol=1e-5, rtol=1e-5)
    # The backward: finite wherever the reference's is (a row that sees the bad key has a
    # non-finite lse, whose products with zeros are NaN in both), and equal there.
    for got, ref in zip(torch.autograd.grad(out.sum(), (q, v)), torch.autograd.grad(want.sum(), (q, v))):
        finite = torch.isfinite(ref)
        assert torch.isfinite(got[finite]).all()
        torch.testing.assert_close(got[finite], ref[finite], atol=1e-5, rtol=1e-5)
