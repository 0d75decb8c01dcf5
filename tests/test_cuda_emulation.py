"""The CUDA attention kernels (csrc/cuda/attention_*), run on the CPU emulator of
tests/cuda_emulation/ and checked against fastattn.reference in float64.

The emulator compiles the real attention_api.cu + attention_{fwd,bwd}_kernel.cuh +
attention_utils.cuh with a host compiler (-DFASTATTN_CUDA_EMULATION): CUDA threads are fibers,
__syncthreads/__syncwarp are barriers, mma.sync.m16n8k16 and __shfl_xor_sync exchange
fragments per warp, and shared memory starts as NaN bytes. So machines without a GPU still
run the kernels' indexing, masking, tiling, online softmax and backward reductions. It needs
only the CUDA *headers* (see tests/cuda_emulation/build.py); the module is skipped, with the
reason, where they (or a compiler) are missing, and with FASTATTN_TEST_CUDA_EMULATION=0. The
build (one translation unit, ~50 s of CPU time) is cached in torch's extensions directory.

Each case runs forward + backward (through fastattn.functional's wrapper and the autograd
function of csrc/common/autograd.cpp, both registered for the emulated op) and is judged by conftest.check_case, as the fused op
is: float32 by atol + rtol * max|exact|, float16/bfloat16 by twice the error of the same math
run in that dtype plus half an ulp, gradients against the exact gradients of the flash
formulation (D_i from the output the kernel delivered), plus the error floors; lse
(float32 always) by a relative bound; gradients of q, k, v, rel_bias, span and a tensor scale.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastattn
import fastattn.functional
import fastattn.reference

from attention_strategies import attention_cases
from conftest import (Case, attention_op_args, case_id, check_case, clone_inputs, make_inputs, per_sequence_calls,
                      pin_threads, random_settings, run_attention, seeded_sequence_calls)

_BUILD_PY = Path(__file__).resolve().parent / "cuda_emulation" / "build.py"
_spec = importlib.util.spec_from_file_location("fastattn_cuda_emulation_build", _BUILD_PY)
emu_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emu_build)


@pytest.fixture(autouse=True)
def _threads(request):
    yield from pin_threads(request)


@pytest.fixture(scope="module")
def emu():
    """Builds (once; cached in torch's extensions dir) and loads the emulator library."""
    if os.environ.get("FASTATTN_TEST_CUDA_EMULATION", "1") == "0":
        pytest.skip("CUDA kernel emulator tests disabled by FASTATTN_TEST_CUDA_EMULATION=0")
    reason = emu_build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA kernel emulator cannot be built here: {reason}")
    emu_build.load()  # a compile error is a failure, not a skip
    return torch.ops.fastattn_emu


# ---------------------------------------------------------------------------------------------
# fastattn.attention over the emulated kernels: the same Python wrapper, and the same C++ checks
# and autograd function (the emulator library registers them for fastattn_emu::attention)
# ---------------------------------------------------------------------------------------------
_SIGNATURE = inspect.signature(fastattn.attention)


def emulated_attention(q, k, v, **options):
    """fastattn.attention(q, k, v, **options) on the emulated CUDA kernels."""
    bound = _SIGNATURE.bind(q, k, v, **options)
    bound.apply_defaults()
    return fastattn.functional._attention(torch.ops.fastattn_emu.attention.default, *bound.arguments.values())


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# GQA, Sq != Sk (both ways), Dqk != Dv; small enough for the emulator (about a second a case).
GQA = dict(B=2, Hq=4, Hkv=2, Sq=33, Sk=47, Dqk=16, Dv=24)
LONGQ = dict(B=1, Hq=2, Hkv=1, Sq=70, Sk=30, Dqk=40, Dv=8)  # Sq > Sk: queries at negative positions

CASES = [
    # (case, backprop an lse gradient too)
    (Case(**GQA, dtype=F32), True),
    (Case(**GQA, dtype=F16, causal=True, rel_bias=5), False),
    (Case(**GQA, dtype=BF16, window=(3, 0), alibi=True), True),
    (Case(**LONGQ, dtype=F32, causal=True, num_global=2, window=(2, 2), rel_bias=64), False),
    (Case(**LONGQ, dtype=F16, window=(0, 5), span="bh", span_values=(3.5, 9.25), span_ramp=4.0), True),
    (Case(**GQA, dtype=BF16, span="h", span_ramp=32.0, rel_bias=9, key_lengths=(0, 40)), False),
    (Case(B=2, Hq=4, Hkv=1, Sq=33, Sk=65, Dqk=8, Dv=40, dtype=F16, rel_bias=3, num_global=3,
          window=(7, 1), key_lengths=(20, 65), scale="tensor"), True),
    (Case(**GQA, dtype=BF16, scale=0.3, alibi=True, rel_bias=4, span="bh", num_global=2,
          key_lengths=(47, 9)), False),
    (Case(**GQA, dtype=F32, scale="tensor", causal=True, key_lengths=(12, 0), rel_bias=3, alibi=True), True),
    # several tiles in both directions
    (Case(B=1, Hq=2, Hkv=2, Sq=129, Sk=129, Dqk=64, Dv=64, dtype=F16, causal=True, rel_bias=8), False),
    (Case(B=1, Hq=2, Hkv=1, Sq=70, Sk=140, Dqk=32, Dv=32, dtype=BF16, span="bh", span_values=(3.5, 20.25),
          span_ramp=8.0, num_global=4, window=(16, 16)), True),
    # tiles whose distances all clamp to one end row of the table (tile_is_uniform), on both
    # sides, next to tiles that do not (the diagonal band, the key_lengths edge); and a
    # one-row table, where both ends are row 0
    (Case(B=2, Hq=2, Hkv=1, Sq=140, Sk=150, Dqk=32, Dv=32, dtype=BF16, rel_bias=4,
          key_lengths=(150, 120)), True),
    (Case(B=1, Hq=2, Hkv=2, Sq=100, Sk=100, Dqk=16, Dv=16, dtype=F32, rel_bias=1, scale="tensor"), False),
    # several key blocks adding into each query block's dQ in turn (the backward walks query
    # blocks from the last down; key blocks that see a query block take turns in key order):
    # causal + window + global keys (key block 0 sees every query block, the others a band),
    # GQA (two query heads per key block), Sq < Sk and Sq > Sk
    (Case(B=1, Hq=4, Hkv=2, Sq=200, Sk=330, Dqk=32, Dv=32, dtype=BF16, causal=True, num_global=3,
          window=(100, 20), rel_bias=40), True),
    (Case(B=2, Hq=2, Hkv=1, Sq=150, Sk=200, Dqk=24, Dv=16, dtype=F32, window=(40, 40), rel_bias=30,
          key_lengths=(200, 131)), False),
    (Case(B=1, Hq=2, Hkv=2, Sq=300, Sk=140, Dqk=64, Dv=64, dtype=F16, causal=True, rel_bias=16), False),
    # the larger head-dim classes (96, 128, 256; Dqk != Dv; odd sizes are zero-padded)
    (Case(B=1, Hq=2, Hkv=1, Sq=40, Sk=70, Dqk=96, Dv=80, dtype=F16, causal=True, rel_bias=6), False),
    (Case(B=1, Hq=2, Hkv=2, Sq=70, Sk=40, Dqk=128, Dv=100, dtype=F32, rel_bias=6, span="bh"), False),
    (Case(B=1, Hq=2, Hkv=1, Sq=40, Sk=50, Dqk=256, Dv=200, dtype=BF16, rel_bias=6, num_global=2,
          window=(5, 3)), True),
    # the same turn-taking at the large head-dim tile shapes (D=128: 128-key / 64-query blocks;
    # D=256: 64 / 32), three key blocks per query block
    (Case(B=1, Hq=2, Hkv=1, Sq=150, Sk=300, Dqk=128, Dv=128, dtype=BF16, causal=True, rel_bias=50), False),
    (Case(B=1, Hq=1, Hkv=1, Sq=70, Sk=150, Dqk=256, Dv=256, dtype=F16, window=(60, 60), rel_bias=20), True),
    # logit soft-capping: with a table whose tiles are uniform and not (the backward reads a
    # non-uniform tile's dS for the table gradient before applying the cap's derivative), with
    # a learnable scale, a span and global tokens
    (Case(B=1, Hq=2, Hkv=1, Sq=70, Sk=140, Dqk=32, Dv=32, dtype=F16, softcap=3.0, rel_bias=9,
          causal=True), True),
    (Case(**GQA, dtype=F32, softcap=0.5, scale="tensor", window=(3, 2), span="h", num_global=1), False),
    (Case(**GQA, dtype=BF16, softcap=30.0, alibi=True, key_lengths=(47, 9)), True),
    # explicit positions: per-batch offsets (global tokens by absolute position, tile skipping
    # and the table gradient's distances follow them)
    (Case(**GQA, dtype=BF16, causal=True, rel_bias=9, num_global=2, key_lengths=(47, 30),
          q_offset=(40, 3), k_offset=(0, -5)), True),
    (Case(B=2, Hq=2, Hkv=1, Sq=70, Sk=140, Dqk=32, Dv=32, dtype=F16, window=(20, 5), alibi=True, span="bh",
          span_values=(10.5, 30.25), span_ramp=8.0, q_offset=(200, 60), k_offset=(150, 0)), False),
    # attn_mask: a float mask with its gradient (summed over the batch), a bool one per batch row
    (Case(**GQA, dtype=F32, causal=True, rel_bias=5, attn_mask="float_grad"), True),
    (Case(B=2, Hq=2, Hkv=1, Sq=70, Sk=140, Dqk=32, Dv=32, dtype=BF16, window=(30, 30), num_global=2,
          attn_mask="bool"), False),
    (Case(B=1, Hq=2, Hkv=2, Sq=40, Sk=70, Dqk=64, Dv=64, dtype=F16, softcap=5.0, attn_mask="float"), True),
    # block-diagonal masks (documents): whole tiles hidden, skipped by the block vote
    (Case(B=1, Hq=2, Hkv=1, Sq=140, Sk=140, Dqk=32, Dv=32, dtype=BF16, causal=True, rel_bias=9,
          attn_mask="blocks"), True),
    (Case(B=1, Hq=2, Hkv=2, Sq=140, Sk=140, Dqk=32, Dv=32, dtype=F32, alibi=True,
          attn_mask="blocks_float_grad"), False),
]


def check_emulated(case: Case, lse_grad: bool) -> dict:
    """conftest.check_case on the emulated kernels, against fastattn.reference."""
    return check_case(case, lse_grad=lse_grad, against=("reference",), fn=emulated_attention)


@pytest.mark.parametrize("case,lse_grad", CASES,
                         ids=[case_id(c) + ("-grad_lse" if lg else "") for c, lg in CASES])
def test_emulated_kernels_match_reference(emu, case, lse_grad):
    check_emulated(case, lse_grad)


def emu_tuning(**switches):
    """fastattn.tuning.cuda_tuning for the emulated kernels."""
    return fastattn.tuning.cuda_tuning(**switches, ops=torch.ops.fastattn_emu)


@random_settings(12)
@given(drawn=attention_cases("emu"), parts=st.sampled_from([0, 1, 2, 3, 7]))
def test_random_calls(emu, drawn, parts):
    """Random shapes, head dims, dtypes, layouts and option combinations
    (tests/attention_strategies.py), with the forward's split-KV part count drawn too (0: the
    host's choice); FASTATTN_RANDOM_EXAMPLES=N explores N fresh ones."""
    case, lse_grad = drawn
    with emu_tuning(kv_splits=parts):
        check_emulated(case, lse_grad)


def test_empty_rows(emu):
    """Rows with no visible key (a batch with key_lengths 0; queries at negative positions
    outside a window when Sq > Sk): out 0, lse -inf, zero and NaN-free gradients."""
    case = Case(B=2, Hq=2, Hkv=1, Sq=9, Sk=12, Dqk=8, Dv=8, dtype=F32, window=(0, 0), rel_bias=3,
                key_lengths=(0, 5))
    got = check_emulated(case, lse_grad=True)
    lse = got["lse"]
    assert torch.isneginf(lse[0]).all() and (got["out"][0] == 0).all()
    assert torch.isneginf(lse[1]).any() and torch.isfinite(lse[1]).any()
    for n in ("q", "k", "v"):
        assert (got["grad_" + n][0] == 0).all(), f"grad_{n} of the empty batch"


def test_backward_is_deterministic(emu, monkeypatch):
    """Two identical backward calls give bitwise identical gradients (dQ's atomics take turns in
    a fixed order; the emulator checks every block's turn number), also when the blocks start
    in reverse index order (CUDA promises no order: blocks take their work by ticket)."""
    case = Case(B=1, Hq=2, Hkv=1, Sq=70, Sk=130, Dqk=16, Dv=16, dtype=BF16, rel_bias=11, span="bh",
                span_values=(3.5, 20.25))
    inp = make_inputs(case)
    grad_out = torch.randn(case.B, case.Hq, case.Sq, case.Dv, generator=torch.Generator().manual_seed(7)).to(case.dtype)
    runs = [run_attention(emulated_attention, clone_inputs(inp), case, grad_out) for _ in range(2)]
    monkeypatch.setenv("FASTATTN_EMU_BLOCK_ORDER", "reverse")
    runs.append(run_attention(emulated_attention, clone_inputs(inp), case, grad_out))
    for key in ("out", "lse", "grad_q", "grad_k", "grad_v", "grad_rel_bias", "grad_span"):
        assert torch.equal(runs[0][key], runs[1][key]), f"{key} differs between two identical calls"
        assert torch.equal(runs[0][key], runs[2][key]), f"{key} differs with the blocks in reverse order"


def test_unordered_dq_diagnostic(emu):
    """unordered_dq (a profiling switch: what the turns cost) only drops the waits and the
    fence: the emulator runs blocks in index order, so the shares still arrive in turn order
    and every result is bitwise the ordered one."""
    case = Case(B=1, Hq=4, Hkv=2, Sq=150, Sk=200, Dqk=32, Dv=32, dtype=F16, causal=True, rel_bias=20)
    inp = make_inputs(case)
    grad_out = torch.randn(case.B, case.Hq, case.Sq, case.Dv, generator=torch.Generator().manual_seed(3)).to(case.dtype)
    ordered = run_attention(emulated_attention, clone_inputs(inp), case, grad_out)
    with emu_tuning(unordered_dq=True):
        unordered = run_attention(emulated_attention, clone_inputs(inp), case, grad_out)
    for key in ("out", "lse", "grad_q", "grad_k", "grad_v", "grad_rel_bias"):
        assert torch.equal(ordered[key], unordered[key]), f"{key} differs with unordered_dq"


def test_gqa_group_split(emu, monkeypatch):
    """GQA/MQA backward with the group's query heads split over blocks (few kv blocks for the
    GPU: fp32 dK/dV partials added in split order) and without (FASTATTN_EMU_SMS=1: enough
    blocks). Both match the reference, and each other bitwise in everything but dK and dV
    (whose sums are grouped differently)."""
    case = Case(B=1, Hq=6, Hkv=2, Sq=70, Sk=150, Dqk=32, Dv=24, dtype=BF16, causal=True, rel_bias=9,
                span="h", span_values=(20.5, 60.25, 9.75, 70.0, 33.5, 100.0), span_ramp=8.0)
    results, launches = {}, {}
    for sms in ("132", "1"):
        monkeypatch.setenv("FASTATTN_EMU_SMS", sms)
        before = emu.launches()
        results[sms] = check_emulated(case, lse_grad=True)
        launches[sms] = emu.launches() - before
    # the split run adds a dK and a dV reduction launch (the forward and the rest are the same)
    assert launches["132"] == launches["1"] + 2, launches
    for key in ("out", "lse", "grad_q", "grad_rel_bias", "grad_span"):
        assert torch.equal(results["132"][key], results["1"][key]), f"{key} depends on the group split"


# ---------------------------------------------------------------------------------------------
# split-KV forward and decode steps with the group folded into query rows
# ---------------------------------------------------------------------------------------------
SPLIT_CASES = [
    # (case, forced parts): full, causal and Sq > Sk; global keys with a window (the visited
    # tiles have a gap that a part may start in, end at or straddle); more parts than key tiles
    # (empty parts); rows that see no key (key_lengths 0, a window past the keys); a table,
    # alibi and a span (per-head rules inside the parts); every dtype and a wide head dim.
    (Case(B=1, Hq=2, Hkv=1, Sq=40, Sk=300, Dqk=32, Dv=24, dtype=BF16, rel_bias=20), 3),
    (Case(B=2, Hq=2, Hkv=2, Sq=70, Sk=200, Dqk=16, Dv=16, dtype=F32, causal=True, alibi=True,
          key_lengths=(200, 0)), 2),
    (Case(B=1, Hq=2, Hkv=1, Sq=9, Sk=400, Dqk=64, Dv=64, dtype=F16, num_global=3, window=(40, 0),
          rel_bias=50), 4),
    (Case(B=1, Hq=2, Hkv=2, Sq=30, Sk=130, Dqk=8, Dv=8, dtype=F16, window=(5, 5), span="bh",
          span_values=(3.5, 9.25), span_ramp=4.0, scale="tensor"), 9),
    (Case(B=1, Hq=1, Hkv=1, Sq=70, Sk=60, Dqk=128, Dv=100, dtype=BF16, causal=True, rel_bias=6), 5),
]


@pytest.mark.parametrize("case,parts", SPLIT_CASES, ids=[f"{case_id(c)}-parts{n}" for c, n in SPLIT_CASES])
def test_split_kv_forward(emu, case, parts):
    """The forward with each query block's key tiles split over `parts` blocks (their fp32
    partial O and lse merged by the combine kernel in part order) matches the reference, with
    its gradients (the backward runs on the merged out and lse); unsplit, the same call makes
    one launch fewer (no combine) and runs parts-times fewer forward blocks."""
    counts = {}
    for forced in (parts, 1):
        with emu_tuning(kv_splits=forced):
            launches, blocks = emu.launches(), emu.blocks()
            q = torch.zeros(case.B, case.Hq, case.Sq, case.Dqk, dtype=case.dtype)
            k = torch.zeros(case.B, case.Hkv, case.Sk, case.Dqk, dtype=case.dtype)
            v = torch.zeros(case.B, case.Hkv, case.Sk, case.Dv, dtype=case.dtype)
            emu.attention(*attention_op_args(q, k, v, scale=1.0))
            counts[forced] = (emu.launches() - launches, emu.blocks() - blocks)
            check_emulated(case, lse_grad=forced == 1)
    split_launches, split_blocks = counts[parts]
    launches, blocks = counts[1]
    assert split_launches == launches + 1 == 2, counts
    combine_blocks = -(-case.B * case.Hq * case.Sq // 8)  # one warp per row, 8 rows a block
    assert split_blocks == parts * blocks + combine_blocks, counts


def test_split_kv_is_deterministic_and_close_to_unsplit(emu):
    """The parts are merged in a fixed order: the same call twice is bitwise the same; and the
    split result is the unsplit one up to the rounding of the merge (fp32)."""
    case = Case(B=1, Hq=2, Hkv=1, Sq=20, Sk=500, Dqk=32, Dv=32, dtype=F32, rel_bias=30, causal=True)
    inp = make_inputs(case, requires_grad=False)
    args = lambda: attention_op_args(inp["q"], inp["k"], inp["v"], scale=0.3, causal=True,
                                     rel_bias=inp["rel_bias"])
    with emu_tuning(kv_splits=6):
        out1, lse1 = emu.attention(*args())
        out2, lse2 = emu.attention(*args())
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    with emu_tuning(kv_splits=1):
        out0, lse0 = emu.attention(*args())
    torch.testing.assert_close(out1, out0, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse1, lse0, atol=2e-6, rtol=1e-6)


def test_split_kv_heuristic(emu, monkeypatch):
    """Left to its own choice (kv_splits=0) the host splits only a grid that leaves the GPU's
    block slots idle, and only with enough keys (>= 128 a part): a 300-key decode step on 132
    SMs splits (one launch more: the combine), on 1 SM it does not; a 60-key call never does."""

    def launches(sms, Sk):
        monkeypatch.setenv("FASTATTN_EMU_SMS", sms)
        q = torch.zeros(1, 2, 1, 32, dtype=BF16)
        k = torch.zeros(1, 2, Sk, 32, dtype=BF16)
        before = emu.launches()
        with emu_tuning(kv_splits=0):
            emu.attention(*attention_op_args(q, k, k, scale=1.0))
        return emu.launches() - before

    assert launches("132", 300) == 2
    assert launches("1", 300) == 1
    assert launches("132", 60) == 1


DECODE_CASES = [
    # GQA / MQA decode steps (Sq = 1): folded into query rows when no rule differs per head and
    # every key is visible to the one query (True), kept per head otherwise (False).
    (Case(B=2, Hq=8, Hkv=2, Sq=1, Sk=150, Dqk=32, Dv=40, dtype=BF16, key_lengths=(150, 7)), True),
    (Case(B=1, Hq=6, Hkv=1, Sq=1, Sk=90, Dqk=64, Dv=64, dtype=F16, causal=True, scale="tensor"), True),
    (Case(B=2, Hq=4, Hkv=2, Sq=1, Sk=70, Dqk=16, Dv=16, dtype=F32, window=(69, 0), num_global=2,
          layout="bshd", key_lengths=(0, 70)), True),
    (Case(B=1, Hq=4, Hkv=2, Sq=1, Sk=70, Dqk=16, Dv=16, dtype=F32, window=(20, 0), num_global=2), False),
    (Case(B=1, Hq=4, Hkv=1, Sq=1, Sk=70, Dqk=16, Dv=16, dtype=BF16, rel_bias=8), False),
    (Case(B=1, Hq=4, Hkv=2, Sq=1, Sk=70, Dqk=16, Dv=16, dtype=F16, alibi=True, causal=True), False),
    (Case(B=1, Hq=4, Hkv=4, Sq=1, Sk=70, Dqk=16, Dv=16, dtype=F16), False),  # MHA: nothing to fold
]


@pytest.mark.parametrize("parts", (1, 3), ids=("unsplit", "parts3"))
@pytest.mark.parametrize("case,folded", DECODE_CASES, ids=[case_id(c) for c, _ in DECODE_CASES])
def test_decode_step_group_folded_into_rows(emu, case, folded, parts):
    """A GQA/MQA decode step whose query heads share every rule runs as one head with `group`
    query rows (one forward block per kv head and part instead of one per query head and
    part); it and the unfolded steps match the reference, with gradients, split or not."""
    inp = make_inputs(case, requires_grad=False)
    options = {name: value for name, value in inp.items() if name not in ("q", "k", "v")}
    with emu_tuning(kv_splits=parts):
        before = emu.blocks()
        emulated_attention(inp["q"], inp["k"], inp["v"], **options, **case.options())
        combine_blocks = -(-case.B * case.Hq // 8) if parts > 1 else 0  # one warp per output row
        expected_blocks = parts * case.B * (case.Hkv if folded else case.Hq) + combine_blocks
        assert emu.blocks() - before == expected_blocks
        check_emulated(case, lse_grad=True)


@pytest.mark.parametrize("slack", (8.0, 0.0), ids=("slack8", "slack0"))
@pytest.mark.parametrize("dtype", (F16, F32), ids=("float16", "float32"))
def test_forward_lazy_rescale(emu, dtype, slack):
    """The forward rescales a row's output only when a tile's logits exceed the row's reference
    max by more than 2^8 in exp2 terms (rescale_slack=0, a profiling switch: whenever the max
    grows). Rows whose logits grow steadily (a rescale every tile), shrink
    (none after the first), grow slowly (P up to 2^8 without a rescale: fp16 P must not
    overflow), or jump once by a lot, all match the reference."""
    Sk, D = 300, 16
    j = torch.arange(Sk, dtype=torch.float64)
    k = torch.zeros(1, 1, Sk, D, dtype=torch.float64)
    k[0, 0, :, 0] = 0.1 * j                  # logit of row r at key j: q[r, 0] * 0.1 j (+ jump)
    k[0, 0, 200, 1] = 1.0                    # a jump at key 200 for the last row
    q = torch.zeros(1, 1, 4, D, dtype=torch.float64)
    q[0, 0, :, 0] = torch.tensor([1.0, -1.0, 0.02, 0.0])
    q[0, 0, 3, 1] = 25.0
    v = torch.randn(1, 1, Sk, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with emu_tuning(kv_splits=1, rescale_slack=slack):
        out, lse = emu.attention(*attention_op_args(q.to(dtype), k.to(dtype), v.to(dtype), scale=1.0))
    ref_out, ref_lse = fastattn.reference.attention(q.to(dtype).double(), k.to(dtype).double(),
                                                    v.to(dtype).double(), scale=1.0, return_lse=True)
    atol = 2e-3 if dtype == F16 else 1e-5
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# arguments at the ends of their ranges, and autograd without a formula
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window,num_global", [((-1, 2 ** 63 - 1), 0), ((2 ** 62, 2 ** 62), 0),
                                                ((2 ** 63 - 1, -1), 0), ((1, 0), 40), ((2, 2), 2 ** 63 - 1)])
def test_window_and_globals_past_the_sequence(emu, window, num_global):
    """A window bound past every distance is unbounded on its side; num_global past the keys
    makes every key global; both as fastattn.reference, with gradients."""
    case = Case(B=1, Hq=2, Hkv=1, Sq=20, Sk=33, Dqk=16, Dv=16, dtype=F32, window=window,
                num_global=num_global, causal=num_global > 0, rel_bias=4)
    check_emulated(case, lse_grad=True)


def test_double_backward_raises(emu):
    q = torch.randn(1, 2, 9, 16, requires_grad=True)
    k, v = torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 16)
    out = emulated_attention(q, k, v, causal=True)
    g, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        g.sum().backward()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("mask,key,rows", [(dict(causal=True), -1, slice(0, 39)),
                                           (dict(window=(1, 0), rel_bias=5), 0, slice(2, 40))],
                         ids=["causal", "window-table"])
def test_non_finite_hidden_key_leaves_other_rows_finite(emu, bad, mask, key, rows):
    """A NaN or +inf in a key a row cannot see never reaches that row (masked logits are
    selected to -inf, not offset)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    k[:, :, key, 0] = bad
    kw = dict(mask)
    if "rel_bias" in kw:
        kw["rel_bias"] = torch.randn(2 * kw["rel_bias"] - 1, 2, generator=g)
    out, lse = emulated_attention(q, k, v, return_lse=True, **kw)
    want = fastattn.reference.attention(q.double(), k.double(), v.double(), **kw)
    assert torch.isfinite(out[:, :, rows]).all() and torch.isfinite(lse[:, :, rows]).all()
    torch.testing.assert_close(out[:, :, rows].double(), want[:, :, rows], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# dropout: the emulated CUDA kernels draw the CPU kernel's mask bit for bit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,shape,parts", [
    (F32, (2, 4, 2, 33, 47), 0), (F16, (1, 2, 2, 70, 140), 0), (BF16, (1, 2, 1, 40, 250), 3),
    (BF16, (2, 8, 2, 1, 90), 0),  # decode steps: the group folded into rows
], ids=["f32", "f16", "bf16-split", "bf16-decode"])
def test_dropout_mask_matches_the_cpu_kernel(emu, dtype, shape, parts):
    """Zero scores and v = identity: out[b, h, i, j] != 0 exactly where the weight was kept."""
    B, Hq, Hkv, Sq, Sk = shape
    q = torch.zeros(B, Hq, Sq, 16, dtype=dtype)
    k = torch.zeros(B, Hkv, Sk, 16, dtype=dtype)
    v = torch.eye(Sk, dtype=dtype).expand(B, Hkv, Sk, Sk).contiguous()
    seed = torch.tensor([2 ** 62 + 5, 11])
    want, _ = torch.ops.fastattn.attention(*attention_op_args(q, k, v, dropout_p=0.4, dropout_seed=seed))
    with emu_tuning(kv_splits=parts):
        got, _ = emu.attention(*attention_op_args(q, k, v, dropout_p=0.4, dropout_seed=seed))
    assert torch.equal(got != 0, want != 0)
    assert 0.5 < (want != 0).float().mean().item() < 0.7


@pytest.mark.parametrize("case", [
    Case(**GQA, dtype=F32, causal=True, rel_bias=5, scale="tensor"),
    Case(**LONGQ, dtype=F16, window=(0, 5), span="bh", span_values=(3.5, 9.25), span_ramp=4.0, softcap=2.0),
    Case(B=1, Hq=2, Hkv=1, Sq=70, Sk=140, Dqk=32, Dv=32, dtype=BF16, alibi=True, num_global=2,
         key_lengths=(100,)),
], ids=case_id)
def test_dropout_forward_and_backward_match_the_cpu_kernel(emu, case):
    """The same seed on both kernels: outputs and every gradient agree (the mask and the
    gradient formulas dS = P (dP z - D), dV = (P z)^T dO)."""
    results = []
    for fn in (fastattn.attention, emulated_attention):
        inp = make_inputs(case)
        options = {n: inp[n] for n in ("rel_bias", "alibi_slopes", "span", "key_lengths", "scale") if n in inp}
        out = fn(inp["q"], inp["k"], inp["v"], causal=case.causal, window=case.window,
                 num_global=case.num_global, span_ramp=case.span_ramp, softcap=case.softcap,
                 dropout_p=0.2, generator=torch.Generator().manual_seed(8), **options)
        leaves = [t for t in (inp["q"], inp["k"], inp["v"], *options.values()) if t.requires_grad]
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    tol = dict(atol=2e-5, rtol=2e-5) if case.dtype == F32 else dict(atol=3e-2, rtol=3e-2)
    for cpu, emulated in zip(*results):
        torch.testing.assert_close(emulated.float(), cpu.float(), **tol)


@pytest.mark.parametrize("dtype,table_rows", [(F32, None), (BF16, 9)], ids=["f32", "bf16-table"])
def test_alibi_slopes_gradient(emu, dtype, table_rows):
    """Learned ALiBi slopes through the emulated kernels' per-distance table gradient."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, s, 32, generator=g).to(dtype).requires_grad_() for s in (70, 140, 140))
    slopes = torch.tensor([0.1, 0.02], requires_grad=True)
    table = torch.randn(table_rows, 2, generator=g).requires_grad_() if table_rows else None
    leaves = [q, k, v, slopes] + ([table] if table_rows else [])
    grad_out = torch.randn(1, 2, 70, 32, generator=g).to(dtype)
    got = torch.autograd.grad(emulated_attention(q, k, v, causal=True, alibi_slopes=slopes, rel_bias=table),
                              leaves, grad_out)
    want = torch.autograd.grad(fastattn.reference.attention(q, k, v, causal=True, alibi_slopes=slopes,
                                                            rel_bias=table), leaves, grad_out)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == F32 else dict(atol=5e-2, rtol=5e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiles_the_mask_hides_are_skipped(emu, dtype):
    """A tile whose attn_mask pairs are all hidden is skipped by the whole block (a
    __syncthreads_or vote) in the forward and in the backward: with a block-diagonal mask the
    kernels run fewer tensor-core products than with an all-True mask of the same shape, and
    give the reference's result (test_emulated_kernels_match_reference's block-diagonal
    cases)."""
    S, doc = 256, 32  # eight documents of 32 tokens: 1/8 of the pairs visible
    case = Case(B=1, Hq=1, Hkv=1, Sq=S, Sk=S, Dqk=32, Dv=32, dtype=dtype)
    inp = make_inputs(case)
    ids = torch.arange(S) // doc
    blocks = (ids[:, None] == ids[None, :]).expand(1, 1, S, S)
    counts = {}
    for name, mask in (("blocks", blocks), ("all", torch.ones_like(blocks))):
        q, k, v = (inp[n].detach().requires_grad_() for n in ("q", "k", "v"))
        before = emu.mmas()
        out = emulated_attention(q, k, v, attn_mask=mask)
        forward = emu.mmas() - before
        out.sum().backward()
        counts[name] = (forward, emu.mmas() - before - forward)
    # tiles of up to 128 x 64 pairs: at most half of the tiles hold a visible pair
    assert counts["blocks"][0] <= 0.5 * counts["all"][0], counts
    assert counts["blocks"][1] <= 0.5 * counts["all"][1], counts


# ---------------------------------------------------------------------------------------------
# attention_varlen on the emulated kernels (registered as for CUDA: the packed views go to the
# kernels as they are, rows H * D apart)
# ---------------------------------------------------------------------------------------------
_VARLEN_SIGNATURE = inspect.signature(fastattn.attention_varlen)


def emulated_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **options):
    """fastattn.attention_varlen(...) on the emulated CUDA kernels."""
    bound = _VARLEN_SIGNATURE.bind(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    bound.apply_defaults()
    return fastattn.functional._attention_varlen(torch.ops.fastattn_emu.attention_varlen.default,
                                                 *bound.arguments.values())


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("options", [
    dict(causal=True, table=True),
    dict(window=(5, 3), alibi="per-sequence", span="per-sequence", dropout_p=0.2),
], ids=["causal-table", "window-alibi-span-dropout"])
def test_varlen_equals_per_sequence_calls(emu, dtype, options):
    """The packed call on the emulated kernels against one emulated attention call per
    sequence: the same kernels on the same rows, so outputs, lse and every gradient agree bit
    for bit (sequences of 0, 1, 40 and 70 queries, keys on tile edges)."""
    lq, lk = [3, 0, 40, 1, 70], [5, 2, 64, 0, 129]
    g = torch.Generator().manual_seed(6)
    Hq, Hkv, D = 4, 2, 32
    q = torch.randn(sum(lq), Hq, D, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(sum(lk), Hkv, D, generator=g).to(dtype).requires_grad_() for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32) for x in (lq, lk))
    n = len(lq)
    o = dict(causal=options.get("causal", False), window=options.get("window", (-1, -1)),
             dropout_p=options.get("dropout_p", 0.0))
    if options.get("table"):
        o["rel_bias"] = torch.randn(17, Hq, generator=g).requires_grad_()
    if options.get("alibi"):
        o["alibi_slopes"] = (0.05 + 0.2 * torch.rand(n, Hq, generator=g)).requires_grad_()
    if options.get("span"):
        o["span"] = (3.3 + 20 * torch.rand(n, Hq, generator=g)).requires_grad_()
        o["span_ramp"] = 4.0
    leaves = [q, k, v] + [t for t in o.values() if isinstance(t, torch.Tensor)]
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    out, lse = emulated_attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), generator=gen(), return_lse=True, **o)
    seed = fastattn.functional.dropout_seed(o["dropout_p"], gen(), q)
    want, want_lse = per_sequence_calls(q, k, v, cu_q, cu_k, o,
                                        fn=seeded_sequence_calls(seed, n, torch.ops.fastattn_emu.attention.default))
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert out.float().abs().sum() > 0
    go = torch.randn(out.shape, generator=g).to(dtype)
    got = torch.autograd.grad(out, leaves, go)
    for a, b in zip(got, torch.autograd.grad(want, leaves, go)):
        assert torch.equal(a, b)
    # and close to the CPU kernels' packed call
    cpu = fastattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), generator=gen(), **o)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == F32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), cpu.float(), **tol)
