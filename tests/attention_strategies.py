"""Hypothesis strategies for random fastattn.attention calls, and the settings the random
tests run under.

The fixed grids of test_attention*.py cover every option and every pair of options at a few
chosen shapes. The random tests draw *everything* at once: shapes that land on and next to the
kernels' tile edges (CPU: 32-query / 128-key tiles; CUDA: 64/128-query blocks, 32/64/128-key
tiles), odd head dims, GQA groups, every mask and bias option with random values (windows,
global tokens, spans, small rel_bias tables whose clamped rows make whole tiles "uniform",
key_lengths down to 0, soft-capping), scale kinds, strided layouts, dtypes; each call is judged like the
fixed cases (conftest.check_case, or the emulator's check_emulated).

Span values sit at k + 1/4 or k + 3/4 and ramps at whole numbers, so no (query, key) pair
lands on the span mask's kinks (|d| = span or span + ramp, where the kernels' and the
references' one-sided derivatives legitimately differ) and the span gradient is always checked,
except for the draws that ask for whole-number spans on purpose (then span_grad=False).

Settings: conftest.random_settings.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from conftest import Case

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

# Sequence lengths at and beside the tile edges of both kernels.
TILE_EDGES = (31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 191, 192, 255, 256, 257)

DEVICE_KINDS = {
    # dtypes, head dims, the longest S, and two cost caps: `work`, the largest
    # B * Hq * Sq * Sk * max(Dqk, Dv) (the kernel), and `pairs`, the largest B * Hq * Sq * Sk
    # (the float64 dense references on the CPU, which every kind runs)
    "cpu": dict(dtypes=(F32, F64, BF16, F16), dims=st.integers(1, 80), max_seq=300,
                work=6_000_000, pairs=1_000_000),
    # the CUDA kernels: head dims 1..256 (zero-padded to 32/64/96/128/256)
    "cuda": dict(dtypes=(BF16, F16, F32),
                 dims=st.one_of(st.sampled_from((32, 64, 96, 128, 256)), st.integers(1, 256)),
                 max_seq=700, work=100_000_000, pairs=1_000_000),
    # the same kernels on the CPU emulator, which runs ~1e6 times slower than a GPU
    "emu": dict(dtypes=(BF16, F16, F32),
                dims=st.one_of(st.sampled_from((32, 64, 128)), st.integers(1, 136),
                               st.sampled_from((200, 256))),
                max_seq=300, work=2_500_000, pairs=1_000_000),
}


def _span_value(draw, limit: int, whole: bool) -> float:
    base = draw(st.one_of(st.integers(0, 8), st.integers(0, limit)))
    return float(base) if whole else base + draw(st.sampled_from((0.25, 0.75)))


@st.composite
def attention_cases(draw, kind: str = "cpu") -> tuple[Case, bool]:
    """(a Case for device `kind` ("cpu", "cuda" or "emu": CUDA kernels on the emulator, run on
    the CPU), whether to backprop an lse gradient too)."""
    spec = DEVICE_KINDS[kind]
    seq = st.one_of(st.integers(1, 40), st.sampled_from(TILE_EDGES), st.integers(1, spec["max_seq"]))
    Sq, Sk = draw(seq), draw(seq)
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from((1, 2, 3)))
    Dqk = draw(spec["dims"])
    Dv = draw(st.one_of(st.just(Dqk), spec["dims"]))
    # Keep the call within the caps: shorten the longer sequence (the draw stays
    # reproducible, and the tile-edge lengths mostly survive since they are short).
    while B * Hq * Sq * Sk * max(Dqk, Dv) > spec["work"] or B * Hq * Sq * Sk > spec["pairs"]:
        if Sq >= Sk:
            Sq = max(1, Sq // 2)
        else:
            Sk = max(1, Sk // 2)
    dtype = draw(st.sampled_from(spec["dtypes"]))

    causal = draw(st.booleans())
    reach = st.integers(-1, Sk + 4)
    window = draw(st.one_of(st.just((-1, -1)), st.tuples(reach, reach)))
    num_global = draw(st.one_of(st.just(0), st.integers(1, min(8, Sk))))  # G <= Sk
    rel_bias = draw(st.one_of(st.none(), st.integers(1, 6), st.integers(1, max(Sq, Sk) + 8)))
    alibi = draw(st.booleans())

    span = draw(st.sampled_from((None, "h", "bh")))
    span_values, span_ramp, span_grad = (3.5,), 32.0, True
    if span is not None:
        whole = draw(st.integers(0, 4)) == 0  # now and then spans on the kinks (no span gradient)
        count = Hq if span == "h" else B * Hq
        span_values = tuple(_span_value(draw, Sk + 40, whole) for _ in range(count))
        span_ramp = float(draw(st.integers(1, 40)))
        span_grad = not whole

    key_lengths = draw(st.one_of(st.none(), st.tuples(*[st.integers(0, Sk)] * B)))
    scale = draw(st.one_of(st.sampled_from(("default", "tensor")),
                           st.integers(5, 200).map(lambda x: x / 100)))
    # soft-capping: off, tight (most logits in tanh's curved part) or loose
    softcap = draw(st.sampled_from((0.0, 0.0, 0.5, 3.0, 30.0)))
    dropout = draw(st.sampled_from((0.0, 0.0, 0.0, 0.1, 0.5)))
    # positions: the defaults most of the time, else per-batch offsets (either may stay default)
    offsets = st.one_of(st.none(), st.tuples(*[st.integers(-2 * (Sq + Sk), 2 * (Sq + Sk))] * B))
    q_offset, k_offset = (draw(offsets), draw(offsets)) if draw(st.integers(0, 2)) == 0 else (None, None)
    attn_mask = draw(st.sampled_from((None, None, None, "bool", "float", "float_grad")))
    layouts = ["contiguous", "bshd", "lastdim"]
    if Sq == Sk and Dqk == Dv:
        layouts.append("packed")
    layout = draw(st.sampled_from(layouts))
    case = Case(B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, Dqk=Dqk, Dv=Dv, dtype=dtype,
                device="cuda" if kind == "cuda" else "cpu", causal=causal, window=window,
                rel_bias=rel_bias, alibi=alibi, span=span, span_values=span_values,
                span_ramp=span_ramp, span_grad=span_grad, num_global=num_global,
                key_lengths=key_lengths, scale=scale, softcap=softcap, dropout=dropout, q_offset=q_offset,
                k_offset=k_offset, attn_mask=attn_mask, layout=layout,
                seed=draw(st.integers(0, 2 ** 20)))
    return case, draw(st.booleans())
