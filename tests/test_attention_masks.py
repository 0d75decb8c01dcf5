"""fastattn.attention's window / global-token / adaptive-span options, alone and with
everything else (causal, rel_bias, alibi, GQA, key_lengths, Sq != Sk, return_lse): forward and
gradients (span included) against fastattn.reference.attention and, independently, against
F.scaled_dot_product_attention with the dense mask / additive log-mask built in conftest.py;
gradcheck, determinism, opcheck, torch.compile, bad input.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

import fastattn
from conftest import (attention_backward_op_args, attention_op_args, DEVICES, DEVICE_DTYPES, Case, case_id, check_case, for_device, make_inputs,
                      pairwise, pin_threads, run_attention)

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

_threads = pytest.fixture(autouse=True)(pin_threads)

WINDOWS = [(0, 0), (3, 0), (0, 5), (17, 17), (300, 300), (-1, 4), (6, -1)]  # (300, 300): larger than S

# ---------------------------------------------------------------------------------------------
# windows alone, and with causal, at shapes that span several kernel tiles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"win{w[0]}_{w[1]}")
@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("Sq,Sk", [(17, 17), (129, 129), (5, 129), (129, 40)])
def test_window(device, window, causal, Sq, Sk):
    case = Case(B=1, Hq=2, Hkv=1, Sq=Sq, Sk=Sk, Dqk=16, Dv=16, window=window, causal=causal,
                seed=hash((window, causal, Sq, Sk)) % 1000)
    check_case(for_device(case, device), lse_grad=Sq == 5)


# ---------------------------------------------------------------------------------------------
# global tokens
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G", (0, 1, 16))
@pytest.mark.parametrize("window,causal", [((0, 0), False), ((3, 0), True), ((2, 2), True), ((-1, -1), True),
                                           ((4, 1), False)],
                         ids=lambda x: f"win{x[0]}_{x[1]}" if isinstance(x, tuple) else ("causal" if x else "noncausal"))
@pytest.mark.parametrize("Sq,Sk", [(40, 40), (3, 40), (40, 20)])
def test_global_tokens(device, G, window, causal, Sq, Sk):
    case = Case(B=2, Hq=4, Hkv=2, Sq=Sq, Sk=Sk, window=window, causal=causal, num_global=G,
                rel_bias=5, seed=G * 7 + Sq)
    check_case(for_device(case, device))


# ---------------------------------------------------------------------------------------------
# adaptive span: 0 to past S, ramps 1 and 32, per head and per (batch, head)
# ---------------------------------------------------------------------------------------------
SPANS = {
    # name: (values cycled over (batch, head), gradient checked)
    "zero": ((0.0,), False),                    # only d = 0 survives (m = 1 there: a kink)
    "small": ((0.5, 2.75), True),
    "ramp": ((3.5, 20.25, 11.6), True),         # ends inside the ramp for R = 32
    "mixed": ((0.0, 7.3, 60.4, 500.0), False),  # one head of each kind, 0 and past S together
    "past_s": ((500.0,), True),                 # m == 1 for every pair: plain attention
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("span_name", SPANS)
@pytest.mark.parametrize("ramp", (1.0, 32.0))
@pytest.mark.parametrize("shape", ("h", "bh"))
@pytest.mark.parametrize("causal", (False, True))
def test_span(device, span_name, ramp, shape, causal):
    values, grad = SPANS[span_name]
    case = Case(B=2, Hq=4, Hkv=4, Sq=70, Sk=70, span=shape, span_values=values, span_ramp=ramp,
                span_grad=grad, causal=causal, seed=len(span_name) * 10 + int(ramp))
    check_case(for_device(case, device))


def test_span_past_s_equals_no_span():
    case = Case(B=2, Hq=2, Hkv=1, Sq=33, Sk=33, causal=True, rel_bias=4)
    inp = make_inputs(case, requires_grad=False)
    base = fastattn.attention(inp["q"], inp["k"], inp["v"], causal=True, rel_bias=inp["rel_bias"])
    far = fastattn.attention(inp["q"], inp["k"], inp["v"], causal=True, rel_bias=inp["rel_bias"],
                             span=torch.full((2,), 1000.0), span_ramp=32.0)
    torch.testing.assert_close(far, base, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# every option with every other (pairwise covering of the whole option space)
# ---------------------------------------------------------------------------------------------
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
SEQS = {"self": (40, 40), "kvcache": (7, 40), "sq_gt_sk": (40, 23)}
FACTORS = dict(
    window=[(-1, -1), (0, 0), (3, 0), (0, 5), (17, 17), (100, 100), (-1, 4), (6, -1)],
    num_global=[0, 1, 16],
    span=[None, ("h", (0.0,)), ("bh", (3.5, 20.25)), ("h", (500.0,)), ("bh", (0.5, 12.7, 2.3))],
    span_ramp=[1.0, 32.0],
    causal=[False, True],
    rel_bias=[None, 6],
    alibi=[False, True],
    heads=list(HEADS),
    key_lengths=[False, True],
    seqs=list(SEQS),
    dtype=[F32, F32, BF16],
    softcap=[0.0, 0.0, 2.0],
    dropout=[0.0, 0.0, 0.2],
    positions=[None, None, "chunk", "batch"],
    attn_mask=[None, None, "bool", "float", "float_grad"],
)
# positions: None (the defaults), a chunk further into the sequence (both offsets shifted), or
# a different offset per batch row (keys shifted too: global tokens count from the offset).
POSITIONS = {None: (None, None), "chunk": ((100, 100), (90, 90)), "batch": ((5, 60), (0, -7))}


def _pairwise_cases():
    cases = []
    for n, row in enumerate(pairwise(FACTORS, seed=4)):
        Hq, Hkv = HEADS[row["heads"]]
        Sq, Sk = SEQS[row["seqs"]]
        span = row["span"]
        cases.append(Case(
            B=2, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, Dqk=16, Dv=(16, 8)[n % 2], dtype=row["dtype"],
            window=row["window"], num_global=row["num_global"], causal=row["causal"],
            rel_bias=row["rel_bias"], alibi=row["alibi"],
            span=span and span[0], span_values=span[1] if span else (3.5,),
            span_grad=bool(span) and span[1] != (0.0,), span_ramp=row["span_ramp"],
            key_lengths=(Sk - 9, Sk) if row["key_lengths"] else None,
            scale=("default", "tensor", 0.4)[n % 3], softcap=row["softcap"], dropout=row["dropout"],
            q_offset=POSITIONS[row["positions"]][0], k_offset=POSITIONS[row["positions"]][1],
            attn_mask=row["attn_mask"],
            seed=2000 + n))
    return cases


PAIRWISE_CASES = _pairwise_cases()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", PAIRWISE_CASES, ids=case_id)
def test_all_options_pairwise(device, case):
    check_case(for_device(case, device), lse_grad=case.seed % 2 == 0)


# ---------------------------------------------------------------------------------------------
# dtypes, and long sequences where whole tiles must be skipped
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    Case(dtype=F64, Sq=33, Sk=33, window=(5, 2), num_global=2, span="bh", span_values=(4.5, 9.25), span_ramp=4.0),
    Case(dtype=BF16, Sq=65, Sk=65, window=(16, 0), causal=True, num_global=4, rel_bias=8, Hkv=2),
    Case(dtype=F16, Sq=65, Sk=65, span="h", span_values=(6.5, 30.5), span_ramp=8.0, causal=True, rel_bias=8),
    Case(dtype=BF16, Sq=1, Sk=65, window=(16, 0), causal=True, num_global=4, span="h", span_values=(10.5,), span_ramp=8.0),
    Case(dtype=F16, Sq=65, Sk=65, window=(3, 3), key_lengths=(65, 30), alibi=True),
], ids=case_id)
def test_mask_dtypes(device, case):
    if device != "cpu" and case.dtype not in DEVICE_DTYPES[device]:
        pytest.skip(f"{case.dtype} is not a {device} kernel dtype")
    check_case(for_device(case, device, keep_dtype=True))


@pytest.mark.multithread
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    Case(B=1, Hq=2, Hkv=1, Sq=1000, Sk=1000, Dqk=32, Dv=32, window=(16, 16), rel_bias=20, seed=3000),
    Case(B=1, Hq=2, Hkv=2, Sq=1000, Sk=1000, Dqk=32, Dv=32, window=(64, 0), causal=True, num_global=4,
         key_lengths=(900,), seed=3001),
    Case(B=1, Hq=4, Hkv=2, Sq=1000, Sk=1000, Dqk=32, Dv=32, span="h", span_values=(10.5, 1500.0, 0.25, 40.75),
         span_ramp=4.0, seed=3002),
], ids=case_id)
def test_long_sequence_masks(device, case):
    check_case(for_device(case, device), against=("reference",))


# ---------------------------------------------------------------------------------------------
# KV-cache decoding: a step equals the last rows of the full pass
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("new_tokens", (1, 5))
@pytest.mark.parametrize("opts", [
    dict(window=(8, 0), causal=True),
    dict(window=(8, 0), causal=True, num_global=3, rel_bias=6),
    dict(span="bh", span_values=(4.5, 11.25), span_ramp=4.0, causal=True, key_lengths=(50, 41)),
    dict(window=(6, 6), num_global=16, span="h", span_values=(2.5, 30.0), span_ramp=2.0, alibi=True),
], ids=["window", "window-global-rel", "span-kl", "window-global-span-alibi"])
def test_decode_step_equals_last_rows(device, new_tokens, opts):
    case = for_device(Case(B=2, Hq=4, Hkv=2, Sq=50, Sk=50, seed=11, **opts), device)
    inp = make_inputs(case, requires_grad=False)
    kw = {n: inp[n] for n in ("rel_bias", "alibi_slopes", "span", "key_lengths") if n in inp}
    kw.update(case.options())
    full, full_lse = fastattn.attention(inp["q"], inp["k"], inp["v"], return_lse=True, **kw)
    step, lse = fastattn.attention(inp["q"][:, :, -new_tokens:], inp["k"], inp["v"], return_lse=True, **kw)
    tol = dict(atol=1e-6, rtol=1e-5) if case.dtype == F32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(step, full[:, :, -new_tokens:], **tol)
    torch.testing.assert_close(lse, full_lse[:, :, -new_tokens:], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# rows left with no visible key
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    Case(Sq=17, Sk=9, window=(0, 0), seed=4000),                              # queries before the first key
    Case(Sq=9, Sk=9, window=(2, 0), key_lengths=(0, 3), rel_bias=3, seed=4001),  # padded away
    Case(Sq=9, Sk=9, span="h", span_values=(0.5,), span_ramp=1.0, causal=True, key_lengths=(4, 9),
         seed=4002),                                                          # d = 0 key padded
    Case(Sq=6, Sk=12, window=(1, 0), key_lengths=(3, 12), rel_bias=2, seed=4003),  # window past the padding
], ids=case_id)
def test_rows_without_visible_key(device, case):
    case = for_device(case, device)
    fused = check_case(case, lse_grad=True)
    lse, out = fused["lse"].detach().cpu(), fused["out"].detach().cpu()
    empty = torch.isneginf(lse)
    assert empty.any()
    assert (out[empty] == 0).all()
    for name, t in fused.items():
        if t is not None and t.is_floating_point():
            assert not torch.isnan(t).any(), f"{name} has NaN"


# ---------------------------------------------------------------------------------------------
# gradcheck in float64, span in its ramp region
# ---------------------------------------------------------------------------------------------
GRADCHECK_CASES = [
    Case(B=1, Hq=2, Hkv=1, Sq=6, Sk=6, Dqk=4, Dv=3, dtype=F64, span="h", span_values=(1.3, 2.6),
         span_ramp=2.0),
    Case(B=2, Hq=2, Hkv=2, Sq=5, Sk=7, Dqk=3, Dv=4, dtype=F64, span="bh", span_values=(0.7, 3.4, 1.9, 5.2),
         span_ramp=3.0, window=(3, 1), num_global=1, rel_bias=3, causal=True, scale="tensor"),
    Case(B=1, Hq=2, Hkv=1, Sq=7, Sk=7, Dqk=4, Dv=4, dtype=F64, window=(2, 2), num_global=2, rel_bias=4,
         key_lengths=(6,)),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=case_id)
def test_gradcheck(case):
    inp = make_inputs(case)
    names = [n for n in ("q", "k", "v", "rel_bias", "span", "scale") if isinstance(inp.get(n), torch.Tensor)]
    fixed = {n: inp[n] for n in ("alibi_slopes", "key_lengths") if n in inp}

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        return fastattn.attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw, **fixed, **case.options())

    assert torch.autograd.gradcheck(fn, tuple(inp[n] for n in names))


# ---------------------------------------------------------------------------------------------
# determinism (span and table gradients reduced in a fixed order)
# ---------------------------------------------------------------------------------------------
@pytest.mark.multithread
@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    case = for_device(Case(B=2, Hq=8, Hkv=2, Sq=200, Sk=200, Dqk=32, Dv=32, window=(40, 10), num_global=3,
                           rel_bias=64, span="bh", span_values=(9.5, 30.25, 70.75), span_ramp=16.0,
                           seed=5000), device)
    inp = make_inputs(case)
    g = torch.randn(case.B, case.Hq, case.Sq, case.Dv, generator=torch.Generator().manual_seed(2)).to(case.device, case.dtype)
    runs = [run_attention(fastattn.attention, inp, case, g) for _ in range(3)]
    for key in ("out", "lse", "grad_q", "grad_k", "grad_v", "grad_rel_bias", "grad_span"):
        assert all(torch.equal(runs[0][key], r[key]) for r in runs[1:]), f"{key} differs between identical runs"


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile with the mask options
# ---------------------------------------------------------------------------------------------
def _op_args(case: Case, requires_grad: bool):
    inp = make_inputs(case, requires_grad=requires_grad)
    return attention_op_args(inp["q"], inp["k"], inp["v"], scale=case.Dqk ** -0.5, causal=case.causal,
                             window_left=case.window[0], window_right=case.window[1],
                             rel_bias=inp.get("rel_bias"), alibi_slopes=inp.get("alibi_slopes"),
                             span=inp.get("span"), span_ramp=case.span_ramp, num_global=case.num_global,
                             key_lengths=inp.get("key_lengths"), softcap=case.softcap)


OPCHECK_CASE = Case(B=2, Hq=2, Hkv=1, Sq=6, Sk=9, Dqk=8, Dv=4, window=(2, 1), num_global=1, rel_bias=3,
                    span="bh", span_values=(1.5, 3.25), span_ramp=2.0, causal=True, key_lengths=(9, 5))


def test_opcheck_attention_masks():
    torch.library.opcheck(torch.ops.fastattn.attention.default, _op_args(OPCHECK_CASE, requires_grad=True))


def test_opcheck_attention_backward_masks():
    args = _op_args(OPCHECK_CASE, requires_grad=False)
    out, lse = torch.ops.fastattn.attention(*args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    torch.library.opcheck(torch.ops.fastattn.attention_backward.default,
                          attention_backward_op_args(grad_out, out, lse, None, args))


def test_compile_fullgraph_masks():
    torch._dynamo.reset()
    case = Case(B=2, Hq=4, Hkv=2, Sq=24, Sk=24, window=(6, 0), causal=True, num_global=2, rel_bias=6,
                span="bh", span_values=(3.5, 9.25), span_ramp=4.0, seed=6000)

    def block(q, k, v, table, span):
        out = fastattn.attention(q, k, v, causal=True, window=(6, 0), num_global=2, rel_bias=table,
                                 span=span, span_ramp=4.0)
        return (out * out).sum()

    compiled = torch.compile(block, fullgraph=True)
    results = []
    for f in (block, compiled):
        inp = make_inputs(case)
        loss = f(inp["q"], inp["k"], inp["v"], inp["rel_bias"], inp["span"])
        loss.backward()
        results.append([loss] + [inp[n].grad for n in ("q", "k", "v", "rel_bias", "span")])
    for name, a, b in zip(("loss", "q", "k", "v", "rel_bias", "span"), *results):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"compiled {name} differs from eager")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _t(*shape, dtype=F32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


BAD_INPUTS = [
    ("window-left-below-1", dict(window=(-2, 3)), ValueError, "window"),
    ("window-right-below-1", dict(window=(3, -5)), ValueError, "window"),
    ("window-not-pair", dict(window=4), TypeError, "window"),
    ("window-float", dict(window=(2.0, 2)), TypeError, "window"),
    ("span-negative", dict(span=torch.tensor([[1.0, 2.0, 3.0, -1.0]] * 2)), ValueError, "span"),
    ("span-ramp-zero", dict(span=torch.ones(4), span_ramp=0.0), ValueError, "span_ramp"),
    ("span-ramp-negative", dict(span=torch.ones(4), span_ramp=-4.0), ValueError, "span_ramp"),
    ("span-ramp-type", dict(span=torch.ones(4), span_ramp="32"), TypeError, "span_ramp"),
    ("span-shape-heads", dict(span=torch.ones(3)), ValueError, "span"),
    ("span-shape-batch", dict(span=torch.ones(3, 4)), ValueError, "span"),
    ("span-shape-rank", dict(span=torch.ones(2, 4, 1)), ValueError, "span"),
    ("span-int", dict(span=torch.ones(4, dtype=torch.int64)), TypeError, "span"),
    ("span-device", dict(span=torch.ones(4, device="meta")), ValueError, "span"),
    ("num_global-negative", dict(num_global=-2), ValueError, "num_global"),
    ("num_global-float", dict(num_global=2.0), TypeError, "num_global"),
    ("num_global-bool", dict(num_global=True), TypeError, "num_global"),
]


@pytest.mark.parametrize("override,exc,argname", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(override, exc, argname):
    q, k, v = _t(2, 4, 5, 8), _t(2, 2, 7, 8), _t(2, 2, 7, 8)
    with pytest.raises(exc, match=rf"\b{argname}\b"):
        fastattn.attention(q, k, v, **override)


def test_mask_edge_values_are_accepted():
    # The limits themselves are valid: window -1 / 0, span 0, G == Sk.
    q, k, v = _t(2, 4, 5, 8), _t(2, 2, 7, 8), _t(2, 2, 7, 8)
    out = fastattn.attention(q, k, v, window=(-1, 0), span=torch.zeros(2, 4), span_ramp=0.5, num_global=7)
    assert out.shape == (2, 4, 5, 8) and torch.isfinite(out).all()


# A direct torch.ops call gets the op's own checks: a span that does not cover (B, Hq) would be
# read out of bounds, so it is refused.
@pytest.mark.parametrize("override", [dict(span=_t(3).abs()), dict(span=_t(3, 2).abs()), dict(span=_t(2, 2, 1).abs())],
                         ids=["span-heads", "span-batch", "span-rank"])
def test_op_level_mask_checks(override):
    args = attention_op_args(_t(2, 2, 5, 8), _t(2, 1, 7, 8), _t(2, 1, 7, 8), scale=0.5, **override)
    with pytest.raises(ValueError, match="fastattn"):
        torch.ops.fastattn.attention(*args)
