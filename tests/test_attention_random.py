"""fastattn.attention on random calls (Hypothesis): every option, shape, dtype and layout drawn
at once (tests/attention_strategies.py), judged against both float64 references exactly as the
fixed cases are (conftest.check_case); and properties that need no reference at all: GQA is
the same math as MHA with repeated K/V, the last rows of a call are the call on the last
queries alone (bottom-right alignment), and the CPU results do not depend on the thread count.

CI runs a fixed, derandomized set of examples; `FASTATTN_RANDOM_EXAMPLES=500 pytest
tests/test_attention_random.py` explores fresh ones.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastattn
from attention_strategies import attention_cases
from conftest import (attention_backward_op_args, attention_op_args, DEVICES, HAS_CUDA, LOW_PRECISION, TOL, any_tensor, assert_close, case_id, check_case,
                      clone_inputs, make_inputs, pin_threads, random_settings, run_attention)

_threads = pytest.fixture(autouse=True)(pin_threads)


@random_settings(150)
@given(drawn=attention_cases("cpu"))
def test_random_calls_cpu(drawn):
    case, lse_grad = drawn
    check_case(case, lse_grad=lse_grad)


@random_settings(60)
@given(data=st.data())
def test_random_short_query_calls_cpu(data):
    """Random calls with a few queries (decode steps, short chunks) and large GQA/MQA groups:
    the CPU forward packs a group's heads into one task and scores single rows by dot
    products (csrc/cpu/attention.cpp, ForwardTask)."""
    case, lse_grad = data.draw(attention_cases("cpu"))
    Sq = data.draw(st.integers(1, 16))
    Hq = case.Hkv * data.draw(st.sampled_from((1, 2, 5, 8, 16, 32)))
    Sk = case.Sk
    while case.B * Hq * Sq * Sk * max(case.Dqk, case.Dv) > 20_000_000 and Sk > 1:
        Sk //= 2
    layout = "contiguous" if case.layout == "packed" else case.layout
    key_lengths = None if case.key_lengths is None else tuple(min(n, Sk) for n in case.key_lengths)
    case = replace(case, Sq=Sq, Hq=Hq, Sk=Sk, layout=layout, key_lengths=key_lengths,
                   num_global=min(case.num_global, Sk))
    check_case(case, lse_grad=lse_grad)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fastattn")
@random_settings(60)
@given(drawn=attention_cases("cuda"))
def test_random_calls_cuda(drawn):
    case, lse_grad = drawn
    check_case(case, lse_grad=lse_grad)


def _options(case, inp) -> dict:
    kw = {n: inp[n] for n in ("rel_bias", "alibi_slopes", "span", "key_lengths", "scale") if n in inp}
    return dict(kw, **case.options())


@pytest.mark.parametrize("device", DEVICES)
@random_settings(60)
@given(data=st.data())
def test_gqa_is_mha_with_repeated_kv(device, data):
    """A GQA/MQA call equals the MHA call on K/V repeated over each group: the forward bitwise
    (each query head runs the same arithmetic on the same K/V values), dQ bitwise (on CUDA too:
    each head's dQ adds the same key-block shares in the same order), and dK/dV equal to the
    group sums of the MHA gradients (summed in another order: close). float32 on the CPU,
    bfloat16 on CUDA."""
    case, _ = data.draw(attention_cases(device))
    case = replace(case, Hq=case.Hkv * 3, span=None, layout="contiguous",
                   dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    inp = make_inputs(case)
    group = case.Hq // case.Hkv
    g = torch.Generator().manual_seed(case.seed + 7)
    grad_out = torch.randn(case.B, case.Hq, case.Sq, case.Dv, generator=g).to(case.device, case.dtype)

    def run(k, v):
        q = inp["q"].detach().clone().requires_grad_(True)
        k = k.detach().clone().requires_grad_(True)
        v = v.detach().clone().requires_grad_(True)
        out = fastattn.attention(q, k, v, **_options(case, inp))
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
        return out, dq, dk, dv

    out_g, dq_g, dk_g, dv_g = run(inp["k"], inp["v"])
    out_m, dq_m, dk_m, dv_m = run(inp["k"].repeat_interleave(group, 1), inp["v"].repeat_interleave(group, 1))
    assert torch.equal(out_g, out_m), f"{case_id(case)}: GQA forward differs from MHA on repeated K/V"
    assert torch.equal(dq_g, dq_m), f"{case_id(case)}: GQA dQ differs from MHA on repeated K/V"
    for name, got, full in (("dK", dk_g, dk_m), ("dV", dv_g, dv_m)):
        summed = full.double().unflatten(1, (case.Hkv, group)).sum(2).cpu()
        if device == "cpu":
            assert_close(f"{name} vs group sums of MHA", got, summed, torch.float32)
        else:  # each MHA head's gradient was rounded to bfloat16 before the sum
            slack = 2.0 ** -7 * (group + 1) * max(summed.abs().max().item(), 1e-3)
            err = (got.double().cpu() - summed).abs().max().item()
            assert err <= slack, f"{case_id(case)}: {name} off the group sums of MHA by {err:.3g} > {slack:.3g}"


@random_settings(60)
@given(drawn=attention_cases("cpu"))
def test_last_rows_are_the_call_on_the_last_queries(drawn):
    """Queries are aligned bottom-right (query i of Sq stands at i + Sk - Sq), so dropping the
    first queries changes nothing for the others: out and lse of the last n rows of a call
    equal those of the call on q[:, :, -n:] (decode steps rely on this), for every option."""
    case, _ = drawn
    if case.dtype in LOW_PRECISION:
        case = replace(case, dtype=torch.float32)  # tile-dependent rounding would blur the check
    inp = make_inputs(case, requires_grad=False)
    n = max(1, case.Sq // 3)
    opts = _options(case, inp)
    full_out, full_lse = fastattn.attention(inp["q"], inp["k"], inp["v"], return_lse=True, **opts)
    tail_out, tail_lse = fastattn.attention(inp["q"][:, :, -n:], inp["k"], inp["v"], return_lse=True, **opts)
    tol = TOL[case.dtype]
    torch.testing.assert_close(tail_out, full_out[:, :, -n:], atol=tol["atol"], rtol=tol["rtol"])
    torch.testing.assert_close(tail_lse, full_lse[:, :, -n:], atol=tol["atol"], rtol=tol["rtol"])


@random_settings(40)
@given(drawn=attention_cases("cpu"))
def test_cpu_results_do_not_depend_on_the_thread_count(drawn):
    """The CPU kernels split work by shape only and reduce partials in a fixed order, so the
    forward and every gradient are bitwise the same on 1, 2 or 3 threads."""
    case, lse_grad = drawn
    inp = make_inputs(case)
    g = torch.Generator().manual_seed(case.seed + 1000)
    grad_out = torch.randn(case.B, case.Hq, case.Sq, case.Dv, generator=g).to(case.dtype)
    grad_lse = torch.randn(case.B, case.Hq, case.Sq, generator=g) if lse_grad else None
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(run_attention(fastattn.attention, clone_inputs(inp), case, grad_out, grad_lse))
    finally:
        torch.set_num_threads(before)
    for key, value in runs[0].items():
        for threads, other in zip((2, 3), runs[1:]):
            assert torch.equal(value, other[key]), f"{case_id(case)}: {key} differs on {threads} threads"


@st.composite
def _op_arguments(draw):
    """Arguments of torch.ops.fastattn.attention as a caller that skips the Python wrapper could
    pass them: a valid call (any option, key_lengths and num_global past the ends included) with
    up to two arguments bent: a tensor of any rank, size or dtype, an integer out of range or
    up to 2^63 - 1, a non-finite float."""
    B, Hkv, Sq, Sk, Dqk, Dv = (draw(st.integers(1, 4)) for _ in range(6))
    Hq = Hkv * draw(st.integers(1, 2))
    max_dist = draw(st.integers(1, 4))
    args = dict(
        q=torch.randn(B, Hq, Sq, Dqk), k=torch.randn(B, Hkv, Sk, Dqk), v=torch.randn(B, Hkv, Sk, Dv),
        scale=draw(st.sampled_from((None, 0.5))),
        scale_tensor=draw(st.sampled_from((None, torch.tensor(0.7)))), causal=draw(st.booleans()),
        window_left=draw(st.integers(-1, 5)), window_right=draw(st.integers(-1, 5)),
        rel_bias=draw(st.sampled_from((None, torch.randn(2 * max_dist - 1, Hq)))),
        alibi_slopes=draw(st.sampled_from((None, torch.rand(Hq)))),
        span=draw(st.sampled_from((None, 6 * torch.rand(Hq), 6 * torch.rand(B, Hq)))),
        span_ramp=draw(st.sampled_from((32.0, 1.0))), num_global=draw(st.integers(0, Sk)),
        key_lengths=draw(st.sampled_from((None, torch.randint(-1, Sk + 3, (B,))))),
        softcap=draw(st.sampled_from((0.0, 2.0, 50.0))))
    bad = dict(scale_tensor=any_tensor(rank_range=(0, 2), size_max=2),
               window_left=st.one_of(st.integers(-5, -2), st.integers(Sk, 2 ** 63 - 1)),
               window_right=st.one_of(st.integers(-5, -2), st.integers(Sq, 2 ** 63 - 1)),
               span_ramp=st.sampled_from((0.0, -1.0, math.inf, math.nan)),
               num_global=st.one_of(st.integers(-3, -1), st.integers(Sk + 1, 2 ** 63 - 1)),
               key_lengths=any_tensor(rank_range=(0, 2), dtypes=(torch.int64, torch.int32, torch.float32)),
               softcap=st.sampled_from((-1.0, math.inf, math.nan)),
               scale=st.sampled_from((math.inf, math.nan)))
    for name in draw(st.lists(st.sampled_from(list(args)), max_size=2, unique=True)):
        if name == "causal":
            continue
        args[name] = draw(bad.get(name, any_tensor()))
    return args


@pytest.mark.parametrize("device", DEVICES)
@random_settings(300)
@given(data=st.data())
def test_op_level_calls_run_or_fail_in_the_checks(device, data):
    """A direct torch.ops call (no Python validation) with arguments bent in any way either runs,
    returning out (B, Hq, Sq, Dv) and lse (B, Hq, Sq) with no NaN where no input is NaN, and
    then its backward runs too, or fails in fastattn's own C++ checks: a ValueError or TypeError
    whose message starts with "fastattn:" (not an ATen error from deep inside a kernel, nor a
    crash)."""
    named = {n: a.to(device) if isinstance(a, torch.Tensor) else a for n, a in data.draw(_op_arguments()).items()}
    args = attention_op_args(**named)
    try:
        out, lse = torch.ops.fastattn.attention(*args)
    except (ValueError, TypeError) as e:
        assert str(e).startswith("fastattn:"), f"rejected outside fastattn's checks: {str(e).splitlines()[0]}"
        return
    q, v = named["q"], named["v"]
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3]) and lse.shape == q.shape[:3]
    assert not out.isnan().any(), "NaN output from finite inputs"
    grads = torch.ops.fastattn.attention_backward(
        *attention_backward_op_args(torch.ones_like(out), out, lse, None, args))
    assert grads[0].shape == q.shape and grads[1].shape == named["k"].shape and grads[2].shape == v.shape
