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


# ---- learned ALiBi slopes ---------------------------------------------------------------------
@pytest.mark.parametrize("Sq,Sk,rows", [(6, 9, 3), (9, 4, 21), (5, 5, 1), (1, 7, None)])
def test_alibi_slopes_get_their_gradient(Sq, Sk, rows):
    """Learned ALiBi slopes get d(loss)/d(slope) = -sum |d| dS (they got None): against the
    reference, with and without a table (short and long), and gradcheck."""
    q, k, v = _qkv(Sq=Sq, Sk=Sk)
    slopes = torch.tensor([0.5, 0.25], dtype=F64, requires_grad=True)
    table = torch.randn(rows, 2, dtype=F64, requires_grad=True) if rows else None
    q.requires_grad_()
    leaves = [q, slopes] + ([table] if rows else [])
    kw = dict(causal=Sq <= Sk, rel_bias=table)
    got = torch.autograd.grad(fastattn.attention(q, k, v, alibi_slopes=slopes, **kw).square().sum(), leaves)
    want = torch.autograd.grad(reference.attention(q, k, v, alibi_slopes=slopes, **kw).square().sum(), leaves)
    assert got[1].abs().max() > 1e-3  # a real gradient, not a zero
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda q, s, *t: fastattn.attention(q, k, v, alibi_slopes=s, causal=kw["causal"],
                                            rel_bias=t[0] if t else None), tuple(leaves))


def test_alibi_slopes_gradient_is_the_same_on_any_thread_count():
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Sq=300, Sk=300, D=16, dtype=F32)
    slopes = torch.tensor([0.05, 0.01], requires_grad=True)
    table = torch.randn(33, 2, requires_grad=True)
    before, grads = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = fastattn.attention(q, k, v, causal=True, alibi_slopes=slopes, rel_bias=table)
            grads.append(torch.autograd.grad(out.square().sum(), (slopes, table)))
    finally:
        torch.set_num_threads(before)
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


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


# ---- what the backward holds, and how it sums -------------------------------------------------
def _allocated_by(fn):
    """(bytes the CPU allocator handed out during fn(), fn's result): the sum of the leaf
    allocation events of the profiler (nothing is freed before fn returns its outputs)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    leaves = [e for e in prof.events() if e.cpu_memory_usage > 0 and not e.cpu_children]
    return sum(e.cpu_memory_usage for e in leaves), result


@pytest.mark.parametrize("threads", [1, 2])
def test_mqa_backward_partials_are_bounded_by_the_threads(threads):
    """MQA (one kv head, one batch): the dK / dV chunk partials run in rounds as wide as the
    threads, so the backward holds (threads + 1) fp32 planes of dK + dV, not one per chunk (16)."""
    from conftest import attention_backward_op_args, attention_op_args
    B, Hq, S, D = 1, 4, 2048, 64  # 64 query blocks: 16 chunks
    q, k, v = (t.bfloat16() for t in _qkv(B=B, Hq=Hq, Hkv=1, Sq=S, Sk=S, D=D, dtype=F32))
    args = attention_op_args(q, k, v, causal=True)
    out, lse = torch.ops.fastattn.attention(*args)
    grad_out = torch.randn_like(out)
    plane = S * 2 * D * 4  # fp32 dK + dV of the one kv head
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        allocated, grads = _allocated_by(lambda: torch.ops.fastattn.attention_backward(
            *attention_backward_op_args(grad_out, out, lse, None, args)))
    finally:
        torch.set_num_threads(before)
    outputs = sum(g.numel() * g.element_size() for g in grads)
    transient = allocated - outputs
    assert transient <= (threads + 1) * plane, (transient / plane, threads)


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_mqa_backward_is_bitwise_the_same_on_any_thread_count(dtype):
    """The round width follows the thread count; no sum's order may (16 chunks in rounds of 1,
    2, 3 and 5), with the table and span gradients too."""
    B, Hq, S, D = 1, 4, 544, 16  # 17 query blocks: 16 chunks
    q, k, v = (t.to(dtype).requires_grad_() for t in _qkv(B=B, Hq=Hq, Hkv=1, Sq=S, Sk=S, D=D, dtype=F32))
    table = torch.randn(33, Hq, requires_grad=True)
    span = torch.full((Hq,), 300.0, requires_grad=True)
    grad_out = torch.randn(B, Hq, S, D).to(dtype)

    def grads():
        out = fastattn.attention(q, k, v, causal=True, rel_bias=table, span=span, span_ramp=16)
        return torch.autograd.grad(out, (q, k, v, table, span), grad_out)

    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            results.append(grads())
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = torch.autograd.grad(reference.attention(q.double(), k.double(), v.double(), causal=True,
                                                  rel_bias=table.double(), span=span.double(), span_ramp=16),
                              (q, k, v, table, span), grad_out.double())
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-4, rtol=2e-4)
    for a, b in zip(results[0], ref):
        torch.testing.assert_close(a.double(), b.double(), **tol)


def test_table_gradient_partials_follow_the_sequence_not_the_table():
    """A long table and short sequences: the table-gradient partials are per distance (31 of
    them here), not per table row (2**20 - 1)."""
    from conftest import attention_backward_op_args, attention_op_args
    q, k, v = _qkv(B=4, Hq=8, Hkv=8, Sq=16, Sk=16, D=8, dtype=F32)
    table = torch.randn(2 ** 20 - 1, 8)
    args = attention_op_args(q, k, v, rel_bias=table)
    out, lse = torch.ops.fastattn.attention(*args)
    grad_out = torch.randn_like(out)
    allocated, grads = _allocated_by(lambda: torch.ops.fastattn.attention_backward(
        *attention_backward_op_args(grad_out, out, lse, None, args)))
    grad_table = grads[3]
    # the gradient itself ((2**20 - 1) x 8, double then float32) and little else
    assert allocated < (2 ** 20) * 8 * (8 + 4) + 2 ** 20, allocated
    q, k, v, table = (t.double().requires_grad_() for t in (q, k, v, table))
    want, = torch.autograd.grad(reference.attention(q, k, v, rel_bias=table), table, grad_out.double())
    torch.testing.assert_close(grad_table.double(), want, atol=1e-5, rtol=1e-5)


def test_float32_backward_at_a_head_dim_of_2_to_the_20():
    """Sums over a head dim of 2**20 are blocked: one sequential float32 sum lost most of dq's
    digits where dP - D cancels (values with a large common offset)."""
    D = 2 ** 20
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 2, D, generator=g) for _ in range(2))
    v = torch.randn(1, 1, 2, D, generator=g) + 100
    grad_out = torch.randn(1, 1, 2, D, generator=g)
    q.requires_grad_()
    dq, = torch.autograd.grad(fastattn.attention(q, k, v), q, grad_out)
    q64 = q.detach().double().requires_grad_()
    want, = torch.autograd.grad(reference.attention(q64, k.double(), v.double()), q64, grad_out.double())
    error = ((dq.double() - want).norm() / want.norm()).item()
    assert error < 3e-4, error  # one sequential sum over D: 1.7e-3


# ---- empty calls do no work ------------------------------------------------------------------
@pytest.mark.parametrize("q_shape,kv_shape", [
    ((1, 0, 2 ** 44, 8), (1, 1, 0, 8)),          # no query head: B * Hkv * 2**39 empty tasks
    ((2 ** 16, 0, 0, 8), (2 ** 16, 2 ** 31, 0, 8)),
])
def test_forward_without_query_rows_returns_at_once(q_shape, kv_shape):
    from conftest import attention_op_args
    q, k, v = torch.empty(q_shape), torch.empty(kv_shape), torch.empty(kv_shape)
    out, lse = torch.ops.fastattn.attention(*attention_op_args(q, k, v))
    assert out.shape == q_shape and lse.shape == q_shape[:3]


@pytest.mark.parametrize("q_shape,k_shape,v_shape,dtype", [
    ((2 ** 17, 0, 1, 0), (2 ** 17, 8, 65537, 0), (2 ** 17, 8, 65537, 0), torch.float16),
    ((1, 1, 0, 8), (1, 1, 0, 8), (1, 1, 0, 2 ** 31), F32),        # scratch of 32 x 2**31 floats
    ((1, 1, 1, 0), (1, 1, 2 ** 32, 0), (1, 1, 2 ** 32, 0), F32),  # Sq + Sk doubles of table scratch
])
def test_backward_with_an_empty_output_returns_zeros_at_once(q_shape, k_shape, v_shape, dtype):
    from conftest import attention_backward_op_args, attention_op_args
    q, k, v = torch.empty(q_shape, dtype=dtype), torch.empty(k_shape, dtype=dtype), torch.empty(v_shape, dtype=dtype)
    table = torch.randn(3, q_shape[1])
    args = attention_op_args(q, k, v, rel_bias=table)
    out = torch.empty(*q_shape[:3], v_shape[3], dtype=dtype)
    lse = torch.zeros(q_shape[:3])
    dq, dk, dv, dtable, _, _ = torch.ops.fastattn.attention_backward(
        *attention_backward_op_args(out, out, lse, None, args, need_span_grad=False))
    assert dq.shape == q_shape and dk.shape == k_shape and dv.shape == v_shape
    assert dtable.shape == table.shape and not dtable.any()
