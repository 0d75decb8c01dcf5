"""Logit soft-capping on the CPU: the scaled score s = scale * q.k becomes softcap * tanh(s / softcap)
before any bias (rel_bias table, ALiBi, the span's log-mask) and mask is applied.

Forward and gradients (q, k, v, rel_bias, span, a learnable scale, with and without a gradient
reaching lse) against fastattn.reference.attention and the dense formulation of conftest.py, in
float64, float32 and bfloat16, combined with every other option and at shapes that cross the
kernels' tiles (query blocks of 32, key tiles of 128: partial and full blocks, tiles with one
table row, with global pairs, decode steps); gradcheck; opcheck; torch.compile; a softcap large
enough to change nothing against one small enough to change everything; bad input.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import fastattn
from conftest import (Case, attention_backward_op_args, attention_op_args, case_id, check_case,
                      dense_sdpa_attention, make_inputs, pin_threads, run_attention)
from fastattn import reference

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16

_threads = pytest.fixture(autouse=True)(pin_threads)


# ---------------------------------------------------------------------------------------------
# softcap with every other option, against both references
# ---------------------------------------------------------------------------------------------
CASES = [
    # plain, the cap well inside the scores' range (most logits are capped hard)
    Case(B=2, Hq=2, Hkv=2, Sq=17, Sk=17, softcap=0.5, seed=1),
    Case(B=2, Hq=2, Hkv=2, Sq=17, Sk=17, dtype=F64, softcap=0.5, seed=1),
    # causal + rel_bias + a learnable scale, across query blocks and two key tiles
    Case(B=1, Hq=2, Hkv=2, Sq=150, Sk=150, causal=True, rel_bias=8, scale="tensor", softcap=2.0, seed=2),
    Case(B=1, Hq=2, Hkv=2, Sq=150, Sk=150, dtype=F64, causal=True, rel_bias=8, scale="tensor",
         softcap=2.0, seed=2),
    # long distances: tiles whose pairs all read one table row (the tile-sum path), full blocks
    Case(B=1, Hq=2, Hkv=1, Sq=64, Sk=320, rel_bias=4, softcap=3.0, scale=0.6, seed=3),
    # window + ALiBi + GQA
    Case(B=2, Hq=4, Hkv=2, Sq=70, Sk=70, window=(9, 3), alibi=True, softcap=1.5, seed=4),
    Case(B=2, Hq=4, Hkv=1, Sq=40, Sk=40, dtype=F64, window=(0, 5), alibi=True, rel_bias=6,
         softcap=1.5, seed=4),
    # adaptive span (per head and per (batch, head), on the ramp: span gradient checked)
    Case(B=2, Hq=4, Hkv=4, Sq=70, Sk=70, span="bh", span_values=(3.5, 20.25, 11.6), softcap=2.0,
         seed=5),
    Case(B=2, Hq=2, Hkv=2, Sq=40, Sk=40, dtype=F64, span="h", span_values=(3.5, 20.25), causal=True,
         rel_bias=5, scale="tensor", softcap=1.0, seed=5),
    # global tokens (per-element bias tiles) + window + table
    Case(B=2, Hq=4, Hkv=2, Sq=70, Sk=70, num_global=3, window=(5, 5), rel_bias=6, softcap=2.0, seed=6),
    Case(B=1, Hq=2, Hkv=1, Sq=40, Sk=40, dtype=F64, num_global=16, causal=True, softcap=0.7, seed=6),
    # key_lengths (an empty batch too) and Sq != Sk
    Case(B=2, Hq=2, Hkv=1, Sq=9, Sk=40, key_lengths=(31, 0), rel_bias=6, softcap=2.0, seed=7),
    Case(B=2, Hq=2, Hkv=2, Sq=40, Sk=23, causal=True, key_lengths=(14, 23), softcap=4.0,
         scale="tensor", seed=7),
    # decode steps: heads of a group packed into one task, scores by dot products
    Case(B=2, Hq=8, Hkv=2, Sq=1, Sk=300, rel_bias=16, softcap=2.0, seed=8),
    Case(B=1, Hq=1, Hkv=1, Sq=1, Sk=77, Dqk=16, Dv=16, alibi=True, softcap=1.0, seed=8),
    Case(B=1, Hq=6, Hkv=2, Sq=3, Sk=60, causal=True, span="h", span_values=(3.5, 20.25), softcap=1.0,
         seed=8),
    # Dqk != Dv, bshd strides, everything at once
    Case(B=2, Hq=4, Hkv=2, Sq=45, Sk=45, Dqk=16, Dv=8, layout="bshd", causal=True, window=(20, 0),
         rel_bias=6, alibi=True, span="bh", span_values=(12.5, 30.25), num_global=2,
         key_lengths=(45, 30), scale="tensor", softcap=2.5, seed=9),
    # low precision (the budget is the same math run in bfloat16)
    Case(B=1, Hq=2, Hkv=1, Sq=40, Sk=40, dtype=BF16, causal=True, rel_bias=6, softcap=2.0, seed=10),
    # a cap larger than any score: the kernel's tanh near 0 must be relatively accurate
    Case(B=1, Hq=2, Hkv=2, Sq=40, Sk=40, rel_bias=6, softcap=30.0, seed=11),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("lse_grad", (False, True), ids=("out_grad", "out_and_lse_grad"))
def test_softcap_against_references(case, lse_grad):
    fused = check_case(case, lse_grad=lse_grad)
    # The cap bounds every score: lse <= softcap + log(Sk) + the largest bias (the span's
    # log-mask and ALiBi only subtract).
    lse = fused["lse"][fused["lse"].isfinite()]
    assert lse.numel() > 0
    table = make_inputs(case, requires_grad=False).get("rel_bias")
    bias_max = max(table.max().item(), 0.0) if table is not None else 0.0
    assert lse.max().item() <= case.softcap + math.log(case.Sk) + bias_max + 1e-4


def test_softcap_applies_before_the_bias():
    """With a large bias the cap must not touch it: out = softmax(cap(s) + bias) V, not
    softmax(cap(s + bias)) V (the first is the reference's; the second would squash the bias)."""
    case = Case(B=1, Hq=2, Hkv=2, Sq=16, Sk=16, dtype=F64, rel_bias=4, softcap=0.5, seed=12)
    inp = make_inputs(case, requires_grad=False)
    table = inp["rel_bias"] * 20.0
    out = fastattn.attention(inp["q"], inp["k"], inp["v"], rel_bias=table, softcap=0.5)
    ref = reference.attention(inp["q"], inp["k"], inp["v"], rel_bias=table, softcap=0.5)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    # capping the biased logits instead gives something else entirely
    s = (inp["q"] @ inp["k"].transpose(-1, -2)) * case.Dqk ** -0.5
    d = torch.arange(16).view(16, 1) - torch.arange(16).view(1, 16)
    bias = table[(d.clamp(-3, 3) + 3)].permute(2, 0, 1)
    wrong = torch.softmax(0.5 * torch.tanh((s + bias) / 0.5), -1) @ inp["v"]
    assert (out - wrong).abs().max().item() > 0.1


# ---------------------------------------------------------------------------------------------
# the option is really applied: a cap far above the scores changes nothing, a small one a lot
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (F32, F64))
def test_large_softcap_equals_none_small_one_differs(dtype):
    case = Case(B=2, Hq=4, Hkv=2, Sq=70, Sk=70, dtype=dtype, causal=True, rel_bias=8, scale="tensor", seed=13)
    g = torch.Generator().manual_seed(14)
    grad_out = torch.randn(case.B, case.Hq, case.Sq, case.Dv, generator=g).to(dtype)
    res = {}
    for cap in (0.0, 1e4, 0.5):
        inp = make_inputs(case)
        res[cap] = run_attention(fastattn.attention, inp, replace(case, softcap=cap), grad_out)
    keys = ("out", "lse", "grad_q", "grad_k", "grad_v", "grad_rel_bias", "grad_scale")
    for key in keys:
        # Scores here are O(1): capping at 1e4 changes them by ~s^3 / 3e8, within float32
        # tolerance (float64 does see it, hence the same tolerance for both).
        torch.testing.assert_close(res[1e4][key], res[0.0][key], atol=1e-5, rtol=1e-4,
                                   msg=f"softcap=1e4 changed {key}")
    for key in ("out", "lse", "grad_q", "grad_k", "grad_rel_bias"):
        diff = (res[0.5][key] - res[0.0][key]).abs().max().item()
        scale = res[0.0][key].abs().max().item()
        assert diff > 0.05 * scale, f"softcap=0.5 left {key} nearly unchanged ({diff:.3g} vs max {scale:.3g})"
    # ... and the lse of a capped row is bounded by the cap: lse <= 0.5 + log(#keys) + max bias
    bias_max = make_inputs(case, requires_grad=False)["rel_bias"].max().item()
    assert res[0.5]["lse"].max().item() <= 0.5 + math.log(case.Sk) + bias_max + 1e-5


def test_softcap_scores_saturate():
    # Huge scores: every capped logit sits at +-softcap, so each row is a softmax of
    # +-softcap entries: finite, no NaN, and equal to the reference.
    g = torch.Generator().manual_seed(21)  # (seeded: the test must not depend on what ran before)
    q = torch.randn(1, 2, 20, 16, dtype=F64, generator=g) * 100
    k = torch.randn(1, 2, 20, 16, dtype=F64, generator=g) * 100
    v = torch.randn(1, 2, 20, 16, dtype=F64, generator=g)
    for dtype in (F32, F64):
        out, lse = fastattn.attention(q.to(dtype), k.to(dtype), v.to(dtype), softcap=3.0, return_lse=True)
        ref, ref_lse = reference.attention(q, k, v, softcap=3.0, return_lse=True)
        assert out.isfinite().all() and lse.isfinite().all()
        # float32: scores of ~1e4 carry ~1e-3 absolute rounding before the cap, ~1e-5 after it
        tol = 1e-5 if dtype == F64 else 5e-5
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.double(), ref_lse.double(), atol=2e-5, rtol=2e-5)
        assert lse.max().item() <= 3.0 + math.log(20) + 1e-5


def test_softcap_matches_dense_sdpa_directly():
    # the dense formulation alone (no check_case machinery), float64 end to end
    case = Case(B=2, Hq=4, Hkv=2, Sq=33, Sk=50, dtype=F64, causal=True, alibi=True, softcap=1.25, seed=15)
    inp = make_inputs(case, requires_grad=False)
    out, lse = fastattn.attention(inp["q"], inp["k"], inp["v"], causal=True, alibi_slopes=inp["alibi_slopes"],
                                  softcap=1.25, return_lse=True)
    ref, ref_lse = dense_sdpa_attention(inp["q"], inp["k"], inp["v"], causal=True,
                                        alibi_slopes=inp["alibi_slopes"], softcap=1.25)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=2e-6)


# ---------------------------------------------------------------------------------------------
# determinism: bitwise-equal results for 1 and 2 threads and between identical runs
# ---------------------------------------------------------------------------------------------
@pytest.mark.multithread
def test_softcap_backward_is_deterministic_across_thread_counts():
    case = Case(B=2, Hq=4, Hkv=2, Sq=129, Sk=129, Dqk=32, Dv=32, causal=True, rel_bias=64,
                span="bh", span_values=(20.5, 60.25), scale="tensor", softcap=2.0, seed=16)
    inp = make_inputs(case)
    g = torch.randn(case.B, case.Hq, case.Sq, case.Dv, generator=torch.Generator().manual_seed(1))
    runs = []
    for threads in (2, 1, 2):
        torch.set_num_threads(threads)
        runs.append(run_attention(fastattn.attention, inp, case, g))
    for key in ("out", "lse", "grad_q", "grad_k", "grad_v", "grad_rel_bias", "grad_span", "grad_scale"):
        assert all(torch.equal(runs[0][key], r[key]) for r in runs[1:]), f"{key} differs between runs"


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)
# ---------------------------------------------------------------------------------------------
GRADCHECK_CASES = [
    Case(B=1, Hq=2, Hkv=1, Sq=5, Sk=7, Dqk=4, Dv=3, dtype=F64, causal=True, rel_bias=3, scale="tensor",
         softcap=0.8),
    Case(B=2, Hq=2, Hkv=2, Sq=6, Sk=6, Dqk=4, Dv=4, dtype=F64, rel_bias=2, scale="tensor", alibi=True,
         span="bh", span_values=(1.5, 2.25), span_ramp=4.0, num_global=1, key_lengths=(6, 4), softcap=1.3),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=case_id)
def test_softcap_gradcheck(case):
    inp = make_inputs(case)
    # larger scores, so that the cap bends them
    inp["q"] = (inp["q"].detach() * 3).requires_grad_()
    names = [n for n in ("q", "k", "v", "rel_bias", "scale", "span") if isinstance(inp.get(n), torch.Tensor)]
    fixed = {n: inp[n] for n in ("alibi_slopes", "key_lengths") if n in inp}

    def fn(*tensors):  # (lse is float32 in every dtype: too coarse for finite differences)
        kw = dict(zip(names, tensors))
        return fastattn.attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **case.options(), **kw, **fixed)

    assert torch.autograd.gradcheck(fn, tuple(inp[n] for n in names))


# opcheck of the op and its backward with softcap: the soft-capped cases of
# test_attention.py's OPCHECK_CASES.


def test_softcap_op_backward_matches_autograd():
    # The op-level backward with softcap gives the gradients autograd gives through the reference.
    case = Case(B=1, Hq=2, Hkv=1, Sq=9, Sk=12, Dqk=8, Dv=8, dtype=F64, causal=True, rel_bias=4, softcap=0.7, seed=17)
    inp = make_inputs(case)
    args = attention_op_args(inp["q"].detach(), inp["k"].detach(), inp["v"].detach(), scale=0.5,
                             causal=True, rel_bias=inp["rel_bias"].detach(), softcap=0.7)
    out, lse = torch.ops.fastattn.attention(*args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    gq, gk, gv, gt, _, _ = torch.ops.fastattn.attention_backward(
        *attention_backward_op_args(grad_out, out, lse, None, args, need_span_grad=False))
    ref = reference.attention(inp["q"], inp["k"], inp["v"], scale=0.5, causal=True, rel_bias=inp["rel_bias"],
                              softcap=0.7)
    eq, ek, ev, et = torch.autograd.grad(ref, (inp["q"], inp["k"], inp["v"], inp["rel_bias"]), grad_out)
    for name, a, e in (("q", gq, eq), ("k", gk, ek), ("v", gv, ev), ("rel_bias", gt, et)):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-8, msg=f"grad_{name}")


# torch.compile(fullgraph=True) with softcap: test_attention.py's test_compile_fullgraph_forward_backward.


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _qkv():
    return torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 6)


@pytest.mark.parametrize("softcap", (-1.0, float("inf"), float("nan"), -1e-30, float("-inf")),
                         ids=("negative", "inf", "nan", "tiny-negative", "minus-inf"))
def test_bad_softcap_value_raises(softcap):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"\bsoftcap\b"):
        fastattn.attention(q, k, v, softcap=softcap)
    # a direct op call gets the same check (in C++)
    with pytest.raises(ValueError, match=r"^fastattn: softcap must be a finite number >= 0"):
        torch.ops.fastattn.attention(*attention_op_args(q, k, v, softcap=softcap))


@pytest.mark.parametrize("softcap", ("3", None, [1.0], torch.tensor(2.0), True),
                         ids=("str", "none", "list", "tensor", "bool"))
def test_bad_softcap_type_raises(softcap):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"\bsoftcap\b"):
        fastattn.attention(q, k, v, softcap=softcap)


def test_softcap_zero_is_off_and_int_is_accepted():
    q, k, v = _qkv()
    base = fastattn.attention(q, k, v)
    assert torch.equal(fastattn.attention(q, k, v, softcap=0.0), base)
    assert torch.equal(fastattn.attention(q, k, v, softcap=0), base)
    torch.testing.assert_close(fastattn.attention(q, k, v, softcap=2), fastattn.attention(q, k, v, softcap=2.0),
                               atol=0, rtol=0)
    assert not torch.equal(fastattn.attention(q, k, v, softcap=0.25), base)
