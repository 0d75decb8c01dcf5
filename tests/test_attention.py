"""fastattn.attention (causal, rel_bias, alibi, key_lengths, GQA/MQA, Sq != Sk, Dqk != Dv,
scale, return_lse): forward and every gradient against fastattn.reference.attention and,
independently, against F.scaled_dot_product_attention with the bias/mask materialized here
(conftest.dense_sdpa_attention); gradcheck, determinism, opcheck, torch.compile, bad input.

Window / global / span options are covered by test_attention_masks.py.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from conftest import (attention_backward_op_args, attention_op_args, DEVICES, DEVICE_DTYPES, HAS_CUDA, Case, assert_close, case_id, check_case,
                      for_device, make_inputs, pin_threads, run_attention)

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

_threads = pytest.fixture(autouse=True)(pin_threads)

# ---------------------------------------------------------------------------------------------
# every combination of causal x rel_bias x alibi x key_lengths x heads x (Sq, Sk) x Dv
# ---------------------------------------------------------------------------------------------
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
SEQS = {"self": (17, 17), "kvcache": (9, 17), "sq_gt_sk": (17, 9)}  # Sq > Sk: top rows see no key under causal


def _combination_cases():
    cases = []
    for n, (causal, rel, alibi, kl, heads, seqs, dv_diff) in enumerate(itertools.product(
            (False, True), (False, True), (False, True), (False, True), HEADS, SEQS, (False, True))):
        Hq, Hkv = HEADS[heads]
        Sq, Sk = SEQS[seqs]
        cases.append(Case(
            B=2, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, Dqk=16, Dv=8 if dv_diff else 16, causal=causal,
            rel_bias=6 if rel else None, alibi=alibi, key_lengths=(Sk - 3, Sk) if kl else None,
            # scale and the lse gradient cycle through the grid so they meet every option
            scale=("default", 0.3, "tensor")[n % 3], seed=n))
    return cases


COMBINATION_CASES = _combination_cases()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", COMBINATION_CASES, ids=case_id)
def test_option_combinations(device, case):
    case = for_device(case, device)
    check_case(case, lse_grad=case.seed % 2 == 1)


# ---------------------------------------------------------------------------------------------
# sequence lengths x dtypes (pairwise with the options)
# ---------------------------------------------------------------------------------------------
def _shape_dtype_cases():
    cases = []
    for S, dtype in itertools.product((1, 17, 129), (F32, F64, BF16, F16)):
        i = len(cases)
        cases.append(Case(
            B=2, Hq=4, Hkv=(4, 2, 1)[i % 3], Sq=S, Sk=S, Dqk=32, Dv=(32, 16)[i % 2], dtype=dtype,
            causal=i % 2 == 0, rel_bias=(1, 8, 40)[i % 3], alibi=i % 4 == 1,
            key_lengths=(max(S - 5, 1), S) if i % 3 == 1 else None,
            scale=("default", "tensor")[i % 2], seed=100 + i))
    # decode / cross-attention shapes in every dtype
    for dtype, (Sq, Sk) in zip((F32, F64, BF16, F16), ((1, 129), (17, 129), (1, 17), (129, 17))):
        cases.append(Case(B=1, Hq=4, Hkv=2, Sq=Sq, Sk=Sk, Dqk=32, Dv=32, dtype=dtype, causal=True,
                          rel_bias=16, scale="tensor", seed=200 + len(cases)))
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _shape_dtype_cases(), ids=case_id)
def test_shapes_and_dtypes(device, case):
    if device != "cpu" and case.dtype not in DEVICE_DTYPES[device]:
        pytest.skip(f"{case.dtype} is not a {device} kernel dtype")
    check_case(for_device(case, device, keep_dtype=True), lse_grad=True)


# S = 1000: float32 only on the CPU, few cases (the references materialize (S, S) scores).
LONG_CASES = [
    Case(B=1, Hq=2, Hkv=2, Sq=1000, Sk=1000, Dqk=32, Dv=32, causal=True, rel_bias=128, seed=300),
    Case(B=2, Hq=2, Hkv=1, Sq=1000, Sk=1000, Dqk=32, Dv=16, alibi=True, key_lengths=(1000, 613),
         scale="tensor", seed=301),
    Case(B=1, Hq=2, Hkv=1, Sq=1, Sk=1000, Dqk=32, Dv=32, causal=True, rel_bias=128, seed=302),
]


@pytest.mark.multithread
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LONG_CASES, ids=case_id)
def test_long_sequence(device, case):
    check_case(for_device(case, device))


# ---------------------------------------------------------------------------------------------
# KV-cache decoding: a step equals the last rows of the full pass
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("new_tokens", (1, 5))
@pytest.mark.parametrize("opts", [
    dict(causal=True, rel_bias=8),
    dict(causal=True, alibi=True, key_lengths=(40, 33)),
    dict(causal=False, rel_bias=50, alibi=True),
], ids=["causal-rel", "causal-alibi-kl", "rel-alibi"])
def test_decode_step_equals_last_rows(device, new_tokens, opts):
    case = for_device(Case(B=2, Hq=4, Hkv=2, Sq=40, Sk=40, Dqk=16, Dv=16, seed=7, **opts), device)
    inp = make_inputs(case, requires_grad=False)
    kw = {n: inp[n] for n in ("rel_bias", "alibi_slopes", "key_lengths") if n in inp}
    full = fastattn.attention(inp["q"], inp["k"], inp["v"], causal=case.causal, **kw)
    step, lse = fastattn.attention(inp["q"][:, :, -new_tokens:], inp["k"], inp["v"],
                                   causal=case.causal, return_lse=True, **kw)
    _, full_lse = fastattn.attention(inp["q"], inp["k"], inp["v"], causal=case.causal, return_lse=True, **kw)
    tol = dict(atol=1e-6, rtol=1e-5) if case.dtype == F32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(step, full[:, :, -new_tokens:], **tol)
    torch.testing.assert_close(lse, full_lse[:, :, -new_tokens:], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# short queries (decode steps, short chunks): the CPU forward packs the query heads of a kv group
# that visit the same keys into one task, and scores single rows by dot products
# ---------------------------------------------------------------------------------------------
SHORT_QUERY_CASES = [
    # MQA, one row: 32 heads in one task's lanes, dot-product scores
    Case(B=1, Hq=32, Hkv=1, Sq=1, Sk=300, Dqk=64, Dv=64, causal=True, rel_bias=8, seed=70),
    # GQA, 3 rows x 8 heads = 24 lanes; head dims that are not a multiple of the vector width
    Case(B=2, Hq=16, Hkv=2, Sq=3, Sk=200, Dqk=33, Dv=20, alibi=True, key_lengths=(200, 57), seed=71),
    # 16 rows: two heads per task; windows and global tokens (global tiles get per-element bias)
    Case(B=1, Hq=8, Hkv=2, Sq=16, Sk=150, Dqk=16, Dv=16, window=(20, 0), num_global=3, rel_bias=30, seed=72),
    # per-head spans: heads whose key ranges differ go to separate tasks
    Case(B=2, Hq=8, Hkv=1, Sq=1, Sk=100, Dqk=16, Dv=16, span="h", span_values=(3.5, 20.25, 60.75), seed=73),
    # MHA, one row: the output kept as a row (o += P V); float16 and bfloat16 tiles are converted
    Case(B=2, Hq=3, Hkv=3, Sq=1, Sk=190, Dqk=64, Dv=64, dtype=F16, causal=True, rel_bias=40, seed=74),
    Case(B=2, Hq=3, Hkv=3, Sq=1, Sk=190, Dqk=24, Dv=40, dtype=BF16, alibi=True, seed=75),
    # one row, Dv not a multiple of the vector width: lanes for the output
    Case(B=1, Hq=2, Hkv=1, Sq=1, Sk=130, Dqk=20, Dv=12, rel_bias=5, scale="tensor", seed=76),
    # float64 (4 lanes per vector), Sq > Sk (the first row sees no key under causal)
    Case(B=1, Hq=6, Hkv=2, Sq=2, Sk=1, Dqk=18, Dv=18, dtype=F64, causal=True, seed=77),
    Case(B=1, Hq=6, Hkv=2, Sq=5, Sk=129, Dqk=18, Dv=8, dtype=F64, rel_bias=50, seed=78),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SHORT_QUERY_CASES, ids=case_id)
def test_short_queries(device, case):
    check_case(for_device(case, device), lse_grad=case.seed % 2 == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threads", (1, 3))
@pytest.mark.parametrize("case", [c for c in SHORT_QUERY_CASES if c.Hq > c.Hkv], ids=case_id)
def test_packed_heads_equal_heads_alone(device, threads, case):
    """Each query head's out and lse are bitwise those of a call on that head alone (its kv
    head, table column, slope, span): packing heads into one task changes speed, not results.
    On 3 threads the CPU packs fewer heads per task (enough tasks for every thread)."""
    case = for_device(case, device)
    inp = make_inputs(case, requires_grad=False)
    kw = {n: inp[n] for n in ("key_lengths", "scale") if n in inp}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = fastattn.attention(inp["q"], inp["k"], inp["v"], return_lse=True,
                                      rel_bias=inp.get("rel_bias"), alibi_slopes=inp.get("alibi_slopes"),
                                      span=inp.get("span"), **case.options(), **kw)
    finally:
        torch.set_num_threads(before)
    group = case.Hq // case.Hkv
    for h in range(case.Hq):
        hk = slice(h // group, h // group + 1)
        one = lambda name: inp[name][..., h:h + 1] if name in inp else None
        out_h, lse_h = fastattn.attention(inp["q"][:, h:h + 1], inp["k"][:, hk], inp["v"][:, hk],
                                          return_lse=True, rel_bias=one("rel_bias"),
                                          alibi_slopes=one("alibi_slopes"), span=one("span"),
                                          **case.options(), **kw)
        assert torch.equal(out_h, out[:, h:h + 1]), f"head {h}: out differs"
        assert torch.equal(lse_h, lse[:, h:h + 1]), f"head {h}: lse differs"


# ---------------------------------------------------------------------------------------------
# strided inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    Case(layout="bshd", Hq=4, Hkv=2, causal=True, rel_bias=6, seed=400),
    Case(layout="bshd", Hq=4, Hkv=1, Sq=5, Sk=33, Dv=8, alibi=True, key_lengths=(33, 20), seed=401),
    Case(layout="packed", Hq=4, Hkv=2, causal=True, rel_bias=6, scale="tensor", seed=402),
    Case(layout="packed", Hq=2, Hkv=2, Sq=129, Sk=129, seed=403),
    Case(layout="lastdim", Hq=4, Hkv=4, rel_bias=3, seed=404),
], ids=case_id)
def test_noncontiguous_inputs(device, case):
    case = for_device(case, device)
    inp = make_inputs(case, requires_grad=False)
    if case.layout in ("bshd", "packed"):
        assert not inp["q"].is_contiguous() and inp["q"].stride(-1) == 1
    check_case(case)


# ---------------------------------------------------------------------------------------------
# rows with no visible key, empty tensors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    Case(B=3, key_lengths=(0, 17, 5), rel_bias=4, seed=500),                # a whole batch padded away
    Case(Sq=17, Sk=9, causal=True, rel_bias=4, Hkv=2, seed=501),            # queries before the first key
    Case(B=2, Sq=3, Sk=12, key_lengths=(0, 0), alibi=True, scale="tensor", seed=502),  # nothing visible at all
], ids=case_id)
def test_fully_masked_rows(device, case):
    case = for_device(case, device)
    fused = check_case(case, lse_grad=True)
    out, lse = fused["out"].detach().cpu(), fused["lse"].detach().cpu()
    empty = torch.isneginf(lse)
    assert empty.any()
    assert (out[empty] == 0).all(), "rows with no visible key must be exactly 0"
    assert (fused["grad_q"].detach().cpu()[empty] == 0).all(), "no gradient reaches a query that sees no key"
    for name, t in fused.items():
        if t is not None and t.is_floating_point():
            assert not torch.isnan(t).any(), f"{name} has NaN"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,Sq,Sk", [(0, 5, 5), (2, 0, 5), (2, 5, 0), (2, 0, 0)])
def test_empty_tensors(device, B, Sq, Sk):
    case = for_device(Case(B=B, Hq=2, Hkv=1, Sq=Sq, Sk=Sk, rel_bias=3, scale="tensor", key_lengths=None), device)
    inp = make_inputs(case)
    out, lse = fastattn.attention(inp["q"], inp["k"], inp["v"], rel_bias=inp["rel_bias"],
                                  scale=inp["scale"], causal=True, return_lse=True)
    assert out.shape == (B, 2, Sq, case.Dv) and lse.shape == (B, 2, Sq)
    assert (out == 0).all() and torch.isneginf(lse).all()
    (out.float().sum() + 0 * lse.sum()).backward()
    for n in ("q", "k", "v", "rel_bias"):
        g = inp[n].grad
        assert g is None or ((g == 0).all() and g.shape == inp[n].shape), n


# ---------------------------------------------------------------------------------------------
# against SDPA without any materialized bias (the most common call)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", (False, True))
def test_plain_matches_sdpa(device, causal):
    case = for_device(Case(B=2, Hq=4, Hkv=4, Sq=65, Sk=65, Dqk=32, Dv=32, seed=600), device)
    inp = make_inputs(case, requires_grad=False)
    out = fastattn.attention(inp["q"], inp["k"], inp["v"], causal=causal)
    q, k, v = (inp[n].double().cpu() for n in ("q", "k", "v"))
    expect = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # Sq == Sk: top-left == bottom-right
    lowp = F.scaled_dot_product_attention(*(t.to(case.dtype) for t in (q, k, v)), is_causal=causal) \
        if case.dtype in (BF16, F16) else None
    assert_close("out vs F.scaled_dot_product_attention", out, expect, case.dtype, lowp)


# ---------------------------------------------------------------------------------------------
# scale
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", (0.3, 1.7, "tensor"))
def test_scale(device, scale):
    fused = check_case(for_device(Case(Hq=4, Hkv=2, causal=True, rel_bias=5, scale=scale, seed=700), device))
    if scale == "tensor":
        assert fused["grad_scale"].shape == ()


@pytest.mark.parametrize("device", DEVICES)
def test_scale_tensor_without_grad_equals_float(device):
    case = for_device(Case(rel_bias=5, seed=701), device)
    inp = make_inputs(case, requires_grad=False)
    a = fastattn.attention(inp["q"], inp["k"], inp["v"], rel_bias=inp["rel_bias"], scale=0.43)
    b = fastattn.attention(inp["q"], inp["k"], inp["v"], rel_bias=inp["rel_bias"],
                           scale=torch.tensor(0.43, device=case.device))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# NaN propagates as in the reference and does not crash
# ---------------------------------------------------------------------------------------------
def test_nan_propagates_like_reference():
    case = Case(B=1, Hq=2, Hkv=2, Sq=9, Sk=9, causal=True, rel_bias=4, seed=800)
    inp = make_inputs(case, requires_grad=False)
    q, k, v = inp["q"].clone(), inp["k"].clone(), inp["v"].clone()
    q[0, 0, 3, 0] = float("nan")   # one query row
    v[0, 1, 6, 2] = float("nan")   # one value row: reaches only queries that see key 6
    out = fastattn.attention(q, k, v, causal=True, rel_bias=inp["rel_bias"])
    ref = reference.attention(q, k, v, causal=True, rel_bias=inp["rel_bias"])
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN pattern differs from the reference"
    fin = ~torch.isnan(ref)
    torch.testing.assert_close(out[fin], ref[fin], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, tiny shapes)
# ---------------------------------------------------------------------------------------------
GRADCHECK_CASES = [
    Case(B=1, Hq=2, Hkv=2, Sq=5, Sk=5, Dqk=4, Dv=4, dtype=F64),
    Case(B=1, Hq=2, Hkv=1, Sq=4, Sk=6, Dqk=4, Dv=3, dtype=F64, causal=True, rel_bias=3, scale="tensor"),
    Case(B=2, Hq=2, Hkv=1, Sq=6, Sk=4, Dqk=3, Dv=4, dtype=F64, causal=True, alibi=True, rel_bias=2,
         key_lengths=(3, 4)),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=case_id)
def test_gradcheck(case):
    inp = make_inputs(case)
    names = [n for n in ("q", "k", "v", "rel_bias", "scale") if isinstance(inp.get(n), torch.Tensor)]
    fixed = {n: inp[n] for n in ("alibi_slopes", "key_lengths") if n in inp}
    if isinstance(inp.get("scale"), float):
        fixed["scale"] = inp["scale"]

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        return fastattn.attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), causal=case.causal, **kw, **fixed)

    assert torch.autograd.gradcheck(fn, tuple(inp[n] for n in names))


# ---------------------------------------------------------------------------------------------
# determinism: two backward passes give bitwise-equal gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.multithread
@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    case = for_device(Case(B=2, Hq=8, Hkv=2, Sq=129, Sk=129, Dqk=32, Dv=32, causal=True, rel_bias=64,
                           scale="tensor", seed=900), device)
    inp = make_inputs(case)
    g = torch.randn(case.B, case.Hq, case.Sq, case.Dv, generator=torch.Generator().manual_seed(1)).to(case.device, case.dtype)
    runs = [run_attention(fastattn.attention, inp, case, g) for _ in range(3)]
    for key in ("out", "lse", "grad_q", "grad_k", "grad_v", "grad_rel_bias", "grad_scale"):
        assert all(torch.equal(runs[0][key], r[key]) for r in runs[1:]), f"{key} differs between identical runs"


# ---------------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, autograd registration, AOT dispatch)
# ---------------------------------------------------------------------------------------------
def _op_args(case: Case, requires_grad: bool):
    inp = make_inputs(case, requires_grad=requires_grad)
    st = inp.get("scale") if isinstance(inp.get("scale"), torch.Tensor) else None
    return attention_op_args(inp["q"], inp["k"], inp["v"], scale=case.Dqk ** -0.5, scale_tensor=st,
                             causal=case.causal, rel_bias=inp.get("rel_bias"),
                             alibi_slopes=inp.get("alibi_slopes"), span=inp.get("span"),
                             key_lengths=inp.get("key_lengths"), softcap=case.softcap)


OPCHECK_CASES = [
    Case(B=1, Hq=2, Hkv=1, Sq=5, Sk=7, Dqk=8, Dv=4, causal=True, rel_bias=3, scale="tensor"),
    Case(B=2, Hq=2, Hkv=2, Sq=6, Sk=6, Dqk=8, Dv=8, alibi=True, key_lengths=(4, 0)),
    # soft-capped
    Case(B=1, Hq=2, Hkv=1, Sq=5, Sk=7, Dqk=8, Dv=4, causal=True, rel_bias=3, scale="tensor", softcap=1.5),
    Case(B=2, Hq=2, Hkv=2, Sq=6, Sk=6, Dqk=8, Dv=8, alibi=True, span="h", span_values=(2.5,),
         key_lengths=(4, 0), softcap=0.5),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=case_id)
def test_opcheck_attention(case):
    torch.library.opcheck(torch.ops.fastattn.attention.default, _op_args(case, requires_grad=True))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=case_id)
@pytest.mark.parametrize("with_grad_lse", (False, True))
def test_opcheck_attention_backward(case, with_grad_lse):
    args = _op_args(case, requires_grad=False)
    out, lse = torch.ops.fastattn.attention(*args)
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(out.shape, generator=g).to(out.dtype)
    grad_lse = torch.randn(lse.shape, generator=g) if with_grad_lse else None
    torch.library.opcheck(torch.ops.fastattn.attention_backward.default,
                          attention_backward_op_args(grad_out, out, lse, grad_lse, args,
                                                     need_rel_bias_grad=case.rel_bias is not None,
                                                     need_span_grad=case.span is not None))


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break, same numbers, forward and backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("softcap,seed", [(0.0, 1000), (1.5, 1001)], ids=["plain", "softcap"])
def test_compile_fullgraph_forward_backward(softcap, seed):
    torch._dynamo.reset()
    case = Case(B=2, Hq=4, Hkv=2, Sq=17, Sk=17, Dqk=16, Dv=16, causal=True, rel_bias=6,
                scale="tensor", key_lengths=(17, 11), seed=seed)

    def block(q, k, v, table, scale, key_lengths):
        out = fastattn.attention(q * 1.0, k, v, causal=True, rel_bias=table, scale=scale,
                                 key_lengths=key_lengths, softcap=softcap)
        return (out * out).sum()

    compiled = torch.compile(block, fullgraph=True)
    results = []
    for f in (block, compiled):
        inp = make_inputs(case)
        loss = f(inp["q"], inp["k"], inp["v"], inp["rel_bias"], inp["scale"], inp["key_lengths"])
        loss.backward()
        results.append([loss] + [inp[n].grad for n in ("q", "k", "v", "rel_bias", "scale")])
    for name, a, b in zip(("loss", "q", "k", "v", "rel_bias", "scale"), *results):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"compiled {name} differs from eager")
    if softcap:  # and the cap was applied inside the compiled graph too
        inp = make_inputs(case)
        uncapped = fastattn.attention(inp["q"], inp["k"], inp["v"], causal=True, rel_bias=inp["rel_bias"],
                                      scale=inp["scale"], key_lengths=inp["key_lengths"])
        assert abs((uncapped * uncapped).sum().item() - results[1][0].item()) > 1e-3


# ---------------------------------------------------------------------------------------------
# bad input: ValueError / TypeError naming the argument
# ---------------------------------------------------------------------------------------------
def _t(*shape, dtype=F32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


Q, K, V = (2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 6)
BAD_INPUTS = [
    # (id, kwargs overriding the good call, exception, the argument the message must name)
    ("q-rank", dict(q=_t(4, 5, 8)), ValueError, "q"),
    ("k-rank", dict(k=_t(2, 2, 7, 8, 1)), ValueError, "k"),
    ("v-rank", dict(v=_t(2, 7, 6)), ValueError, "v"),
    ("q-not-tensor", dict(q=[[1.0]]), TypeError, "q"),
    ("q-int", dict(q=torch.ones(Q, dtype=torch.int32)), TypeError, "q"),
    ("k-dtype", dict(k=_t(*K, dtype=F64)), TypeError, "k"),
    ("v-dtype", dict(v=_t(*V, dtype=F16)), TypeError, "v"),
    ("k-device", dict(k=_t(*K, device="meta")), ValueError, "k"),
    ("v-device", dict(v=_t(*V, device="meta")), ValueError, "v"),
    ("batch", dict(k=_t(3, 2, 7, 8), v=_t(3, 2, 7, 6)), ValueError, "batch"),
    ("v-heads", dict(v=_t(2, 1, 7, 6)), ValueError, "v"),
    ("v-seqlen", dict(v=_t(2, 2, 6, 6)), ValueError, "v"),
    ("head-dim", dict(k=_t(2, 2, 7, 4)), ValueError, "k"),
    ("hq-mod-hkv", dict(k=_t(2, 3, 7, 8), v=_t(2, 3, 7, 6)), ValueError, "heads"),
    ("rel_bias-heads", dict(rel_bias=_t(5, 3)), ValueError, "rel_bias"),
    ("rel_bias-even-rows", dict(rel_bias=_t(4, 4)), ValueError, "rel_bias"),
    ("rel_bias-rank", dict(rel_bias=_t(5)), ValueError, "rel_bias"),
    ("rel_bias-device", dict(rel_bias=_t(5, 4, device="meta")), ValueError, "rel_bias"),
    ("rel_bias-int", dict(rel_bias=torch.ones(5, 4, dtype=torch.int64)), TypeError, "rel_bias"),
    ("alibi-shape", dict(alibi_slopes=_t(3)), ValueError, "alibi_slopes"),
    ("alibi-rank", dict(alibi_slopes=_t(4, 1)), ValueError, "alibi_slopes"),
    ("scale-shape", dict(scale=_t(1)), ValueError, "scale"),
    ("scale-type", dict(scale="0.5"), TypeError, "scale"),
    ("scale-device", dict(scale=torch.tensor(0.5, device="meta")), ValueError, "scale"),
    ("window-below-1", dict(window=(-2, 0)), ValueError, "window"),
    ("window-type", dict(window=(1.5, 0)), TypeError, "window"),
    ("window-len", dict(window=(1, 2, 3)), TypeError, "window"),
    ("key_lengths-float", dict(key_lengths=_t(2)), TypeError, "key_lengths"),
    ("key_lengths-shape", dict(key_lengths=torch.tensor([3, 4, 5])), ValueError, "key_lengths"),
    ("key_lengths-device", dict(key_lengths=torch.tensor([3, 4], device="meta")), ValueError, "key_lengths"),
    ("num_global-negative", dict(num_global=-1), ValueError, "num_global"),
    ("span-negative", dict(span=torch.tensor([1.0, -0.5, 2.0, 3.0])), ValueError, "span"),
]


@pytest.mark.parametrize("override,exc,argname", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(override, exc, argname):
    call = dict(q=_t(*Q), k=_t(*K), v=_t(*V))
    call.update(override)
    q, k, v = call.pop("q"), call.pop("k"), call.pop("v")
    with pytest.raises(exc, match=rf"\b{argname}\b"):
        fastattn.attention(q, k, v, **call)


def test_numpy_scalars_are_accepted_like_python_ones():
    # Any integral number where an int is expected, any real one where a float is (numpy's
    # scalars, as configs and sweeps produce them); the result is the Python scalars' own.
    np = pytest.importorskip("numpy")
    q, k, v = _t(*Q), _t(*K), _t(*V)
    span = torch.tensor([1.0, 2.5, 4.0, 6.0])
    want = fastattn.attention(q, k, v, window=(3, 1), num_global=2, span=span, span_ramp=2.0,
                              softcap=5.0, scale=0.25)
    for ints, reals in ((np.int64, np.float64), (np.int32, np.float32), (np.uint8, np.float16)):
        got = fastattn.attention(q, k, v, window=(ints(3), ints(1)), num_global=ints(2), span=span,
                                 span_ramp=reals(2.0), softcap=reals(5.0), scale=reals(0.25))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    got = fastattn.attention(q, k, v, window=[np.int64(3), 1], num_global=2, span=span,
                             span_ramp=np.int64(2), softcap=np.int16(5), scale=0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("override,exc,argname", [
    (dict(window=(2 ** 63, 0)), ValueError, "window"),
    (dict(window=(0, 2 ** 64)), ValueError, "window"),
    (dict(window=(-2 ** 63 - 1, 0)), ValueError, "window"),
    (dict(num_global=2 ** 63), ValueError, "num_global"),
    (dict(window=(True, 0)), TypeError, "window"),
    (dict(num_global=False), TypeError, "num_global"),
    (dict(num_global=2.0), TypeError, "num_global"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(span_ramp=10 ** 400, span=torch.ones(4)), ValueError, "span_ramp"),
], ids=["window-2**63", "window-2**64", "window-below-int64", "num_global-2**63", "window-bool",
        "num_global-bool", "num_global-float", "softcap-bool", "span_ramp-huge-int"])
def test_scalars_out_of_int64_or_of_the_wrong_kind_raise_naming_the_argument(override, exc, argname):
    with pytest.raises(exc, match=rf"fastattn: {argname}\b"):
        fastattn.attention(_t(*Q), _t(*K), _t(*V), **override)


def test_numpy_scalars_of_the_wrong_kind_raise_naming_the_argument():
    np = pytest.importorskip("numpy")
    for override, exc, argname in ((dict(window=(np.float64(1.0), 0)), TypeError, "window"),
                                   (dict(window=(np.bool_(True), 0)), TypeError, "window"),
                                   (dict(num_global=np.float32(1.0)), TypeError, "num_global"),
                                   (dict(softcap=np.bool_(False)), TypeError, "softcap"),
                                   (dict(window=(np.uint64(2 ** 63), 0)), ValueError, "window")):
        with pytest.raises(exc, match=rf"fastattn: {argname}\b"):
            fastattn.attention(_t(*Q), _t(*K), _t(*V), **override)


def test_good_call_of_bad_input_table_runs():
    # The base call of the table above is valid (so each row tests only its own mistake).
    out = fastattn.attention(_t(*Q), _t(*K), _t(*V), rel_bias=_t(5, 4), alibi_slopes=_t(4).abs(),
                             key_lengths=torch.tensor([3, 7]), scale=torch.tensor(0.5), num_global=7)
    assert out.shape == (2, 4, 5, 6)


# A direct torch.ops call gets the same checks (the op's own, in C++) as fastattn.attention:
# the kernels never see shapes they would read out of bounds.
def _op_call(**override):
    a = dict(q=_t(*Q), k=_t(*K), v=_t(*V), scale=0.5)
    a.update(override)
    return torch.ops.fastattn.attention(*attention_op_args(a.pop("q"), a.pop("k"), a.pop("v"), **a))


@pytest.mark.parametrize("override", [
    dict(q=_t(4, 5, 8)),
    dict(k=_t(2, 3, 7, 8), v=_t(2, 3, 7, 6)),
    dict(v=_t(2, 2, 5, 6)),
    dict(k=_t(2, 2, 7, 4)),
    dict(rel_bias=_t(5, 2)),
    dict(alibi_slopes=_t(2)),
    dict(span=_t(3).abs()),
    dict(key_lengths=torch.tensor([3])),
    dict(k=_t(1, 2, 7, 8), v=_t(1, 2, 7, 6)),
], ids=["q-rank", "hq-mod-hkv", "v-seqlen", "head-dim", "rel_bias-heads", "alibi-shape", "span-shape",
        "key_lengths-shape", "batch"])
def test_op_level_checks(override):
    with pytest.raises(ValueError, match="fastattn"):
        _op_call(**override)


# The messages hold numbers, shapes and dtypes, formatted without iostreams (fa_message in
# csrc/common/checks.h) into the text c10::str would give.
@pytest.mark.parametrize("override,exc,message", [
    (dict(q=_t(4, 5, 8)), ValueError, "fastattn: q must have 4 dimensions, got 3 (shape [4, 5, 8])"),
    (dict(k=_t(2, 3, 7, 8), v=_t(2, 3, 7, 6)), ValueError,
     "fastattn: q's heads (4) must be a multiple of k/v's heads (3)"),
    (dict(window_left=-3), ValueError, "fastattn: window entries must be >= -1 (-1 = unbounded), got (-3, -1)"),
    (dict(span=_t(4).abs(), span_ramp=-0.5), ValueError, "fastattn: span_ramp must be a finite number > 0, got -0.5"),
    (dict(span=_t(4).abs(), span_ramp=-1e-7), ValueError, "fastattn: span_ramp must be a finite number > 0, got -1e-07"),
    (dict(k=_t(*K, dtype=torch.float64)), TypeError, "fastattn: k must have the same dtype as q (Float), got Double"),
    (dict(key_lengths=torch.tensor([3.0, 4.0])), TypeError, "fastattn: key_lengths must be int64 or int32, got Float"),
    (dict(softcap=-1.0), ValueError, "fastattn: softcap must be a finite number >= 0 (0 = off), got -1"),
], ids=["rank-and-shape", "heads", "negative-ints", "double", "double-exponent", "dtypes",
        "key_lengths-dtype", "softcap-negative"])
def test_op_level_check_messages(override, exc, message):
    with pytest.raises(exc) as info:
        _op_call(**override)
    assert str(info.value).splitlines()[0] == message


# A call mixing a meta tensor with CPU tensors must not reach the fake (meta) kernel and come back
# as uninitialized memory: in inference mode no Autograd kernel checks the arguments first.
_MIXED_DEVICE_CALLS = [
    ("k", dict(k=_t(*K, device="meta"))),
    ("v", dict(v=_t(*V, device="meta"))),
    ("q", dict(q=_t(*Q, device="meta"))),
    ("rel_bias", dict(rel_bias=_t(5, 4, device="meta"))),
    ("alibi_slopes", dict(alibi_slopes=_t(4, device="meta"))),
    ("span", dict(span=_t(4, device="meta").abs())),
    ("key_lengths", dict(key_lengths=torch.tensor([3, 4], device="meta"))),
    ("scale", dict(scale=None, scale_tensor=torch.tensor(0.5, device="meta"))),
]


@pytest.mark.parametrize("inference", (False, True), ids=("grad-mode", "inference-mode"))
@pytest.mark.parametrize("name,override", _MIXED_DEVICE_CALLS, ids=[c[0] for c in _MIXED_DEVICE_CALLS])
def test_op_call_mixing_devices_raises(name, override, inference):
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx, pytest.raises(ValueError, match=rf"fastattn: {'k' if name == 'q' else name}\b.*device"):
        _op_call(**override)


@pytest.mark.parametrize("inference", (False, True), ids=("grad-mode", "inference-mode"))
def test_op_backward_call_mixing_devices_raises(inference):
    q, k, v = _t(*Q), _t(*K), _t(*V)
    args = attention_op_args(q, k, v, scale=0.5)
    out, lse = torch.ops.fastattn.attention(*args)
    grad_out = torch.randn_like(out)
    ctx = torch.inference_mode() if inference else torch.no_grad()
    for name, call in (("grad_out", (grad_out.to("meta"), out, lse, None)),
                       ("out", (grad_out, out.to("meta"), lse, None)),
                       ("lse", (grad_out, out, lse.to("meta"), None)),
                       ("grad_lse", (grad_out, out, lse, lse.to("meta"))),
                       ("k", (grad_out, out, lse, None))):
        call_args = args if name != "k" else attention_op_args(q, k.to("meta"), v, scale=0.5)
        with ctx, pytest.raises(ValueError, match=rf"fastattn: {name}\b.*device"):
            torch.ops.fastattn.attention_backward(*attention_backward_op_args(*call, call_args))


def test_op_call_with_a_cpu_scale_tensor_on_any_device_runs():
    # A 0-dim CPU scale is read on the host: allowed with q on any device (here meta).
    q = _t(*Q, device="meta")
    k, v = _t(*K, device="meta"), _t(*V, device="meta")
    with torch.inference_mode():
        out, lse = torch.ops.fastattn.attention(*attention_op_args(q, k, v, scale_tensor=torch.tensor(0.5)))
    assert out.device.type == "meta" and out.shape == (2, 4, 5, 6)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fastattn")
def test_cuda_unsupported_head_dim_raises():
    q = torch.randn(1, 2, 8, 264, device="cuda", dtype=BF16)  # > 256: unsupported on CUDA
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)head.?dim|Dqk|\b264\b"):
        fastattn.attention(q, q, q)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fastattn")
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_cuda_backward_many_key_blocks(causal):
    """The CUDA backward adds each key block's share of dQ into an fp32 buffer in a fixed turn
    order (attention_bwd_kernel.cuh). With eight key blocks of 128 per query block, many of
    them running at once, the gradients are right and bitwise equal across calls."""
    case = Case(B=2, Hq=8, Hkv=2, Sq=1024, Sk=1024, Dqk=128, Dv=128, dtype=BF16, causal=causal,
                rel_bias=100, device="cuda", seed=4242)
    check_case(case, against=("sdpa",))
    inp = make_inputs(case)
    g = torch.randn(case.B, case.Hq, case.Sq, case.Dv, generator=torch.Generator().manual_seed(3)).to("cuda", BF16)
    runs = [run_attention(fastattn.attention, inp, case, g) for _ in range(3)]
    for key in ("grad_q", "grad_k", "grad_v", "grad_rel_bias"):
        assert all(torch.equal(runs[0][key], r[key]) for r in runs[1:]), f"{key} differs between identical runs"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fastattn")
@pytest.mark.parametrize("parts", ("0", "1", "5", "300"), ids=("auto", "unsplit", "parts5", "parts300"))
@pytest.mark.parametrize("case", [
    # a decode step with a table (per head: not folded), a short prompt over a long cache with
    # global keys and a window (visited tiles with a gap), a GQA decode step (folded into
    # query rows) with padded batches
    Case(B=1, Hq=4, Hkv=4, Sq=1, Sk=5000, Dqk=128, Dv=128, dtype=BF16, rel_bias=200, device="cuda"),
    Case(B=1, Hq=2, Hkv=1, Sq=20, Sk=3000, Dqk=64, Dv=64, dtype=F16, causal=True, num_global=4,
         window=(700, 0), alibi=True, device="cuda"),
    Case(B=3, Hq=16, Hkv=2, Sq=1, Sk=4100, Dqk=96, Dv=96, dtype=BF16, key_lengths=(4100, 0, 333),
         device="cuda"),
    Case(B=1, Hq=8, Hkv=1, Sq=1, Sk=2500, Dqk=64, Dv=64, dtype=F32, scale="tensor", device="cuda"),
], ids=case_id)
def test_cuda_split_kv_forward(case, parts):
    """Split-KV forward (kv_splits: 0 = the host's choice, 1 = off, more parts than key tiles =
    empty parts) and GQA decode steps folded into query rows, on the GPU: out, lse and
    gradients against both references."""
    with fastattn.tuning.cuda_tuning(kv_splits=int(parts)):
        check_case(case, lse_grad=True)


def test_autograd_records_only_when_needed():
    """The ops' C++ Autograd kernels call the kernel directly when autograd will not record the
    call (no input requires grad, or grad mode is off) and build a node otherwise, for any
    differentiable input, the fixed alibi slopes included (asking for their gradient raises:
    test_attention_reliability.py)."""
    q = torch.randn(1, 2, 5, 8)
    slopes = torch.tensor([0.5, 0.25])
    out = fastattn.attention(q, q, q)
    assert out.grad_fn is None and not out.requires_grad
    with torch.no_grad():
        out = fastattn.attention(q.requires_grad_(), q, q)
    assert out.grad_fn is None and not out.requires_grad
    for name, kwargs in (("q", {}), ("alibi_slopes", {"alibi_slopes": slopes.clone().requires_grad_()}),
                         ("rel_bias", {"rel_bias": torch.zeros(5, 2, requires_grad=True)})):
        q_in = q.detach().requires_grad_(name == "q")
        out = fastattn.attention(q_in, q.detach(), q.detach(), **kwargs)
        assert out.grad_fn is not None and out.requires_grad, name
    x = torch.randn(1, 2, 5, 8)
    inv_freq = torch.rand(4)
    y = fastattn.rotary(x, inv_freq=inv_freq)
    assert y.grad_fn is None and not y.requires_grad
    y = fastattn.rotary(x, inv_freq=inv_freq.requires_grad_())
    assert y.grad_fn is not None
    y.sum().backward()
    assert inv_freq.grad is not None and torch.isfinite(inv_freq.grad).all()
