"""Attention dropout in fastattn.reference: the plain-PyTorch Philox-4x32-10, the keep mask
drawn from it, and reference.attention(dropout_p=..., dropout_seed=...).

Philox against Random123's published known-answer vectors and against a scalar Python-int
implementation written here from the paper's round function; the mask element by element
against the layout written out here (counter (j >> 3, i, b*H + h, offset), 16-bit halves);
its statistics (kept fraction, correlations of neighbours) over millions of elements; the
dropped attention against the masked formula, its gradients (gradcheck), and its mean over
many (seed, offset) pairs against the undropped output. Every seed value is fixed: the
statistical bounds are 5 standard deviations, on the same numbers every run.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import dense_visibility_and_bias
from fastattn import reference

F64 = torch.float64
U32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# an independent scalar Philox-4x32-10 (Python ints: no overflow to work around)
# ---------------------------------------------------------------------------------------------
def philox_scalar(counter, key):
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & U32, (k1 + 0xBB67AE85) & U32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & U32, (p0 >> 32) ^ c3 ^ k1, p0 & U32
    return c0, c1, c2, c3


def mask_scalar(seed, offset, B, H, Sq, Sk, p, q_offset=None, k_offset=0):
    """The keep mask from the spec, one element at a time: query i at position
    P = q_offset + i (default Sk - Sq), key j at K = k_offset + j."""
    threshold = min(max(round((1.0 - p) * 65536.0), 0), 65536)
    key = (seed & U32, (seed >> 32) & U32)
    q_offset = Sk - Sq if q_offset is None else q_offset
    out = torch.zeros(B, H, Sq, Sk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(Sq):
                for j in range(Sk):
                    qpos, kpos = q_offset + i, k_offset + j  # (Python's >> floors: arithmetic shift)
                    words = philox_scalar(((kpos >> 3) & U32, qpos & U32, (b * H + h) & U32, offset & U32), key)
                    w = words[(kpos >> 1) & 3]
                    u = (w >> 16) if kpos % 2 else (w & 0xFFFF)
                    out[b, h, i, j] = u < threshold
    return out


KAT = [  # Random123 kat_vectors, philox4x32 with 10 rounds: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((U32, U32, U32, U32), (U32, U32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
    t = lambda x: torch.tensor([x], dtype=torch.int64)  # noqa: E731
    got = reference.philox4x32_10(*map(t, counter), *map(t, key))
    assert tuple(int(w) for w in got) == expected
    assert philox_scalar(counter, key) == expected  # (the test's own Philox, for the tests below)


def test_philox_matches_scalar_python_on_random_and_edge_words():
    g = torch.Generator().manual_seed(7)
    n = 2000
    words = torch.randint(0, 2 ** 32, (6, n), generator=g, dtype=torch.int64)
    # words whose 16-bit halves sit at the edges of the split product
    edges = torch.tensor([0, 1, 0xFFFF, 0x10000, 0xFFFF0000, U32 - 1, U32], dtype=torch.int64)
    words[:, :len(edges)] = edges
    words[:, len(edges):2 * len(edges)] = edges.flip(0)
    got = torch.stack(reference.philox4x32_10(*words))
    for col in range(n):
        c = [int(x) for x in words[:, col]]
        assert tuple(int(x) for x in got[:, col]) == philox_scalar(c[:4], c[4:]), f"column {col}: {c}"


def test_philox_takes_words_mod_2_32_and_broadcasts():
    a = reference.philox4x32_10(torch.tensor([-1, 3]), 2 ** 32 + 5, 0, 0, -2, 7)
    b = reference.philox4x32_10(torch.tensor([U32, 3]), 5, 0, 0, U32 - 1, 7)
    for x, y in zip(a, b):
        assert x.shape == (2,) and torch.equal(x, y)
    with pytest.raises(TypeError, match="int64"):
        reference.philox4x32_10(torch.tensor([1], dtype=torch.int32), 0, 0, 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# the mask
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 3), (-1, 2 ** 40 + 17), (2 ** 62 + 99, -5)],
                         ids=["zero", "small", "negative-seed", "large-seed"])
def test_mask_matches_the_layout_element_by_element(seed, offset):
    B, H, Sq, Sk, p = 2, 3, 4, 19, 0.3  # Sk: two full 8-key blocks and a partial one
    got = reference.dropout_keep_mask(seed, offset, B, H, Sq, Sk, p)
    assert got.dtype == torch.bool and got.shape == (B, H, Sq, Sk)
    assert torch.equal(got, mask_scalar(seed, offset, B, H, Sq, Sk, p))
    as_tensor = torch.tensor([seed, offset], dtype=torch.int64)
    assert torch.equal(reference.dropout_keep_mask(as_tensor[0], as_tensor[1], B, H, Sq, Sk, p), got)


def test_threshold_is_the_rounded_16_bit_keep_probability():
    assert reference.dropout_threshold(0.0) == 65536
    assert reference.dropout_threshold(0.5) == 32768
    assert reference.dropout_threshold(0.1) == 58982           # 58982.4
    assert reference.dropout_threshold(0.2) == 52429           # 52428.8
    assert reference.dropout_threshold(1 - 2 ** -17) == 0      # 0.5: half to even
    assert reference.dropout_threshold(1 - 3 * 2 ** -17) == 2  # 1.5: half to even
    assert reference.dropout_threshold(1 - 2 ** -10) == 64


def test_p_zero_keeps_everything_and_a_tiny_keep_probability_drops_everything():
    assert bool(reference.dropout_keep_mask(5, 0, 2, 2, 30, 70, 0.0).all())
    assert not bool(reference.dropout_keep_mask(5, 0, 2, 2, 30, 70, 1 - 2 ** -18).any())


STAT_SHAPE = (2, 4, 256, 1024)  # 2,097,152 elements


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_within_5_binomial_sigmas(p):
    mask = reference.dropout_keep_mask(2024, 11, *STAT_SHAPE, p)
    n = mask.numel()
    kept = mask.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma, f"p={p}: kept {kept:.6f}, expected {1 - p} +- {5 * sigma:.2g}"


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).mean() / (a.square().mean() * b.square().mean()).sqrt()).item()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_neighbours_are_uncorrelated(p):
    m = reference.dropout_keep_mask(77, 5, *STAT_SHAPE, p)
    pairs = {
        "j, j+1 (halves of a word, words of a call, calls)": (m[..., :-1], m[..., 1:]),
        "j, j+8 (consecutive counters)": (m[..., :-8], m[..., 8:]),
        "i, i+1": (m[:, :, :-1], m[:, :, 1:]),
        "h, h+1": (m[:, :-1], m[:, 1:]),
        "b, b+1": (m[:-1], m[1:]),
        "offset, offset+1": (m, reference.dropout_keep_mask(77, 6, *STAT_SHAPE, p)),
        "seed, seed+1": (m, reference.dropout_keep_mask(78, 5, *STAT_SHAPE, p)),
        "seed, seed + 2^32 (key word 1)": (m, reference.dropout_keep_mask(77 + 2 ** 32, 5, *STAT_SHAPE, p)),
    }
    for what, (a, b) in pairs.items():
        r = correlation(a, b)
        bound = 5 / math.sqrt(a.numel())
        assert abs(r) < bound, f"p={p}, {what}: correlation {r:.2g}, bound {bound:.2g}"


def test_same_seed_same_mask_other_seed_or_offset_another():
    shape, p = (2, 3, 64, 200), 0.5
    base = reference.dropout_keep_mask(9, 4, *shape, p)
    assert torch.equal(base, reference.dropout_keep_mask(9, 4, *shape, p))
    # only the offset's low 32 bits enter the counter
    assert torch.equal(base, reference.dropout_keep_mask(9, 4 + 2 ** 32, *shape, p))
    n = base.numel()
    for seed, offset in ((10, 4), (9, 5), (9 + 2 ** 32, 4), (-9, 4)):
        other = reference.dropout_keep_mask(seed, offset, *shape, p)
        differ = (other != base).double().mean().item()
        # independent masks differ with probability 2 p (1 - p)
        q = 2 * p * (1 - p)
        assert abs(differ - q) < 5 * math.sqrt(q * (1 - q) / n), f"({seed}, {offset}): {differ}"


# ---------------------------------------------------------------------------------------------
# reference.attention with dropout
# ---------------------------------------------------------------------------------------------
def _inputs(B=2, Hq=4, Hkv=2, Sq=9, Sk=13, D=5, Dv=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g, dtype=F64).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g, dtype=F64).to(dtype)
    v = torch.randn(B, Hkv, Sk, Dv, generator=g, dtype=F64).to(dtype)
    table = (0.5 * torch.randn(7, Hq, generator=g, dtype=F64)).to(dtype)
    return q, k, v, table


def _softmax_from_spec(q, k, *, causal, rel_bias, key_lengths=None):
    """(B, Hq, Sq, Sk) weights of conftest's dense rules, written without reference.py."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    visible, bias = dense_visibility_and_bias(B, Hq, Sq, Sk, causal=causal, rel_bias=rel_bias,
                                              key_lengths=key_lengths)
    kr = k.repeat_interleave(Hq // k.shape[1], 1)
    logits = (q @ kr.transpose(-1, -2)) * D ** -0.5 + bias
    w = torch.softmax(logits.masked_fill(~visible, -math.inf), -1)
    return w.nan_to_num(0.0)  # rows with no visible key


@pytest.mark.parametrize("seed_form", ["tuple", "tensor"])
def test_dropped_attention_is_the_masked_formula_and_lse_is_unchanged(seed_form):
    q, k, v, table = _inputs()
    B, Hq, Sq, Sk, p = 2, 4, 9, 13, 0.3
    kl = torch.tensor([13, 6])
    seed = (-314159, 2 ** 33 + 7)
    ds = seed if seed_form == "tuple" else torch.tensor(seed, dtype=torch.int64)
    out, lse = reference.attention(q, k, v, causal=True, rel_bias=table, key_lengths=kl, dropout_p=p,
                                   dropout_seed=ds, return_lse=True)
    _, lse0 = reference.attention(q, k, v, causal=True, rel_bias=table, key_lengths=kl, return_lse=True)
    assert torch.equal(lse, lse0)
    keep = mask_scalar(seed[0], seed[1], B, Hq, Sq, Sk, p)
    w = _softmax_from_spec(q, k, causal=True, rel_bias=table, key_lengths=kl)
    expected = (w * keep / (1 - p)) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # the mask really dropped something, and kept weights were scaled
    assert 0 < (~keep).sum() < keep.numel()
    assert not torch.allclose(out, reference.attention(q, k, v, causal=True, rel_bias=table, key_lengths=kl))


def test_dropout_in_float32_uses_the_rounded_rescale():
    q, k, v, _ = _inputs(dtype=torch.float32, Hkv=4)
    p = 0.1
    out = reference.attention(q, k, v, dropout_p=p, dropout_seed=(1, 2))
    keep = reference.dropout_keep_mask(1, 2, 2, 4, 9, 13, p)
    w = torch.softmax((q @ k.transpose(-1, -2)) * 5 ** -0.5, -1)
    rescale = torch.tensor(1 / (1 - p), dtype=torch.float32)  # 1.1111112, not 1.1111111111
    torch.testing.assert_close(out, (w * keep * rescale) @ v, rtol=2e-6, atol=2e-6)


def test_p_zero_is_plain_attention_and_needs_no_seed():
    q, k, v, table = _inputs()
    plain = reference.attention(q, k, v, rel_bias=table)
    assert torch.equal(reference.attention(q, k, v, rel_bias=table, dropout_p=0.0), plain)
    assert torch.equal(reference.attention(q, k, v, rel_bias=table, dropout_p=0.0, dropout_seed=(3, 4)), plain)


def test_gradcheck_with_a_fixed_mask():
    q, k, v, table = _inputs(B=1, Hq=2, Hkv=1, Sq=4, Sk=10, D=3, Dv=2, seed=3)
    leaves = [t.requires_grad_() for t in (q, k, v, table)]
    span = torch.tensor([3.3, 6.6], dtype=F64, requires_grad=True)

    def fn(q, k, v, table, span):
        return reference.attention(q, k, v, causal=True, rel_bias=table, span=span, span_ramp=2.0,
                                   dropout_p=0.4, dropout_seed=(42, 1))

    assert (~reference.dropout_keep_mask(42, 1, 1, 2, 4, 10, 0.4)).any()
    assert torch.autograd.gradcheck(fn, (*leaves, span))


def test_mean_over_many_masks_is_the_undropped_output():
    """E[out] = out without dropout; each element's variance is p / (1 - p) * sum_j P_ij^2 v_j^2
    (independent Bernoulli draws), so the mean of N draws is within 5 of its standard errors."""
    q, k, v, table = _inputs(B=1, Hq=2, Hkv=2, Sq=4, Sk=24, D=4, Dv=3, seed=5)
    p, N = 0.5, 600
    exact = reference.attention(q, k, v, rel_bias=table)
    draws = torch.stack([reference.attention(q, k, v, rel_bias=table, dropout_p=p, dropout_seed=(1000 + s, 7 * s))
                         for s in range(N)])
    w = _softmax_from_spec(q, k, causal=False, rel_bias=table)
    var = p / (1 - p) * (w.square() @ v.square())
    se = (var / N).sqrt()
    z = (draws.mean(0) - exact) / se
    assert z.abs().max() < 5, f"largest deviation {z.abs().max():.2f} standard errors"
    # the spread matches too: sample variance / formula, averaged over the 24 elements
    ratio = (draws.var(0) / var).mean().item()
    assert 0.85 < ratio < 1.15, ratio


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_dropout_arguments():
    q, k, v, _ = _inputs()
    for p in (1.0, -0.1, float("nan"), 2):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got"):
            reference.attention(q, k, v, dropout_p=p, dropout_seed=(1, 2))
    for p in ("0.1", True, None):
        with pytest.raises(TypeError, match="dropout_p must be a float"):
            reference.attention(q, k, v, dropout_p=p, dropout_seed=(1, 2))
    with pytest.raises(ValueError, match="dropout_seed .* must be given when dropout_p > 0, got None"):
        reference.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_seed must be a tensor of shape \(2,\).*got shape \(3,\)"):
        reference.attention(q, k, v, dropout_p=0.1, dropout_seed=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="dropout_seed must be an int64 tensor .* got torch.float32"):
        reference.attention(q, k, v, dropout_p=0.1, dropout_seed=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="dropout_seed must be a .*pair.* got 5"):
        reference.attention(q, k, v, dropout_p=0.1, dropout_seed=5)
    with pytest.raises(ValueError, match=r"seed must fit in int64 .* got 18446744073709551616"):
        reference.attention(q, k, v, dropout_p=0.1, dropout_seed=(2 ** 64, 0))
    with pytest.raises(TypeError, match="offset must be an int .* got float"):
        reference.attention(q, k, v, dropout_p=0.1, dropout_seed=(1, 2.0))


@pytest.mark.parametrize("q_offset,k_offset", [(-7, -3), (2 ** 33 + 5, 11), (0, -(2 ** 40) - 1)])
def test_mask_by_position_matches_the_scalar_spec(q_offset, k_offset):
    """Negative positions (arithmetic K >> 3), positions past 2^32 (each word mod 2^32)."""
    got = reference.dropout_keep_mask(99, 4, 1, 2, 5, 21, 0.3, q_offset=q_offset, k_offset=k_offset)
    assert torch.equal(got, mask_scalar(99, 4, 1, 2, 5, 21, 0.3, q_offset=q_offset, k_offset=k_offset))
