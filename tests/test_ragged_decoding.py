"""Decoding a batch whose rows have KV caches of different lengths (right-padded prompts, as
FlashAttention's cache_seqlens): the modules keep each row's length in cache["lengths"], put
each row's new tokens after its own end and run the attention with per-row positions
(q_offset); every row must then equal that row decoded alone, without padding."""
import pytest
import torch

from fastattn import nn as fnn

TOL = dict(atol=1e-9, rtol=1e-7)  # float64


def _mha(**kw):
    return fnn.MultiheadAttention(16, 4, causal=True, **kw)


def _mla(**kw):
    return fnn.MultiheadLatentAttention(16, 4, 6, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3,
                                        causal=True, **kw)


MODULES = {
    "mha-rope-table": lambda impl: _mha(n_kv_head=2, rotary="rope", rel_bias_max_dist=5, impl=impl),
    "mqa-givens-alibi-window": lambda impl: _mha(n_kv_head=1, rotary="givens", alibi=True, window=(3, 0),
                                                 impl=impl),
    "mha-global-temperature": lambda impl: _mha(rotary="rope", num_global=2, learnable_temperature=True,
                                                impl=impl),
    "adaptive-span": lambda impl: fnn.AdaptiveSpanAttention(16, 4, max_span=3.5, span_ramp=2, causal=True,
                                                            rotary="rope", impl=impl),
    "mla": lambda impl: _mla(impl=impl),
}

LENGTHS = [7, 4, 1, 0]  # rows of a right-padded prompt batch of width 7 (0: nothing yet)


def _decode(m, x, steps, **kw):
    """Prefill x[:, :7] with key_lengths=LENGTHS, then one call per entry of steps, each adding
    that many tokens to every row (row b's tokens are x[b, L_b + t ...])."""
    lens = torch.tensor(LENGTHS)
    outs, cache = m(x[:, :7], cache={}, key_lengths=lens, **kw)
    outs = [[outs[b, :LENGTHS[b]]] for b in range(len(LENGTHS))]
    done = 0
    for n in steps:
        new = torch.stack([x[b, LENGTHS[b] + done:LENGTHS[b] + done + n] for b in range(len(LENGTHS))])
        out, cache = m(new, cache=cache, **kw)
        for b in range(len(LENGTHS)):
            outs[b].append(out[b])
        done += n
    return [torch.cat(o) for o in outs], cache


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_rows_of_different_lengths_decode_as_each_row_alone(name, impl):
    torch.manual_seed(0)
    m = MODULES[name](impl).double().eval()
    x = torch.randn(len(LENGTHS), 7 + 4, 16, dtype=torch.float64)
    with torch.no_grad():
        got, cache = _decode(m, x, [1, 2, 1])
    assert cache["lengths"].tolist() == [L + 4 for L in LENGTHS]
    for b, L in enumerate(LENGTHS):
        alone = m(x[b:b + 1, :L + 4])[0]
        torch.testing.assert_close(got[b], alone, **TOL)


@pytest.mark.parametrize("name", ["mha-rope-table", "mla"])
def test_ragged_decoding_in_grad_mode_gives_the_rows_gradients(name):
    """With autograd recording, the cache is concatenated instead of grown in place, and the
    new entries are written into that copy: gradients reach the parameters as the unpadded
    rows' own passes give them."""
    torch.manual_seed(1)
    m = MODULES[name]("fused").double()
    x = torch.randn(len(LENGTHS), 7 + 3, 16, dtype=torch.float64)
    got, _ = _decode(m, x, [1, 2])
    weights = [torch.randn_like(g) for g in got]
    params = [p for p in m.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), params, allow_unused=True)
    alone = [m(x[b:b + 1, :L + 3])[0] for b, L in enumerate(LENGTHS)]
    g_want = torch.autograd.grad(sum((a * w).sum() for a, w in zip(alone, weights)), params, allow_unused=True)
    for a, g in zip(alone, got):
        torch.testing.assert_close(g, a, **TOL)
    for a, b in zip(g_got, g_want):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, **TOL)


def test_mla_expanded_path_reads_the_ragged_cache():
    torch.manual_seed(2)
    m = MODULES["mla"]("fused").double().eval()
    x = torch.randn(len(LENGTHS), 9, 16, dtype=torch.float64)
    with torch.no_grad():
        got, _ = _decode(m, x, [2], absorb=False)
        for b, L in enumerate(LENGTHS):
            torch.testing.assert_close(got[b], m(x[b:b + 1, :L + 2])[0], **TOL)


def test_a_cache_started_without_key_lengths_has_no_lengths():
    m = _mha(impl="fused")
    _, cache = m(torch.randn(2, 3, 16), cache={})
    assert set(cache) == {"k", "v"}


def test_caller_supplied_lengths_are_checked():
    m = _mha(impl="fused")
    with torch.no_grad():
        _, cache = m(torch.randn(2, 3, 16), cache={})
    x = torch.randn(2, 1, 16)
    with pytest.raises(ValueError, match=r"key_lengths must be None when the cache holds per-row lengths"):
        m(x, cache={**cache, "lengths": torch.tensor([3, 2])}, key_lengths=torch.tensor([4, 3]))
    with pytest.raises(TypeError, match=r"cache\['lengths'\] must be an int32 or int64 tensor, got .* torch.float32"):
        m(x, cache={**cache, "lengths": torch.tensor([3.0, 2.0])})
    with pytest.raises(ValueError, match=r"cache\['lengths'\] must have shape \(2,\) on cpu, got \(3,\)"):
        m(x, cache={**cache, "lengths": torch.tensor([3, 2, 1])})
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\] .* got values in \[2, 4\]"):
        m(x, cache={**cache, "lengths": torch.tensor([4, 2])})
    out, new = m(x, cache={**cache, "lengths": torch.tensor([3, 2], dtype=torch.int32)})
    assert new["lengths"].tolist() == [4, 3]
