"""fastattn.attention_weights: the attention probabilities from the kernel's lse and one dense
pass, with every option, GQA and head selection; against fastattn.reference.attention_weights
and, independently, against the softmax of logits masked by conftest's dense rules (written
without reference.py); gradients (exact comparison and gradcheck), consistency with the
attention output, torch.compile, meta tensors, bad input.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import fastattn
from conftest import Case, case_id, dense_visibility_and_bias, make_inputs, pin_threads
from fastattn import reference

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16

_threads = pytest.fixture(autouse=True)(pin_threads)

OPTION_NAMES = ("rel_bias", "alibi_slopes", "span", "key_lengths", "scale")


def options(case: Case, inp: dict) -> dict:
    kw = {n: inp[n] for n in OPTION_NAMES if n in inp}
    return dict(kw, **case.options())


def spec_weights(case: Case, inp: dict) -> torch.Tensor:
    """softmax over the keys of the logits the spec defines, in float64: the scaled score,
    soft-capped, plus the dense bias; -inf where not visible; rows with no visible key 0."""
    f64 = lambda t: t.detach().double()  # noqa: E731
    q, k = f64(inp["q"]), f64(inp["k"])
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    opt = lambda n: f64(inp[n]) if isinstance(inp.get(n), torch.Tensor) else None  # noqa: E731
    visible, bias = dense_visibility_and_bias(
        B, Hq, Sq, Sk, causal=case.causal, window=case.window, rel_bias=opt("rel_bias"),
        alibi_slopes=opt("alibi_slopes"), span=opt("span"), span_ramp=case.span_ramp,
        num_global=case.num_global, key_lengths=inp.get("key_lengths"))
    scale = inp.get("scale", D ** -0.5)
    scale = float(scale.detach()) if isinstance(scale, torch.Tensor) else scale
    s = scale * torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(Hq // k.shape[1], 1))
    if case.softcap:
        s = case.softcap * torch.tanh(s / case.softcap)
    w = torch.softmax((s + bias).masked_fill(~visible, -math.inf), dim=-1)
    return torch.where(visible.any(-1, keepdim=True), w, torch.zeros((), dtype=F64))


CASES = [
    Case(B=2, Hq=4, Hkv=4, Sq=9, Sk=9, seed=1),
    Case(B=2, Hq=4, Hkv=2, Sq=7, Sk=12, causal=True, rel_bias=5, seed=2),
    Case(B=1, Hq=6, Hkv=1, Sq=12, Sk=12, window=(3, 1), alibi=True, seed=3),
    Case(B=2, Hq=4, Hkv=2, Sq=20, Sk=20, span="h", span_values=(2.5, 7.25), span_ramp=4.0, seed=4),
    Case(B=2, Hq=2, Hkv=1, Sq=15, Sk=15, span="bh", span_values=(1.5, 4.75, 9.5), span_ramp=3.0,
         num_global=2, window=(4, 4), seed=5),
    Case(B=2, Hq=2, Hkv=2, Sq=11, Sk=6, causal=True, key_lengths=(4, 0), seed=6),
    Case(B=2, Hq=4, Hkv=2, Sq=9, Sk=9, softcap=0.8, rel_bias=4, scale="tensor", seed=7),
    Case(B=1, Hq=4, Hkv=2, Sq=1, Sk=30, rel_bias=8, alibi=True, softcap=2.0, seed=8),
    Case(B=2, Hq=4, Hkv=2, Sq=13, Sk=13, causal=True, window=(6, 0), rel_bias=4, alibi=True,
         span="bh", span_values=(3.5, 8.25), span_ramp=2.0, num_global=1, key_lengths=(13, 9),
         scale=0.45, softcap=1.5, layout="bshd", seed=9),
]


@pytest.mark.parametrize("case", [replace(c, dtype=dt) for c in CASES for dt in (F64, F32, BF16)], ids=case_id)
def test_weights_against_reference_and_spec(case):
    dtype = case.dtype
    inp = make_inputs(case, requires_grad=False)
    kw = options(case, inp)
    got = fastattn.attention_weights(inp["q"], inp["k"], **kw)
    assert got.dtype == dtype and got.shape == (case.B, case.Hq, case.Sq, case.Sk)
    ref = reference.attention_weights(inp["q"], inp["k"], **kw)
    spec = spec_weights(case, inp)
    # float64: the kernel's lse is float32 (exp(s - lse) is off by up to ~|lse| 2^-24);
    # float32: the logits' own rounding too; bfloat16: the result's rounding (2^-9 relative).
    tol = {F64: 1e-6, F32: 1e-5, BF16: 2 ** -8}[dtype]
    torch.testing.assert_close(got.double(), ref.double(), atol=tol, rtol=tol)
    torch.testing.assert_close(got.double(), spec, atol=tol, rtol=tol)
    rows = got.double().sum(-1)
    empty = spec.sum(-1) == 0
    assert torch.equal(rows[empty], torch.zeros_like(rows[empty]))
    torch.testing.assert_close(rows[~empty], torch.ones_like(rows[~empty]), atol=tol * case.Sk, rtol=0)
    assert (got[spec == 0] == 0).all(), "a masked pair got a weight"


def test_weights_times_v_is_the_kernel_output():
    case = CASES[-1]
    inp = make_inputs(replace(case, dtype=F64), requires_grad=False)
    kw = options(case, inp)
    w = fastattn.attention_weights(inp["q"], inp["k"], **kw)
    out = fastattn.attention(inp["q"], inp["k"], inp["v"], **kw)
    torch.testing.assert_close(w @ inp["v"].repeat_interleave(2, 1), out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("heads", [[3], (0, 2), [3, 1, 1], torch.tensor([2, 0]), [], torch.tensor([], dtype=torch.int32)],
                         ids=["one", "tuple", "reversed-repeated", "tensor", "empty", "empty-tensor"])
def test_selected_heads(heads):
    case = Case(B=2, Hq=4, Hkv=2, Sq=6, Sk=8, dtype=F64, causal=True, rel_bias=3, alibi=True,
                span="bh", span_values=(1.5, 3.25, 6.5), span_ramp=2.0, seed=11)
    inp = make_inputs(case, requires_grad=False)
    kw = options(case, inp)
    full = fastattn.attention_weights(inp["q"], inp["k"], **kw)
    got = fastattn.attention_weights(inp["q"], inp["k"], heads=heads, **kw)
    idx = torch.as_tensor(heads, dtype=torch.int64)
    assert got.shape == (2, len(idx), 6, 8)
    # the heads' own tables, slopes, spans and kv heads: the same numbers as the full call
    torch.testing.assert_close(got, full[:, idx], atol=1e-15, rtol=0)
    torch.testing.assert_close(reference.attention_weights(inp["q"], inp["k"], heads=heads, **kw),
                               spec_weights(case, inp)[:, idx], atol=1e-12, rtol=0)


def test_no_grad_and_grad_paths_agree():
    # (without autograd the lse comes from a call with no value columns at all)
    case = Case(B=2, Hq=4, Hkv=2, Sq=9, Sk=11, causal=True, rel_bias=4, seed=12)
    inp = make_inputs(case)
    with torch.no_grad():
        a = fastattn.attention_weights(inp["q"], inp["k"], rel_bias=inp["rel_bias"], causal=True)
    b = fastattn.attention_weights(inp["q"], inp["k"], rel_bias=inp["rel_bias"], causal=True)
    assert b.requires_grad and not a.requires_grad
    torch.testing.assert_close(a, b.detach(), atol=0, rtol=0)


GRAD_CASES = [
    Case(B=2, Hq=4, Hkv=2, Sq=7, Sk=9, dtype=F64, causal=True, rel_bias=4, scale="tensor",
         key_lengths=(9, 5), seed=13),
    Case(B=2, Hq=2, Hkv=1, Sq=10, Sk=10, dtype=F64, span="bh", span_values=(2.5, 5.75),
         span_ramp=3.0, alibi=True, softcap=1.2, num_global=1, seed=14),
]


@pytest.mark.parametrize("heads", [None, [1, 0]], ids=["all", "heads"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
def test_gradients_against_reference(case, heads):
    inp = make_inputs(case)
    kw = options(case, inp)
    names = [n for n in ("q", "k", "rel_bias", "span", "scale") if isinstance(inp.get(n), torch.Tensor)
             and inp[n].requires_grad]
    g = torch.randn(case.B, 2 if heads else case.Hq, case.Sq, case.Sk,
                    generator=torch.Generator().manual_seed(case.seed), dtype=F64)
    got = torch.autograd.grad((fastattn.attention_weights(inp["q"], inp["k"], heads=heads, **kw) * g).sum(),
                              [inp[n] for n in names])
    exact = torch.autograd.grad((reference.attention_weights(inp["q"], inp["k"], heads=heads, **kw) * g).sum(),
                                [inp[n] for n in names])
    for n, a, e in zip(names, got, exact):
        assert e.abs().max() > 1e-3, f"{n}: the case does not exercise this gradient"
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6, msg=lambda m: f"grad {n}: {m}")


def test_gradcheck():
    case = Case(B=1, Hq=2, Hkv=1, Sq=4, Sk=6, Dqk=3, dtype=F64, causal=True, rel_bias=3,
                scale="tensor", seed=15)
    inp = make_inputs(case)
    names = ("q", "k", "rel_bias", "scale")

    def fn(q, k, table, scale):
        return fastattn.attention_weights(q, k, causal=True, rel_bias=table, scale=scale)

    # The kernel's lse is float32: a finite difference over eps carries its rounding,
    # up to |lse| 2^-24 / eps per weight; the step is large enough to keep that small, and the
    # second-order error of the central difference (~eps^2) smaller still.
    eps = 1e-3
    with torch.no_grad():
        lse = fastattn.attention(inp["q"], inp["k"], inp["v"], causal=True, rel_bias=inp["rel_bias"],
                                 scale=inp["scale"], return_lse=True)[1]
    atol = 4 * lse.abs().max().item() * 2 ** -24 / eps + 1e-5
    assert torch.autograd.gradcheck(fn, tuple(inp[n] for n in names), eps=eps, atol=atol, rtol=1e-3)


def test_compile_fullgraph_and_meta():
    torch._dynamo.reset()
    case = Case(B=2, Hq=4, Hkv=2, Sq=8, Sk=8, causal=True, rel_bias=4, softcap=2.0, seed=16)

    def f(q, k, table):
        w = fastattn.attention_weights(q, k, causal=True, rel_bias=table, softcap=2.0, heads=[3, 0])
        return (w * w).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        inp = make_inputs(case)
        loss = fn(inp["q"], inp["k"], inp["rel_bias"])
        results.append([loss, *torch.autograd.grad(loss, [inp["q"], inp["k"], inp["rel_bias"]])])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    q = torch.empty(2, 4, 5, 16, device="meta")
    k = torch.empty(2, 2, 7, 16, device="meta")
    w = fastattn.attention_weights(q, k, causal=True, heads=torch.tensor([1], device="meta"))
    assert w.device.type == "meta" and w.shape == (2, 1, 5, 7)


def test_bad_input():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8)
    for heads, exc, msg in [
        ([4], ValueError, r"heads must lie in \[0, 4\) \(the query heads\), got 4"),
        ([-1], ValueError, r"heads must lie in \[0, 4\) \(the query heads\), got -1"),
        (torch.tensor([0, 7]), ValueError, r"heads must lie in \[0, 4\).*got values in \[0, 7\]"),
        (torch.tensor([[0]]), ValueError, r"heads must be a 1-d tensor .* got shape \(1, 1\)"),
        (torch.tensor([0.0]), TypeError, "heads must hold integers, got a tensor of torch.float32"),
        ([True], TypeError, "heads must hold ints, got True"),
        ([1.0], TypeError, r"heads must hold ints, got float \(1.0\)"),
        (2, TypeError, "heads must be None, a list or tuple of ints or a 1-d integer tensor, got int"),
    ]:
        with pytest.raises(exc, match=msg):
            fastattn.attention_weights(q, k, heads=heads)
        with pytest.raises(exc, match=msg):
            reference.attention_weights(q, k, heads=heads)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        fastattn.attention_weights([1.0], k)
    with pytest.raises(ValueError, match=r"k must have 4 dimensions, got 3"):
        fastattn.attention_weights(q, k[0])
    # the options are checked by the attention op, as for fastattn.attention
    with pytest.raises(ValueError, match="window"):
        fastattn.attention_weights(q, k, window=(-2, 0))
    with pytest.raises(ValueError, match="softcap"):
        fastattn.attention_weights(q, k, softcap=-1.0)
    with pytest.raises(ValueError, match="rel_bias"):
        fastattn.attention_weights(q, k, rel_bias=torch.zeros(3, 5))
