"""fastattn.nn modules against independent plain-PyTorch implementations (materialized softmax).

Every module runs with impl="reference" (fastattn.reference) here; the impl="fused" tests
compare the kernels against it and skip while the compiled ops are not registered.
"""

import copy
import inspect
import math

import pytest
import torch

import fastattn
from fastattn import nn as fnn
from fastattn import reference

TOL = dict(atol=2e-5, rtol=1e-4)
FUSED_TOL = dict(atol=1e-4, rtol=1e-3)


def _fused_ops_registered() -> bool:
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        return all(has(f"fastattn::{op}", "CPU") for op in ("attention", "rotary"))
    except Exception:
        return False


FUSED = _fused_ops_registered()
needs_fused = pytest.mark.skipif(not FUSED, reason="fastattn compiled ops are not registered")
# Dropout in the fused op: fastattn.attention(dropout_p=...). The modules pass dropout_p only
# in training mode with dropout > 0, so everything else runs without it.
FUSED_DROPOUT = FUSED and "dropout_p" in inspect.signature(fastattn.attention).parameters
needs_fused_dropout = pytest.mark.skipif(not FUSED_DROPOUT,
                                         reason="fastattn.attention has no dropout_p in this build")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny shapes: one thread is fastest, and immune to a busy machine's oversubscription
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------ independent plain PyTorch
def lin(x, layer):
    y = x @ layer.weight.t()
    return y if layer.bias is None else y + layer.bias


def heads(t, n):
    B, S, _ = t.shape
    return t.reshape(B, S, n, -1).permute(0, 2, 1, 3)


def merge(t):
    B, H, S, D = t.shape
    return t.permute(0, 2, 1, 3).reshape(B, S, H * D)


def distances(Sq, Sk):
    pq = torch.arange(Sq) + (Sk - Sq)  # bottom-right aligned
    return pq[:, None] - torch.arange(Sk)[None, :]


def naive_attention(q, k, v, *, scale, causal=False, window=(-1, -1), bias=None, span=None,
                    ramp=32.0, key_lengths=None, softcap=0.0, return_weights=False):
    """softmax(cap(scale q k^T) + bias) over the allowed keys; with a span, the weights are
    multiplied by the soft mask and renormalized. return_weights: also the weights."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    grp = torch.arange(H) // (H // k.shape[1])
    k, v = k[:, grp], v[:, grp]
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias
    d = distances(Sq, Sk)
    allowed = torch.ones(B, H, Sq, Sk, dtype=torch.bool)
    if causal:
        allowed &= d >= 0
    if window[0] >= 0:
        allowed &= d <= window[0]
    if window[1] >= 0:
        allowed &= d >= -window[1]
    if key_lengths is not None:
        allowed &= torch.arange(Sk)[None, None, None, :] < key_lengths[:, None, None, None]
    w = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    if span is not None:
        sp = span.reshape(-1, H, 1, 1) if span.dim() == 2 else span.reshape(1, H, 1, 1)
        m = ((ramp + sp - d.abs()) / ramp).clamp(0, 1)
        w = w * m
        w = w / w.sum(-1, keepdim=True)
    return (w @ v, w) if return_weights else w @ v


def naive_rope(x, inv_freq, positions, interleaved, rd):
    """RoPE as complex multiplication: pairs (t, t+rd/2) or (2t, 2t+1) are complex numbers."""
    ang = positions.to(inv_freq.dtype)[:, None] * inv_freq[None, :]
    rot = torch.polar(torch.ones_like(ang), ang)
    xr, rest = x[..., :rd], x[..., rd:]
    if interleaved:
        z = torch.view_as_complex(xr.reshape(*xr.shape[:-1], rd // 2, 2).contiguous()) * rot
        y = torch.view_as_real(z).flatten(-2)
    else:
        z = torch.complex(xr[..., : rd // 2], xr[..., rd // 2:]) * rot
        y = torch.cat([z.real, z.imag], dim=-1)
    return torch.cat([y, rest], dim=-1)


def naive_givens(thetas, pairs, D):
    R = torch.eye(D)
    for t, (i, j) in zip(thetas, pairs.tolist()):
        G = torch.eye(D)
        G[i, i] = torch.cos(t)
        G[j, j] = torch.cos(t)
        G[i, j] = -torch.sin(t)
        G[j, i] = torch.sin(t)
        R = R @ G
    return R


def naive_rotary_module(rot_mod, x, offset=0):
    if rot_mod is None:
        return x
    if isinstance(rot_mod, fnn.GivensRotaryEmbedding):
        x = x @ (naive_givens(rot_mod.thetas, rot_mod.rotation_pairs, rot_mod.head_dim)
                 @ rot_mod.rotation_matrix)
    pos = torch.arange(x.shape[2]) + offset
    return naive_rope(x, rot_mod.inv_freq, pos, rot_mod.interleaved, rot_mod.rotary_dim)


def naive_mha(m, x, xa=None, span=None, ramp=32.0, key_lengths=None, return_weights=False):
    q = heads(lin(x, m.q_proj), m.n_head)
    src = x if xa is None else xa
    k = heads(lin(src, m.k_proj), m.n_kv_head)
    v = heads(lin(src, m.v_proj), m.n_kv_head)
    q, k = naive_rotary_module(m.rotary, q), naive_rotary_module(m.rotary, k)
    d = distances(q.shape[2], k.shape[2])
    bias = torch.zeros(m.n_head, q.shape[2], k.shape[2])
    if m.rel_bias is not None:
        md = m.rel_bias.max_dist
        bias = bias + m.rel_bias.pos_bias[d.clamp(1 - md, md - 1) + md - 1].permute(2, 0, 1)
    if m.alibi_slopes is not None:
        bias = bias - m.alibi_slopes[:, None, None] * d.abs()
    scale = m.head_dim ** -0.5 if m.log_scale is None else torch.exp(m.log_scale)
    o, w = naive_attention(q, k, v, scale=scale, causal=m.causal, window=m.window, bias=bias,
                           span=span, ramp=ramp, key_lengths=key_lengths, softcap=m.softcap,
                           return_weights=True)
    out = lin(merge(o), m.out_proj)
    return (out, w) if return_weights else out


def naive_mla(m, x, return_weights=False):
    """DeepSeek-V2 MLA, expanded, from the module's weights."""
    B, S, _ = x.shape
    H, dn, dr, dv, dc = m.n_head, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank

    def rms(t, norm):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + (norm.eps or torch.finfo(t.dtype).eps)) * norm.weight

    if m.q_lora_rank is None:
        q = lin(x, m.q_proj)
    else:
        q = lin(rms(lin(x, m.q_a_proj), m.q_a_norm), m.q_b_proj)
    q = heads(q, H)
    ckv = lin(x, m.kv_a_proj)
    c, kr = rms(ckv[..., :dc], m.kv_a_norm), ckv[..., dc:]
    pos = torch.arange(S)
    q_rope = naive_rope(q[..., dn:], m.rotary.inv_freq, pos, m.rotary.interleaved, dr)
    k_rope = naive_rope(kr[:, None], m.rotary.inv_freq, pos, m.rotary.interleaved, dr)
    kv = heads(lin(c, m.kv_b_proj), H)
    k = torch.cat([kv[..., :dn], k_rope.expand(B, H, S, dr)], -1)
    qf = torch.cat([q[..., :dn], q_rope], -1)
    o, w = naive_attention(qf, k, kv[..., dn:], scale=(dn + dr) ** -0.5, causal=m.causal,
                           window=m.window, return_weights=True)
    out = lin(merge(o), m.out_proj)
    return (out, w) if return_weights else out


def naive_hybrid(m, x, return_weights=False):
    ln = torch.nn.functional.layer_norm
    g, w_global = naive_mha(m.attn_global, ln(x, (m.d_model,), m.ln_global.weight, m.ln_global.bias),
                            return_weights=True)
    span = m.max_span * torch.sigmoid(lin(g.mean(1), m.span_pred))
    loc, w_local = naive_mha(m.attn_local, ln(x, (m.d_model,), m.ln_local.weight, m.ln_local.bias),
                             span=span, ramp=m.span_ramp, return_weights=True)
    out = lin(torch.cat([loc, g], -1), m.projection)
    return (out, span, (w_local, w_global)) if return_weights else (out, span)


def grads(module, *inputs):
    return {**{n: p.grad for n, p in module.named_parameters()},
            **{f"input{i}": t.grad for i, t in enumerate(inputs)}}


def zero_grads(module, *inputs):
    module.zero_grad(set_to_none=True)
    for t in inputs:
        t.grad = None


def check_every_param_has_grad(module):
    for n, p in module.named_parameters():
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{n} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{n} got an all-zero gradient"


# ------------------------------------------------------------------ RelativePositionBias
def test_relative_position_bias_forward_matches_table():
    rb = fnn.RelativePositionBias(4, 3, init_std=1.0)
    b = rb(5, 7)
    assert b.shape == (1, 3, 5, 7)
    for i in range(5):
        for j in range(7):
            d = max(-3, min(3, (i + 2) - j))
            torch.testing.assert_close(b[0, :, i, j], rb.pos_bias[d + 3])


def test_update_dist_keeps_learned_values():
    rb = fnn.RelativePositionBias(4, 3, dtype=torch.float64)
    with torch.no_grad():
        rb.pos_bias.copy_(torch.randn(7, 3, dtype=torch.float64))
    before = rb(9, 9).clone()
    old = rb.pos_bias.detach().clone()
    rb.update_dist(6)  # grow: every distance keeps its bias (the old table clamped there)
    assert rb.max_dist == 6 and rb.pos_bias.shape == (11, 3)
    assert rb.pos_bias.dtype == torch.float64 and rb.pos_bias.requires_grad
    torch.testing.assert_close(rb.pos_bias[2:9], old)
    torch.testing.assert_close(rb.pos_bias[:2], old[:1].expand(2, 3))
    torch.testing.assert_close(rb.pos_bias[9:], old[-1:].expand(2, 3))
    torch.testing.assert_close(rb(9, 9), before)
    rb.update_dist(2)  # shrink: the central distances keep their values
    assert rb.pos_bias.shape == (3, 3)
    torch.testing.assert_close(rb.pos_bias, old[2:5])
    # a checkpoint taken at another max_dist loads into a fresh module
    fresh = fnn.RelativePositionBias(4, 3, dtype=torch.float64)
    fresh.load_state_dict(rb.state_dict())
    assert fresh.max_dist == 2
    torch.testing.assert_close(fresh.pos_bias, rb.pos_bias)


# ------------------------------------------------------------------ rotary
@pytest.mark.parametrize("interleaved,rotary_dim", [(False, None), (True, None), (False, 4), (True, 6)])
def test_rotary_matches_naive(interleaved, rotary_dim):
    rot = fnn.RotaryEmbedding(8, base=100.0, learned_freq=True, interleaved=interleaved,
                              rotary_dim=rotary_dim, impl="reference")
    x = torch.randn(2, 3, 5, 8, requires_grad=True)
    y = rot(x, offset=3)
    ref = naive_rope(x, rot.inv_freq, torch.arange(5) + 3, interleaved, rot.rotary_dim)
    torch.testing.assert_close(y, ref, **TOL)
    gy = torch.randn_like(y)
    g1 = torch.autograd.grad(y, (x, rot.inv_freq), gy)
    g2 = torch.autograd.grad(ref, (x, rot.inv_freq), gy)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL)
    assert isinstance(rot.inv_freq, torch.nn.Parameter)
    assert not isinstance(fnn.RotaryEmbedding(8).inv_freq, torch.nn.Parameter)


def test_givens_rotary_matches_naive_and_learns_everything():
    g = fnn.GivensRotaryEmbedding(6, 9, base=50.0, init_std=0.5, impl="reference")
    with torch.no_grad():
        g.rotation_matrix.add_(0.1 * torch.randn(6, 6))
    G = g.givens_matrix()
    torch.testing.assert_close(G @ G.t(), torch.eye(6), **TOL)  # a rotation
    torch.testing.assert_close(G, naive_givens(g.thetas, g.rotation_pairs, 6), **TOL)
    assert len({tuple(p) for p in g.rotation_pairs.tolist()}) == 9
    x = torch.randn(2, 2, 5, 6)
    y = g(x)
    torch.testing.assert_close(y, naive_rotary_module(g, x), **TOL)
    y.pow(2).mul(torch.randn_like(y)).sum().backward()
    check_every_param_has_grad(g)
    assert set(g.state_dict()) == {"inv_freq", "thetas", "rotation_matrix", "rotation_pairs"}


# ------------------------------------------------------------------ MultiheadAttention
MHA_CONFIGS = {
    "mha": dict(),
    "gqa-rope-causal": dict(n_kv_head=2, rotary="rope", causal=True),
    "mqa-givens-relbias": dict(n_kv_head=1, rotary="givens", n_rotations=5, rel_bias_max_dist=4),
    "alibi-temp-window": dict(n_kv_head=2, alibi=True, learnable_temperature=True, window=(2, 1)),
    "all": dict(n_kv_head=2, rotary="rope", interleaved=True, learned_freq=True, causal=True,
                window=(3, -1), rel_bias_max_dist=3, alibi=True, learnable_temperature=True),
    "softcap-relbias-temp": dict(n_kv_head=2, causal=True, softcap=0.7, rel_bias_max_dist=3,
                                 learnable_temperature=True),
}


def make_mha(cfg, impl="reference"):
    m = fnn.MultiheadAttention(16, 4, impl=impl, **MHA_CONFIGS[cfg])
    with torch.no_grad():  # non-trivial learned positions
        if m.rel_bias is not None:
            m.rel_bias.pos_bias.normal_()
        if isinstance(m.rotary, fnn.GivensRotaryEmbedding):
            m.rotary.thetas.normal_()
    return m


@pytest.mark.parametrize("cfg", list(MHA_CONFIGS))
def test_mha_matches_naive_forward_backward(cfg):
    m = make_mha(cfg)
    x = torch.randn(2, 6, 16, requires_grad=True)
    out = m(x)
    assert out.shape == (2, 6, 16)
    gy = torch.randn_like(out)
    out.backward(gy)
    check_every_param_has_grad(m)
    got = grads(m, x)
    zero_grads(m, x)
    ref = naive_mha(m, x)
    torch.testing.assert_close(out, ref, **TOL)
    ref.backward(gy)
    for n, g in grads(m, x).items():
        torch.testing.assert_close(got[n], g, **TOL, msg=lambda s: f"grad {n}: {s}")


def test_mha_cross_attention_and_key_lengths():
    m = fnn.MultiheadAttention(16, 4, 2, kdim=12, impl="reference")
    x, xa = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    kl = torch.tensor([7, 4])
    torch.testing.assert_close(m(x, xa, key_lengths=kl), naive_mha(m, x, xa, key_lengths=kl), **TOL)
    # the cache computes cross k/v once; later calls reuse them without xa
    out1, cache = m(x[:, :2], xa, cache={})
    assert set(cache) == {"cross_k", "cross_v"} and cache["cross_k"].shape == (2, 2, 7, 4)
    out2, cache2 = m(x[:, 2:], cache=cache)
    torch.testing.assert_close(torch.cat([out1, out2], 1), naive_mha(m, x, xa), **TOL)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("rotary", ["rope", "givens"])
def test_mha_kv_cache_decode_equals_full_pass(n_kv_head, rotary):
    m = fnn.MultiheadAttention(16, 4, n_kv_head, rotary=rotary, causal=True, window=(4, -1),
                               rel_bias_max_dist=3, alibi=True, impl="reference")
    with torch.no_grad():
        m.rel_bias.pos_bias.normal_()
    x = torch.randn(2, 9, 16)
    full = m(x)
    out, cache = m(x[:, :3], cache={})  # prefill
    outs = [out]
    for t in range(3, 9):
        out, cache = m(x[:, t:t + 1], cache=cache)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
    assert set(cache) == {"k", "v"} and cache["k"].shape == (2, n_kv_head, 9, 4)


def test_learnable_temperature_is_1d_and_loads_0dim_state_dicts():
    # log_scale is stored as (1,) (FSDP2 shards no 0-dim parameter); a state dict saved with
    # the former 0-dim log_scale still loads, into the same values and outputs.
    m = fnn.MultiheadAttention(16, 4, learnable_temperature=True, impl="reference")
    assert m.log_scale.shape == (1,)
    with torch.no_grad():
        m.log_scale.fill_(-0.7)
    old = {n: (t.reshape(()) if n == "log_scale" else t) for n, t in m.state_dict().items()}
    fresh = fnn.MultiheadAttention(16, 4, learnable_temperature=True, impl="reference")
    fresh.load_state_dict(old)
    assert fresh.log_scale.shape == (1,) and fresh.log_scale.item() == pytest.approx(-0.7)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    wrapped = torch.nn.Sequential(fresh)
    wrapped.load_state_dict({"0." + n: t for n, t in old.items()})  # under a prefix too


def _fsdp2_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        fnn.MultiheadAttention(16, 4, causal=True, learnable_temperature=True, rel_bias_max_dist=3),
        torch.nn.Linear(16, 3))


def _fsdp2_inputs(world):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 3, generator=g)) for _ in range(world)]


def _fsdp2_worker(rank, world, init_method):
    """One rank: the model sharded with fully_shard (each attention module, then the root),
    forward + backward on this rank's batch, against one unsharded copy run on every rank's batch:
    the same output, and the average of the per-rank gradients."""
    import gc
    import warnings
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        inputs = _fsdp2_inputs(world)
        plain = _fsdp2_model()
        names = [n for n, _ in plain.named_parameters()]
        want = [torch.zeros_like(p) for p in plain.parameters()]
        for i, (x, gy) in enumerate(inputs):
            out = plain(x)
            if i == rank:
                want_out = out.detach()
            for w, g in zip(want, torch.autograd.grad((out * gy).sum(), list(plain.parameters()))):
                w += g / world
        sharded = _fsdp2_model()
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(sharded[0], mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        x, gy = inputs[rank]
        out = sharded(x)
        (out * gy).sum().backward()
        torch.testing.assert_close(out.detach(), want_out, **FUSED_TOL)
        for n, p, w in zip(names, sharded.parameters(), want):
            torch.testing.assert_close(p.grad.full_tensor(), w, **FUSED_TOL, msg=lambda m: f"grad {n}: {m}")
        # Drop the sharded model and the mesh (they hold the process group) and wait for the other
        # rank before tearing gloo down: a group freed at interpreter exit, while its peer is
        # already gone, can abort the process from gloo's own threads.
        del sharded, mesh, out
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _fsdp2_unavailable():
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with the gloo backend is not available"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "torch.distributed.fsdp.fully_shard (FSDP2) is not available"
    return None


@needs_fused
def test_fsdp2_fully_shard_on_cpu(tmp_path):
    """FSDP2 shards a model holding MultiheadAttention(learnable_temperature, rel_bias) (no 0-dim
    parameter) and gives the single-process outputs and gradients: two processes, gloo."""
    reason = _fsdp2_unavailable()
    if reason:
        pytest.skip(reason)
    torch.multiprocessing.spawn(_fsdp2_worker, args=(2, f"file://{tmp_path / 'rendezvous'}"), nprocs=2)


# ------------------------------------------------------------------ the growing KV cache
def test_append_to_caches_grows_in_place_and_never_changes_a_view():
    from fastattn.nn._common import append_to_caches

    def append_to_cache(past, new, dim):
        (out,), joint = append_to_caches([past], [new], dim)
        assert joint is out or torch.equal(joint, out)
        return out

    prefill = torch.randn(2, 3, 5, 4)
    steps = [torch.randn(2, 3, 1, 4) for _ in range(4)]
    with torch.no_grad():
        a = append_to_cache(prefill, steps[0], dim=2)         # a new buffer with room
        b = append_to_cache(a, steps[1], dim=2)                # written into that room
        assert b.data_ptr() == a.data_ptr() and b._base is a._base
        a_before = a.clone()
        c = append_to_cache(a, steps[2], dim=2)                # a branch from an older view: copied
        assert c.data_ptr() != a.data_ptr()
        d = append_to_cache(b[:, :, :6], steps[3], dim=2)      # a rollback (sliced view): copied
        assert d.data_ptr() != b.data_ptr()
    torch.testing.assert_close(a, a_before, rtol=0, atol=0)
    torch.testing.assert_close(b, torch.cat([prefill, steps[0], steps[1]], 2), rtol=0, atol=0)
    torch.testing.assert_close(c, torch.cat([prefill, steps[0], steps[2]], 2), rtol=0, atol=0)
    torch.testing.assert_close(d, torch.cat([prefill, steps[0], steps[3]], 2), rtol=0, atol=0)
    # while autograd records, always a plain cat (a buffer written in place would break backward)
    leaf = torch.randn(2, 3, 1, 4, requires_grad=True)
    e = append_to_cache(b, leaf, dim=2)
    assert e._base is None and e.grad_fn is not None


def test_append_to_caches_keeps_caches_side_by_side():
    # MLA's latent and rotary key: one buffer, the joint [latent, k_rope] is a view of it
    from fastattn.nn._common import append_to_caches
    latent, rope = torch.randn(2, 5, 6), torch.randn(2, 5, 2)
    new_latent, new_rope = torch.randn(2, 1, 6), torch.randn(2, 1, 2)
    with torch.no_grad():
        (l1, r1), j1 = append_to_caches([latent, rope], [new_latent[:, :1], new_rope], dim=1)
        (l2, r2), j2 = append_to_caches([l1, r1], [new_latent, new_rope], dim=1)
    assert l2._base is r2._base is j2._base is j1._base and l2.data_ptr() == j2.data_ptr()
    want_l = torch.cat([latent, new_latent, new_latent], 1)
    want_r = torch.cat([rope, new_rope, new_rope], 1)
    torch.testing.assert_close(l2, want_l, rtol=0, atol=0)
    torch.testing.assert_close(r2, want_r, rtol=0, atol=0)
    torch.testing.assert_close(j2, torch.cat([want_l, want_r], -1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="last dim"):
        append_to_caches([latent], [new_latent], dim=-1)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_decoding_without_autograd_writes_one_cache_buffer(impl):
    """Generation runs under no_grad: the cache then grows in place (no copy of the whole cache
    per step) and decoding still equals the full pass, for MHA/GQA and MLA alike."""
    tol = TOL if impl == "reference" else FUSED_TOL
    torch.manual_seed(0)
    mha = fnn.MultiheadAttention(16, 4, 2, rotary="rope", causal=True, rel_bias_max_dist=3, impl=impl)
    mla = make_mla(impl=impl, causal=True)
    x = torch.randn(2, 9, 16)
    for m, key in ((mha, "k"), (mla, "latent"), (mla, "k_rope")):
        with torch.no_grad():
            full = m(x)
            out, cache = m(x[:, :3], cache={})
            outs, ptrs = [out], set()
            for t in range(3, 9):
                out, cache = m(x[:, t:t + 1], cache=cache)
                outs.append(out)
                ptrs.add(cache[key].data_ptr())
        torch.testing.assert_close(torch.cat(outs, 1), full, **tol)
        assert len(ptrs) == 1, f"{type(m).__name__}: the cache was copied during decoding"


def test_saving_a_decode_cache_writes_only_its_filled_part():
    """The cache tensors are views of a buffer with room to grow (uninitialized past the filled
    part): torch.save and deepcopy write only the filled part, which loads back equal (as plain
    tensors, with torch.load's default weights_only=True) and decodes on like the original."""
    import io
    impl = "fused" if FUSED else "reference"
    mha = fnn.MultiheadAttention(32, 4, 2, rotary="rope", causal=True, impl=impl)
    mla = fnn.MultiheadLatentAttention(32, 4, 24, qk_rope_head_dim=4, causal=True, impl=impl)
    x = torch.randn(2, 9, 32)

    def saved_bytes(obj):
        f = io.BytesIO()
        torch.save(obj, f)
        return f.getvalue()

    for m in (mha, mla):
        with torch.no_grad():
            _, cache = m(x[:, :3], cache={})
            for t in range(3, 8):
                _, cache = m(x[:, t:t + 1], cache=cache)
        buffers = {id(t._base): t._base for t in cache.values()}
        assert None not in buffers.values()  # (MHA: one buffer for k, one for v; MLA: one for both)
        buffer_bytes = sum(b.untyped_storage().nbytes() for b in buffers.values())
        data = saved_bytes(cache)
        compact = saved_bytes({n: t.clone() for n, t in cache.items()})
        assert len(data) <= len(compact) + 64 < buffer_bytes
        loaded = torch.load(io.BytesIO(data))
        copied = copy.deepcopy(cache)
        for got in (loaded, copied):
            assert set(got) == set(cache)
            for n, t in got.items():
                assert type(t) is torch.Tensor and t.untyped_storage().nbytes() == t.numel() * t.element_size()
                torch.testing.assert_close(t, cache[n], rtol=0, atol=0)
        with torch.no_grad():
            want, _ = m(x[:, 8:9], cache=cache)
            for got in (loaded, copied):
                out, _ = m(x[:, 8:9], cache=got)
                torch.testing.assert_close(out, want, rtol=0, atol=0)


def _frozen_but(m, trained):
    for n, p in m.named_parameters():
        p.requires_grad_(any(n.startswith(t) for t in trained))
    return m


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("what", ["table-and-temperature", "span", "mla-kv_b_proj"])
def test_decoding_in_grad_mode_trains_what_requires_grad(impl, what):
    """Parameter-efficient fine-tuning through a decode loop: the projections are frozen and only
    the table and temperature (or the span, or MLA's up-projection) train, so the cached k/v do
    not require grad but the attention call that reads them is recorded and saves them. The
    cache must then not grow in place under the saved tensors: backward runs and its gradients
    equal the full pass's."""
    if what == "table-and-temperature":
        m = fnn.MultiheadAttention(16, 4, causal=True, rel_bias_max_dist=3, learnable_temperature=True,
                                   impl=impl)
        m = _frozen_but(m, ("rel_bias", "log_scale"))
    elif what == "span":
        m = _frozen_but(fnn.AdaptiveSpanAttention(16, 4, max_span=3.5, span_ramp=2, impl=impl), ("span_frac",))
    else:
        m = _frozen_but(make_mla(impl=impl, causal=True), ("kv_b_proj",))
    trained = [p for p in m.parameters() if p.requires_grad]
    x = torch.randn(2, 7, 16)
    full = m(x)
    gy = torch.randn_like(full)
    want = torch.autograd.grad((full * gy).sum(), trained)
    out, cache = m(x[:, :2], cache={})
    outs = [out]
    for t in range(2, 7):
        out, cache = m(x[:, t:t + 1], cache=cache)
        outs.append(out)
    decoded = torch.cat(outs, 1)
    got = torch.autograd.grad((decoded * gy).sum(), trained)
    tol = TOL if impl == "reference" else FUSED_TOL
    torch.testing.assert_close(decoded, full, **tol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


# ------------------------------------------------------------------ MLA
def make_mla(impl="reference", **kw):
    return fnn.MultiheadLatentAttention(16, 4, 6, qk_nope_head_dim=4, qk_rope_head_dim=2,
                                        v_head_dim=3, impl=impl, **kw)


@pytest.mark.parametrize("q_lora_rank", [None, 5])
def test_mla_matches_naive_and_absorbed_equals_expanded(q_lora_rank):
    m = make_mla(q_lora_rank=q_lora_rank)
    with torch.no_grad():
        for p in m.parameters():  # RMSNorm weights away from 1
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 7, 16, requires_grad=True)
    exp = m(x)
    ref = naive_mla(m, x)
    torch.testing.assert_close(exp, ref, **TOL)
    gy = torch.randn_like(exp)
    exp.backward(gy)
    check_every_param_has_grad(m)
    g_exp = grads(m, x)
    zero_grads(m, x)
    ab = m(x, absorb=True)
    torch.testing.assert_close(ab, exp, **TOL)
    ab.backward(gy)
    for n, g in grads(m, x).items():
        torch.testing.assert_close(g, g_exp[n], **TOL, msg=lambda s: f"grad {n}: {s}")


def test_mla_kv_cache_holds_latent_only_and_decode_equals_full_pass():
    m = make_mla()
    x = torch.randn(2, 8, 16)
    full = m(x)  # expanded
    out, cache = m(x[:, :2], cache={})
    outs = [out]
    for t in range(2, 8):
        out, cache = m(x[:, t:t + 1], cache=cache)  # absorbed, over the cached latent
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
    assert set(cache) == {"latent", "k_rope"}
    assert cache["latent"].shape == (2, 8, 6) and cache["k_rope"].shape == (2, 8, 2)
    # the expanded path over the same cache agrees too
    past = {"latent": cache["latent"][:, :7], "k_rope": cache["k_rope"][:, :7]}
    out_e, _ = m(x[:, 7:8], cache=past, absorb=False)
    torch.testing.assert_close(out_e, full[:, 7:8], **TOL)


# ------------------------------------------------------------------ adaptive span / hybrid
def test_adaptive_span_matches_naive_and_span_learns():
    # max_span 6.5: no span frac * max_span + ramp lands on an integer distance, where the soft
    # mask has a kink and the gradient depends on the subgradient each formulation (and torch
    # version) picks there.
    m = fnn.AdaptiveSpanAttention(16, 4, max_span=6.5, span_ramp=3, n_kv_head=2, rotary="rope",
                                  impl="reference")
    with torch.no_grad():
        m.span_frac.copy_(torch.tensor([0.1, 0.4, 0.7, 1.0]))
    x = torch.randn(2, 12, 16, requires_grad=True)
    out = m(x)
    gy = torch.randn_like(out)
    (out * gy).sum().add(m.span_loss()).backward()
    check_every_param_has_grad(m)
    got = grads(m, x)
    zero_grads(m, x)
    ref = naive_mha(m, x, span=m.span(), ramp=3.0)
    torch.testing.assert_close(out, ref, **TOL)
    (ref * gy).sum().add(m.span_loss()).backward()
    for n, g in grads(m, x).items():
        torch.testing.assert_close(got[n], g, **TOL, msg=lambda s: f"grad {n}: {s}")
    assert m.span_frac.grad.abs().min() > 0
    with torch.no_grad():
        m.span_frac.add_(torch.tensor([-1.0, 0.0, 0.0, 1.0]))
    m.clamp_span_()
    assert m.span_frac.min() >= 0 and m.span_frac.max() <= 1
    # decode with a cache == full pass
    full = m(x).detach()
    outs, cache = [], {}
    for t in range(12):
        o, cache = m(x[:, t:t + 1].detach(), cache=cache)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)


def test_hybrid_matches_naive_and_predictor_gets_gradients():
    m = fnn.HybridAttention(16, 4, max_span=5, span_ramp=2, n_kv_head=2, rotary="rope",
                            impl="reference")
    x = torch.randn(2, 10, 16, requires_grad=True)
    out, span = m(x, return_span=True)
    assert out.shape == (2, 10, 16) and span.shape == (2, 4)
    gy = torch.randn_like(out)
    out.backward(gy)
    check_every_param_has_grad(m)  # span_pred included: its gradient comes through the span
    got = grads(m, x)
    zero_grads(m, x)
    ref, ref_span = naive_hybrid(m, x)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(span, ref_span, **TOL)
    ref.backward(gy)
    for n, g in grads(m, x).items():
        torch.testing.assert_close(got[n], g, **TOL, msg=lambda s: f"grad {n}: {s}")


def test_hybrid_key_lengths_pool_only_valid_positions():
    m = fnn.HybridAttention(16, 4, max_span=5, span_ramp=2, causal=False, impl="reference")
    x = torch.randn(2, 6, 16)
    y = x.clone()
    y[1, 4:] = 100.0  # padding
    kl = torch.tensor([6, 4])
    a, sa = m(x, key_lengths=kl, return_span=True)
    b, sb = m(y, key_lengths=kl, return_span=True)
    torch.testing.assert_close(sa, sb)
    torch.testing.assert_close(a[:, :4], b[:, :4], **TOL)


# ------------------------------------------------------------------ need_weights
IMPLS = ["reference", pytest.param("fused", marks=needs_fused)]


def impl_tol(impl):
    return TOL if impl == "reference" else FUSED_TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", ["mha", "mqa-givens-relbias", "all", "softcap-relbias-temp"])
def test_mha_need_weights_are_the_attention_probabilities(cfg, impl):
    m = make_mha(cfg, impl)
    x = torch.randn(2, 6, 16)
    out, w = m(x, need_weights=True, average_attn_weights=False)
    ref_out, ref_w = naive_mha(m, x, return_weights=True)
    assert w.shape == (2, 4, 6, 6)
    torch.testing.assert_close(w, ref_w, **impl_tol(impl))
    torch.testing.assert_close(out, ref_out, **impl_tol(impl))
    torch.testing.assert_close(out, m(x), atol=0, rtol=0)  # the output does not change
    out_avg, w_avg = m(x, need_weights=True)
    assert w_avg.shape == (2, 6, 6)
    torch.testing.assert_close(w_avg, ref_w.mean(1), **impl_tol(impl))


@needs_fused
def test_fused_need_weights_gradients_match_reference():
    fused = make_mha("all", "fused")
    ref = fnn.set_impl(copy.deepcopy(fused), "reference")
    x = torch.randn(2, 7, 16)
    gw = torch.randn(2, 4, 7, 7)
    for m in (fused, ref):
        (m(x, need_weights=True, average_attn_weights=False)[1] * gw).sum().backward()
    for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        if n.startswith(("v_proj", "out_proj")):  # (the weights do not depend on them)
            assert p.grad is None and q.grad is None, n
            continue
        torch.testing.assert_close(p.grad, q.grad, **FUSED_TOL, msg=lambda s: f"grad {n}: {s}")


def test_need_weights_cross_attention_with_key_lengths():
    m = fnn.MultiheadAttention(16, 4, 2, kdim=12, impl="reference")
    x, xa = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    kl = torch.tensor([7, 4])
    out, w = m(x, xa, key_lengths=kl, need_weights=True, average_attn_weights=False)
    ref_out, ref_w = naive_mha(m, x, xa, key_lengths=kl, return_weights=True)
    torch.testing.assert_close(w, ref_w, **TOL)
    assert w.shape == (2, 4, 5, 7) and (w[1, :, :, 4:] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_need_weights_with_a_cache_returns_out_weights_cache(impl):
    m = fnn.MultiheadAttention(16, 4, 2, rotary="rope", causal=True, rel_bias_max_dist=3, impl=impl)
    x = torch.randn(2, 7, 16)
    _, full = m(x, need_weights=True, average_attn_weights=False)
    out, w, cache = m(x[:, :3], cache={}, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(w, full[:, :, :3, :3], **impl_tol(impl))
    for t in range(3, 7):
        out, w, cache = m(x[:, t:t + 1], cache=cache, need_weights=True)
        assert w.shape == (2, 1, t + 1) and cache["k"].shape[2] == t + 1
        torch.testing.assert_close(w, full[:, :, t:t + 1, :t + 1].mean(1), **impl_tol(impl))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("absorb", [False, True], ids=["expanded", "absorbed"])
def test_mla_need_weights(absorb, impl):
    m = make_mla(impl)
    x = torch.randn(2, 7, 16)
    out, w = m(x, absorb=absorb, need_weights=True, average_attn_weights=False)
    ref_out, ref_w = naive_mla(m, x, return_weights=True)
    torch.testing.assert_close(w, ref_w, **impl_tol(impl))
    torch.testing.assert_close(out, ref_out, **impl_tol(impl))
    out, w, cache = m(x, cache={}, need_weights=True)
    assert set(cache) == {"latent", "k_rope"}
    torch.testing.assert_close(w, ref_w.mean(1), **impl_tol(impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_adaptive_span_and_hybrid_need_weights(impl):
    span_m = fnn.AdaptiveSpanAttention(16, 4, max_span=6.5, span_ramp=3, n_kv_head=2, rotary="rope",
                                       impl=impl)
    with torch.no_grad():
        span_m.span_frac.copy_(torch.tensor([0.1, 0.4, 0.7, 1.0]))
    x = torch.randn(2, 12, 16)
    out, w = span_m(x, need_weights=True, average_attn_weights=False)
    ref_out, ref_w = naive_mha(span_m, x, span=span_m.span(), ramp=3.0, return_weights=True)
    torch.testing.assert_close(w, ref_w, **impl_tol(impl))
    assert (w[:, 0, 11, :11 - 4] == 0).all()  # head 0's span (0.65 + ramp 3) ends within 4 keys
    hyb = fnn.HybridAttention(16, 4, max_span=5, span_ramp=2, n_kv_head=2, rotary="rope", impl=impl)
    out, (w_local, w_global), span = hyb(x, need_weights=True, average_attn_weights=False,
                                         return_span=True)
    ref_out, ref_span, (ref_local, ref_global) = naive_hybrid(hyb, x, return_weights=True)
    torch.testing.assert_close(out, ref_out, **impl_tol(impl))
    torch.testing.assert_close(w_local, ref_local, **impl_tol(impl))
    torch.testing.assert_close(w_global, ref_global, **impl_tol(impl))
    out2, (avg_local, avg_global) = hyb(x, need_weights=True)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    torch.testing.assert_close(avg_local, ref_local.mean(1), **impl_tol(impl))


# ------------------------------------------------------------------ dropout
DROPOUT_BUILDERS = {
    "mha": lambda impl, p: fnn.MultiheadAttention(16, 4, 2, rotary="rope", causal=True,
                                                  rel_bias_max_dist=3, dropout=p, impl=impl),
    "mla": lambda impl, p: make_mla(impl, dropout=p),
    "adaptive-span": lambda impl, p: fnn.AdaptiveSpanAttention(16, 4, max_span=6.5, span_ramp=3,
                                                               dropout=p, impl=impl),
    "hybrid": lambda impl, p: fnn.HybridAttention(16, 4, max_span=5, span_ramp=2, n_kv_head=2,
                                                  dropout=p, impl=impl),
}


@pytest.mark.parametrize("name", list(DROPOUT_BUILDERS))
def test_dropout_is_no_state_and_shows_in_repr_only_when_set(name):
    torch.manual_seed(0)
    plain = DROPOUT_BUILDERS[name]("reference", 0.0)
    torch.manual_seed(0)
    dropped = DROPOUT_BUILDERS[name]("reference", 0.3)
    a, b = plain.state_dict(), dropped.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert "dropout" not in repr(plain)
    assert ", dropout=0.3" in dropped.extra_repr()
    assert dropped.extra_repr().replace(", dropout=0.3", "") == plain.extra_repr()
    assert dropped.dropout == 0.3 and plain.dropout == 0.0
    if name == "hybrid":
        assert dropped.attn_local.dropout == dropped.attn_global.dropout == 0.3


def test_mha_repr_without_dropout_is_unchanged():
    assert fnn.MultiheadAttention(16, 4, impl="reference").extra_repr() == (
        "d_model=16, n_head=4, n_kv_head=4, head_dim=4, causal=False, window=(-1, -1), "
        "num_global=0, softcap=0.0, impl='reference'")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(DROPOUT_BUILDERS))
def test_dropout_is_off_in_eval_mode_and_at_zero(name, impl):
    # (passes no dropout argument at all: runs on builds whose attention has no dropout_p)
    torch.manual_seed(0)
    plain = DROPOUT_BUILDERS[name](impl, 0.0)
    torch.manual_seed(0)
    dropped = DROPOUT_BUILDERS[name](impl, 0.5).eval()
    x = torch.randn(2, 9, 16)
    expected = plain(x)  # training mode, dropout 0
    torch.testing.assert_close(dropped(x), expected, atol=0, rtol=0)
    torch.testing.assert_close(plain.eval()(x), expected, atol=0, rtol=0)


def test_reference_dropout_applies_the_keep_mask_in_training():
    m = fnn.MultiheadAttention(16, 4, 2, causal=True, rel_bias_max_dist=3, dropout=0.5,
                               impl="reference")
    B, Sq, Sk = 2, 5, 11
    q, k = torch.randn(B, 4, Sq, 4), torch.randn(B, 2, Sk, 4)
    eye = torch.eye(Sk).expand(B, 2, Sk, Sk)  # v = identity: the output rows are the weights
    weights = m.attend_weights(q, k)
    torch.manual_seed(5)
    seed, offset = torch.empty(2, dtype=torch.int64).random_()  # what the module draws
    torch.manual_seed(5)
    got = m.attend(q, k, eye)
    keep = reference.dropout_keep_mask(seed, offset, B, 4, Sq, Sk, 0.5)
    torch.testing.assert_close(got, weights * keep / 0.5, **TOL)
    assert 0 < (~keep & (weights > 0)).sum() < (weights > 0).sum()  # some kept, some dropped
    assert not torch.equal(m.attend(q, k, eye), got)  # a new mask per call
    torch.testing.assert_close(m.eval().attend(q, k, eye), weights, **TOL)


def test_mla_dropout_absorbed_and_expanded_drop_the_same_weights():
    m = make_mla("reference", dropout=0.5)
    x = torch.randn(2, 7, 16)
    torch.manual_seed(3)
    expanded = m(x, absorb=False)
    torch.manual_seed(3)
    absorbed = m(x, absorb=True)
    torch.testing.assert_close(absorbed, expanded, **TOL)
    assert (expanded - m.eval()(x)).abs().max() > 1e-2


@needs_fused_dropout
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fused_dropout_drops_weights_at_rate_p(p):
    m = fnn.MultiheadAttention(16, 4, 2, rel_bias_max_dist=3, dropout=p, impl="fused")
    B, Sq, Sk = 4, 64, 128
    q, k = torch.randn(B, 4, Sq, 4), torch.randn(B, 2, Sk, 4)
    eye = torch.eye(Sk).expand(B, 2, Sk, Sk)  # v = identity: the output rows are the weights
    weights = m.attend_weights(q, k)
    assert (weights > 0).all()
    torch.manual_seed(1)
    got = m.attend(q, k, eye)
    torch.manual_seed(1)
    assert torch.equal(m.attend(q, k, eye), got), "the same generator state must give the same mask"
    assert not torch.equal(m.attend(q, k, eye), got), "the next call must draw another mask"
    kept = got != 0
    n = kept.numel()
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"kept {frac:.4f} of {n}"
    torch.testing.assert_close(got[kept], (weights / (1 - p))[kept], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.eval().attend(q, k, eye), weights, atol=1e-6, rtol=1e-5)


@needs_fused_dropout
@pytest.mark.parametrize("name", list(DROPOUT_BUILDERS))
def test_fused_dropout_mean_over_draws_is_the_eval_output(name):
    m = DROPOUT_BUILDERS[name]("fused", 0.3)
    x = torch.randn(2, 9, 16)
    expected = m.eval()(x)
    m.train()
    draws = []
    for i in range(300):
        torch.manual_seed(i)
        draws.append(m(x).detach())
    draws = torch.stack(draws)
    se = draws.std(0) / math.sqrt(len(draws))
    # (1e-6: the rounding of the dropout path against the plain one, where se is tiny)
    z = (draws.mean(0) - expected).abs() / (se + 1e-6)
    assert z.max() < 5.5, f"largest deviation {z.max():.2f} standard errors"
    assert se.max() > 1e-4  # dropout did change the outputs
    out = m(x)
    out.pow(2).sum().backward()
    check_every_param_has_grad(m)


# ------------------------------------------------------------------ fused vs reference
FUSED_BUILDERS = {
    "mha-all": lambda impl: make_mha("all", impl),
    "mqa-givens-relbias": lambda impl: make_mha("mqa-givens-relbias", impl),
    "mla": lambda impl: make_mla(impl),
    "mla-absorbed": lambda impl: make_mla(impl),
    "adaptive-span": lambda impl: fnn.AdaptiveSpanAttention(16, 4, max_span=6.5, span_ramp=3,
                                                            rotary="rope", impl=impl),
    "hybrid": lambda impl: fnn.HybridAttention(16, 4, max_span=5, span_ramp=2, n_kv_head=2,
                                               rel_bias_max_dist=4, impl=impl),
}


@needs_fused
@pytest.mark.parametrize("name", list(FUSED_BUILDERS))
def test_fused_matches_reference_forward_backward(name):
    fused = FUSED_BUILDERS[name]("fused")
    ref = fnn.set_impl(copy.deepcopy(fused), "reference")
    kw = dict(absorb=True) if name == "mla-absorbed" else {}
    x = torch.randn(2, 37, 16)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    of, orf = fused(xf, **kw), ref(xr, **kw)
    torch.testing.assert_close(of, orf, **FUSED_TOL)
    gy = torch.randn_like(of)
    of.backward(gy)
    orf.backward(gy)
    gf, gr = grads(fused, xf), grads(ref, xr)
    for n in gr:
        torch.testing.assert_close(gf[n], gr[n], **FUSED_TOL, msg=lambda s: f"grad {n}: {s}")


@needs_fused
def test_fused_kv_cache_decode_equals_full_pass():
    for m in (make_mha("all", "fused"), make_mla("fused")):
        x = torch.randn(2, 6, 16)
        full = m(x)
        outs, cache = [], {}
        for t in range(6):
            o, cache = m(x[:, t:t + 1], cache=cache)
            outs.append(o)
        torch.testing.assert_close(torch.cat(outs, 1), full, **FUSED_TOL)


def test_set_impl_switches_every_module():
    m = torch.nn.Sequential(make_mha("all", "fused"), fnn.HybridAttention(16, 4, impl="fused"))
    fnn.set_impl(m, "reference")
    impls = {mod.impl for mod in m.modules() if hasattr(mod, "impl")}
    assert impls == {"reference"}
    with pytest.raises(ValueError, match="impl"):
        fnn.set_impl(m, "cuda")


# ------------------------------------------------------------------ torch.compile
class _AllModules(torch.nn.Module):
    def __init__(self, impl):
        super().__init__()
        self.mha = fnn.MultiheadAttention(16, 4, 2, rotary="givens", n_rotations=3, causal=True,
                                          rel_bias_max_dist=4, alibi=True,
                                          learnable_temperature=True, impl=impl)
        self.mla = make_mla(impl)
        self.span = fnn.AdaptiveSpanAttention(16, 4, max_span=4, span_ramp=2, impl=impl)
        self.hybrid = fnn.HybridAttention(16, 4, max_span=4, span_ramp=2, impl=impl)

    def forward(self, x):
        x = x + self.mha(x)
        x = x + self.mla(x) + self.mla(x, absorb=True)
        x = x + self.span(x)
        return x + self.hybrid(x)


@pytest.mark.slow
def test_compile_fullgraph_all_modules():
    """No graph break anywhere (dynamo only: the eager backend keeps it fast)."""
    impl = "fused" if FUSED else "reference"
    m = _AllModules(impl)
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="eager")
    x = torch.randn(2, 9, 16)
    out = cm(x)
    torch.testing.assert_close(out, m(x), **FUSED_TOL)
    out.sum().backward()
    check_every_param_has_grad(m)


@pytest.mark.slow
@needs_fused
def test_compile_fullgraph_aot_fused_hybrid():
    """Through AOTAutograd: the fused ops' fake kernels and autograd formulas, span included."""
    m = fnn.HybridAttention(16, 4, max_span=4, span_ramp=2, n_kv_head=2, rotary="givens",
                            rel_bias_max_dist=3, learnable_temperature=True, impl="fused")
    ref = fnn.set_impl(copy.deepcopy(m), "reference")
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 9, 16)
    out = cm(x)
    ref_out = ref(x)
    torch.testing.assert_close(out, ref_out, **FUSED_TOL)
    out.sum().backward()
    ref_out.sum().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **FUSED_TOL, msg=lambda s: f"grad {n}: {s}")


# ------------------------------------------------------------------ bad arguments
BAD = [
    (lambda: fnn.MultiheadAttention(30, 4), ValueError, "d_model must be divisible by n_head"),
    (lambda: fnn.MultiheadAttention(32, 4, 3), ValueError, "n_kv_head"),
    (lambda: fnn.MultiheadAttention(20, 4, rotary="rope"), ValueError, "even head_dim"),
    (lambda: fnn.MultiheadAttention(32, 4, rotary="alibi"), ValueError, "rotary must be one of"),
    (lambda: fnn.MultiheadAttention(32, 4, window=(-2, 0)), ValueError, "window"),
    (lambda: fnn.MultiheadAttention(32, 4, window=5), TypeError, "window"),
    (lambda: fnn.MultiheadAttention(32, 4, softcap=-2.0), ValueError, "softcap"),
    (lambda: fnn.MultiheadAttention(32, 4, softcap="3"), TypeError, "softcap"),
    (lambda: fnn.MultiheadAttention(32, 4, impl="cuda"), ValueError, "impl"),
    (lambda: fnn.MultiheadAttention(32, 0), ValueError, "n_head"),
    (lambda: fnn.MultiheadAttention(32.0, 4), TypeError, "d_model"),
    (lambda: fnn.RotaryEmbedding(7), ValueError, "even head_dim"),
    (lambda: fnn.RotaryEmbedding(8, rotary_dim=10), ValueError, "rotary_dim"),
    (lambda: fnn.RotaryEmbedding(8, rotary_dim=3), ValueError, "rotary_dim"),
    (lambda: fnn.RotaryEmbedding(8, base=0), ValueError, "base"),
    (lambda: fnn.GivensRotaryEmbedding(4, 7), ValueError, "n_rotations"),
    (lambda: fnn.RelativePositionBias(0, 4), ValueError, "max_dist"),
    (lambda: fnn.RelativePositionBias(4, 4).update_dist(0), ValueError, "new_dist"),
    (lambda: fnn.MultiheadLatentAttention(30, 4, 8), ValueError, "d_model must be divisible"),
    (lambda: fnn.MultiheadLatentAttention(32, 4, 8, qk_rope_head_dim=3), ValueError, "qk_rope_head_dim"),
    (lambda: fnn.MultiheadLatentAttention(32, 4, 0), ValueError, "kv_lora_rank"),
    (lambda: fnn.AdaptiveSpanAttention(32, 4, max_span=0), ValueError, "max_span"),
    (lambda: fnn.AdaptiveSpanAttention(32, 4, max_span=8, span_init=1.5), ValueError, "span_init"),
    (lambda: fnn.HybridAttention(32, 4, span_ramp=-1), ValueError, "span_ramp"),
    (lambda: fnn.HybridAttention(32, 4, window=(1, 1)), ValueError, "window"),
    (lambda: fnn.MultiheadAttention(32, 4, dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
    (lambda: fnn.MultiheadAttention(32, 4, dropout=-0.1), ValueError, r"dropout must be in \[0, 1\), got -0.1"),
    (lambda: fnn.MultiheadAttention(32, 4, dropout="0.1"), TypeError, "dropout must be a float in .* got str"),
    (lambda: fnn.MultiheadLatentAttention(32, 4, 8, dropout=float("nan")), ValueError, "dropout must be in"),
    (lambda: fnn.AdaptiveSpanAttention(32, 4, max_span=8, dropout=True), TypeError, "dropout must be a float"),
    (lambda: fnn.HybridAttention(32, 4, dropout=1.5), ValueError, r"dropout must be in \[0, 1\), got 1.5"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_constructor_arguments(i):
    fn, exc, match = BAD[i]
    with pytest.raises(exc, match=match):
        fn()


def test_bad_forward_arguments():
    m = fnn.MultiheadAttention(16, 4, rotary="rope", impl="reference")
    with pytest.raises(ValueError, match="d_model=16"):
        m(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(5, 16))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(2, 5, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="cross-attention"):
        m(torch.randn(2, 5, 16), torch.randn(2, 3, 16))
    c = fnn.MultiheadAttention(16, 4, kdim=8, impl="reference")
    with pytest.raises(ValueError, match="kdim=8"):
        c(torch.randn(2, 5, 16), torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="head_dim"):
        fnn.RotaryEmbedding(8, impl="reference")(torch.randn(1, 2, 3, 6))
    with pytest.raises(ValueError, match="d_model"):
        make_mla()(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="d_model"):
        fnn.HybridAttention(16, 4, impl="reference")(torch.randn(2, 3, 8))


def test_alibi_slopes_values():
    torch.testing.assert_close(fnn.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s = fnn.alibi_slopes(6)  # non power of two: 4 from the 4-head sequence, 2 from the 8-head one
    torch.testing.assert_close(s, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))
