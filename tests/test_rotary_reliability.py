"""fastattn.rotary where a mistake would be silent: integer arguments near int64's limits, the
in-place op's contract (version counter, inference tensors, arguments that share x's memory),
higher-order and forward-mode autograd, and the CPU output-buffer cache (bounded, emptied,
resizable outputs).
"""
from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fastattn
from fastattn import reference
from conftest import HAS_CUDA

ops = torch.ops.fastattn

CUDA_MARK = [pytest.mark.cuda,
             pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fastattn")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARK)]
INT64_MAX = 2 ** 63 - 1


def _inv_freq(rd, dtype=torch.float64, device="cpu"):
    return (1.0 / (100.0 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))).to(device, dtype)


# ---------------------------------------------------------------------------------------------
# integer arguments: every bounds check holds for any int64 (a direct op call may pass one)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_offset_near_int64_max_is_rejected_not_wrapped(device):
    """offset + S overflowed int64 and passed `offset + S <= rows`: the kernel then read table
    rows at (offset + s) * half (garbage, or a crash for large S)."""
    S = 65536
    x = torch.randn(1, 1, S, 8, device=device)
    cos, sin = torch.randn(16, 4, device=device), torch.randn(16, 4, device=device)
    grad = torch.ones_like(x)
    for offset in (2 ** 63 - S, 2 ** 63 - 1, INT64_MAX - S // 2, -(2 ** 63)):
        args = (None, cos, sin, None, None, offset, False, 8)
        with pytest.raises(ValueError, match="offset"):
            ops.rotary(x, *args)
        with pytest.raises(ValueError, match="offset"):
            ops.rotary_(x.clone(), *args)
        with pytest.raises(ValueError, match="offset"):
            ops.rotary_backward(grad, x, *args, [True, False, True, False])
    with pytest.raises(ValueError, match="offset"):  # through the public function too
        fastattn.rotary(x, cos=cos, sin=sin, offset=2 ** 63 - S)


@pytest.mark.parametrize("device", DEVICES)
def test_inv_freq_offset_whose_positions_overflow_is_rejected(device):
    """With inv_freq there is no table to bound the positions, but offset + S - 1 must be an
    int64: a larger offset used to wrap around to negative positions silently."""
    S = 64
    x = torch.randn(1, 2, S, 8, device=device)
    inv = _inv_freq(8, torch.float32, device)
    for offset in (INT64_MAX, INT64_MAX - S + 2):
        with pytest.raises(ValueError, match="offset"):
            ops.rotary(x, inv, None, None, None, None, offset, False, 8)
        with pytest.raises(ValueError, match="offset"):
            fastattn.rotary(x, inv_freq=inv, offset=offset)
    # The largest offset that fits runs, and is the same call as explicit positions.
    offset = INT64_MAX - S + 1
    got = ops.rotary(x, inv, None, None, None, None, offset, False, 8)
    positions = torch.arange(S, device=device) + offset
    want = ops.rotary(x, inv, None, None, positions, None, 0, False, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(x)
    got_grads = ops.rotary_backward(g, x, inv, None, None, None, None, offset, False, 8, [True, True, False, False])
    want_grads = ops.rotary_backward(g, x, inv, None, None, positions, None, 0, False, 8, [True, True, False, False])
    torch.testing.assert_close(got_grads[0], want_grads[0], rtol=0, atol=0)
    torch.testing.assert_close(got_grads[1], want_grads[1])


@pytest.mark.parametrize("rotary_dim", [2 ** 62, INT64_MAX, -(2 ** 63), -2, 2 ** 32 + 8])
def test_huge_rotary_dim_is_rejected(rotary_dim):
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="rotary_dim"):
        ops.rotary(x, torch.rand(4), None, None, None, None, 0, False, rotary_dim)


def test_empty_x_makes_no_position_row_for_a_huge_s():
    """An empty x (no batch) with S = 2**31 needs no position: none is allocated (16 GiB)."""
    x = torch.empty(0, 1, 2 ** 31, 8)
    assert ops.rotary(x, _inv_freq(8, torch.float32), None, None, None, None, 0, False, 8).shape == x.shape
    ops.rotary_(x, _inv_freq(8, torch.float32), None, None, None, None, 0, False, 8)
    grads = ops.rotary_backward(x, x, _inv_freq(8, torch.float32), None, None, None, None, 0, False, 8,
                                [True, True, False, False])
    assert grads[0].shape == x.shape and grads[1].shape == (4,) and not grads[1].any()


def test_empty_x_backward_makes_no_angle_partials():
    """No head (H = 0): the inv_freq and table gradients are zeros, without the (B, S,
    rotary_dim / 2) partials (2 GiB here)."""
    x = torch.empty(256, 0, 1024, 2048, dtype=torch.float64)
    inv = _inv_freq(2048)
    _, g_freq, _, _, _ = ops.rotary_backward(x, x, inv, None, None, None, None, 0, False, 2048,
                                             [False, True, False, False])
    torch.testing.assert_close(g_freq, torch.zeros_like(inv), rtol=0, atol=0)
    cos, sin = torch.randn(1024, 4), torch.randn(1024, 4)
    x = torch.empty(4, 0, 1024, 8)
    _, _, g_cos, g_sin, _ = ops.rotary_backward(x, x, None, cos, sin, None, None, 0, False, 8,
                                                [False, False, True, False])
    assert g_cos.shape == cos.shape and g_sin.shape == sin.shape and not g_cos.any() and not g_sin.any()


@pytest.mark.parametrize("call", ["rotary", "rotary_backward"])
def test_fake_kernel_names_a_missing_tensor(call):
    """A meta call with None for a required tensor: fastattn's TypeError, not an AttributeError
    from inside the fake kernel."""
    x = torch.empty(1, 1, 4, 8, device="meta")
    inv = torch.empty(4, device="meta")
    with pytest.raises(TypeError, match="must be a Tensor"):
        if call == "rotary":
            ops.rotary(None, inv, None, None, None, None, 0, False, 8)
        else:
            ops.rotary_backward(None, x, inv, None, None, None, None, 0, False, 8, [True, True, False, False])


# ---------------------------------------------------------------------------------------------
# in place: what every PyTorch in-place op does
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_inplace_bumps_the_version_counter(device):
    """A backward that saved x before rotary_ overwrote it must raise, as after x.mul_(1),
    instead of computing a gradient from the new values."""
    inv = _inv_freq(8, torch.float32, device)
    w = torch.randn(1, 2, 4, 8, device=device, requires_grad=True)
    y = w * 1.0
    loss = (y * y).sum()  # saves y
    before = y._version
    fastattn.rotary(y.detach(), inv_freq=inv, inplace=True)
    assert y._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    x = torch.randn(1, 2, 4, 8, device=device)
    before = x._version
    ops.rotary_(x, inv, None, None, None, None, 0, False, 8)
    assert x._version == before + 1


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_on_an_inference_tensor(device):
    """Outside inference mode an inference tensor may not be written (PyTorch's error, and x is
    left as it was); inside it, it may."""
    inv = _inv_freq(8, torch.float32, device)
    with torch.inference_mode():
        x = torch.randn(1, 2, 4, 8, device=device)
    with pytest.raises(RuntimeError) as info:
        x.mul_(1)
    torch_message = str(info.value).splitlines()[0]
    kept = x.clone()
    with pytest.raises(RuntimeError) as info:
        fastattn.rotary(x, inv_freq=inv, inplace=True)
    assert str(info.value).splitlines()[0] == torch_message
    assert "Inplace update to inference tensor outside InferenceMode" in torch_message
    assert torch.equal(x, kept)
    want = fastattn.rotary(x.clone(), inv_freq=inv)
    with torch.inference_mode():
        fastattn.rotary(x, inv_freq=inv, inplace=True)
        y = torch.randn(1, 2, 4, 8, device=device)
    torch.testing.assert_close(x, want, rtol=0, atol=0)
    normal = y.clone()
    with torch.inference_mode():  # a normal tensor in inference mode: written, version bumped
        before = normal._version
        fastattn.rotary(normal, inv_freq=inv, inplace=True)
    assert normal._version == before + 1


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_op_refuses_autograd(device):
    """A direct rotary_ call on a tensor autograd tracks gave the identity's gradient silently;
    a forward-mode tangent was left as it was."""
    inv = _inv_freq(8, torch.float32, device)
    leaf = torch.randn(1, 2, 4, 8, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="rotary_"):
        ops.rotary_(leaf.clone(), inv, None, None, None, None, 0, False, 8)
    with pytest.raises(RuntimeError, match="rotary_"):
        ops.rotary_(leaf.detach().clone(), inv.clone().requires_grad_(), None, None, None, None, 0, False, 8)
    with torch.no_grad():  # nothing recorded: fine
        x = leaf.clone()
        ops.rotary_(x, inv, None, None, None, None, 0, False, 8)
    torch.testing.assert_close(x, fastattn.rotary(leaf.detach(), inv_freq=inv), rtol=0, atol=0)
    with fwAD.dual_level():  # a tangent would be left unrotated
        dual = fwAD.make_dual(torch.randn(1, 2, 4, 8, device=device), torch.randn(1, 2, 4, 8, device=device))
        with pytest.raises(RuntimeError, match="forward-mode"):
            ops.rotary_(dual, inv, None, None, None, None, 0, False, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_refuses_arguments_that_share_x_memory(device):
    """A table that is a view of x was read after rotary_ had overwritten part of it (a wrong
    result, error ~2.8); every argument the kernel reads while writing x is checked."""
    S = 200
    buf = torch.randn(1, 1, S, 8, device=device)
    expected_error = "shares memory with x"
    # inv_freq: a view of one of x's rows (dense), and of a strided slice of x
    with pytest.raises(RuntimeError, match=expected_error):
        ops.rotary_(buf, buf[0, 0, 150, :4], None, None, None, None, 0, False, 8)
    wide = torch.randn(1, 1, S, 12, device=device)
    with pytest.raises(RuntimeError, match=expected_error):
        ops.rotary_(wide[..., :8], wide[0, 0, 100, 8:], None, None, None, None, 0, False, 8)
    # cos / sin tables inside x
    table = torch.randn(S * 8, device=device).abs()
    x = table.view(1, 1, S, 8)
    for name, args in (("cos", (table[:400].view(100, 4), torch.randn(100, 4, device=device))),
                       ("sin", (torch.randn(100, 4, device=device), table[400:800].view(100, 4)))):
        with pytest.raises(RuntimeError, match=name):
            ops.rotary_(x[:, :, :100], None, *args, None, None, 0, False, 8)
    # positions sharing x's storage
    raw = torch.zeros(S * 4, dtype=torch.int64, device=device)
    xs = raw.view(torch.float32).view(1, 1, S, 8).copy_(torch.randn(1, 1, S, 8))
    with pytest.raises(RuntimeError, match="positions"):
        ops.rotary_(xs, _inv_freq(8, torch.float32, device), None, None, raw[:S], None, 0, False, 8)
    # Disjoint parts of one storage are fine, and right.
    both = torch.randn(S * 8 + 4, device=device)
    x, inv = both[: S * 8].view(1, 1, S, 8), both[S * 8:].abs()
    want = fastattn.rotary(x.clone(), inv_freq=inv.clone())
    ops.rotary_(x, inv, None, None, None, None, 0, False, 8)
    torch.testing.assert_close(x, want, rtol=0, atol=0)
    # A table read through a converted copy (bfloat16 x, a bfloat16 inv_freq inside it) is fine.
    xb = torch.randn(1, 1, S, 8, device=device).to(torch.bfloat16)
    inv_view = xb[0, 0, 150, :4]
    inv_view.copy_(_inv_freq(8, torch.bfloat16, device))
    want = fastattn.rotary(xb, inv_freq=inv_view.clone())
    ops.rotary_(xb, inv_view, None, None, None, None, 0, False, 8)
    torch.testing.assert_close(xb, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# higher-order autograd: x's gradient is differentiable; the others raise if differentiated
# ---------------------------------------------------------------------------------------------
def _double_inputs(angles="freq", rotation=False, positions=None, device="cpu", B=2, H=3, S=5, D=8):
    """float64 inputs on the CPU, float32 on CUDA (which has no float64 kernel)."""
    g = torch.Generator().manual_seed(5)
    t = {"x": torch.randn(B, H, S, D, generator=g, dtype=torch.float64)}
    rd = D - 2
    if angles == "freq":
        t["inv_freq"] = _inv_freq(rd) * (1 + 0.2 * torch.rand(rd // 2, generator=g, dtype=torch.float64))
    else:
        t["cos"] = torch.randn(S + 4, rd // 2, generator=g, dtype=torch.float64)
        t["sin"] = torch.randn(S + 4, rd // 2, generator=g, dtype=torch.float64)
    if rotation:
        t["rotation"] = torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5
    if positions == "BS":
        t["positions"] = torch.randint(0, S + 4, (B, S), generator=g)
    dtype = torch.float64 if device == "cpu" else torch.float32
    t = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in t.items()}
    opts = dict(rotary_dim=rd, interleaved=angles == "table", offset=0 if positions else 2)
    return t, opts


def _assert_close(actual, expected, msg):
    """float64 (CPU): to 1e-6; float32 (CUDA, against the reference in float32): to 2e-3 of
    the largest value."""
    tol = 1e-6 if expected.dtype == torch.float64 else 2e-3
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=msg)


CONFIGS = [("freq", False, None), ("table", False, "BS"), ("freq", True, "BS"), ("table", True, None)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("angles,rotation,positions", CONFIGS)
def test_double_backward_through_x_gradient(device, angles, rotation, positions):
    """The second derivative through x's gradient (a gradient penalty), wrt x and wrt every
    input that requires grad, equals the reference's: it used to be all zeros (with only a
    UserWarning)."""
    t, opts = _double_inputs(angles, rotation, positions, device)
    params = [k for k in ("inv_freq", "cos", "sin", "rotation") if k in t]

    def second_derivatives(fn):
        x = t["x"].clone().requires_grad_()
        p = {k: t[k].clone().requires_grad_() for k in params}
        kw = {k: v for k, v in t.items() if k not in ("x", *params)}
        out = fn(x, **p, **kw, **opts)
        (gx,) = torch.autograd.grad((out ** 3).sum(), x, create_graph=True)
        penalty = (gx.square().sum() - 1) ** 2
        return torch.autograd.grad(penalty, [x, *p.values()])

    got, want = second_derivatives(fastattn.rotary), second_derivatives(reference.rotary)
    for name, a, b in zip(["x", *params], got, want):
        assert b.abs().max() > 0
        _assert_close(a, b, f"second derivative wrt {name}")


def test_gradgradcheck_x():
    t, opts = _double_inputs("freq", True, "BS", "cpu", B=1, H=2, S=3, D=6)
    kw = {k: v for k, v in t.items() if k != "x"}
    x = t["x"].clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a: fastattn.rotary(a, **kw, **opts), (x,))


def test_double_backward_through_parameter_gradients_raises():
    """The gradients of inv_freq, cos, sin and rotation have no derivative: differentiating them
    raises (never a silent zero); differentiating x's gradient still works."""
    for angles, key in (("freq", "inv_freq"), ("table", "cos"), ("table", "sin"), ("freq", "rotation")):
        t, opts = _double_inputs(angles, rotation=key == "rotation")
        x = t["x"].clone().requires_grad_()
        p = t[key].clone().requires_grad_()
        kw = {k: v for k, v in t.items() if k not in ("x", key)}
        out = fastattn.rotary(x, **{key: p}, **kw, **opts)
        gx, gp = torch.autograd.grad((out ** 2).sum(), (x, p), create_graph=True)
        with pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.grad(gp.sum(), x, retain_graph=True)
        (h,) = torch.autograd.grad(gx.square().sum(), x)  # x's own gradient is differentiable
        assert h.abs().max() > 0


# ---------------------------------------------------------------------------------------------
# forward-mode AD
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("angles,rotation,positions", CONFIGS)
def test_jvp_matches_reference(device, angles, rotation, positions):
    """torch.func.jvp wrt x and wrt every angle or rotation tensor (alone and together) equals
    the reference's: it used to be a zero tangent."""
    t, opts = _double_inputs(angles, rotation, positions, device)
    diff = ["x"] + [k for k in ("inv_freq", "cos", "sin", "rotation") if k in t]
    g = torch.Generator().manual_seed(8)
    tangents = {k: torch.randn(t[k].shape, generator=g, dtype=torch.float64).to(device, t[k].dtype) for k in diff}
    for chosen in [[k] for k in diff] + [diff]:
        fixed = {k: v for k, v in t.items() if k not in chosen}

        def wrap(fn):
            def call(*values):
                kw = {**fixed, **dict(zip(chosen, values))}
                return fn(kw.pop("x"), **kw, **opts)
            return call

        primals = tuple(t[k] for k in chosen)
        tans = tuple(tangents[k] for k in chosen)
        out, tan = torch.func.jvp(wrap(fastattn.rotary), primals, tans)
        want_out, want_tan = torch.func.jvp(wrap(reference.rotary), primals, tans)
        torch.testing.assert_close(out, want_out)
        assert want_tan.abs().max() > 0
        _assert_close(tan, want_tan, f"tangent wrt {chosen}")


@pytest.mark.parametrize("device", DEVICES)
def test_forward_ad_dual_tensors(device):
    """torch.autograd.forward_ad: the tangent used to be None; also with x requiring grad (the
    C++ custom Function refused tangents), where backward still works."""
    t, opts = _double_inputs("freq", True, "BS", device)
    kw = {k: v for k, v in t.items() if k != "x"}
    tx = torch.randn_like(t["x"])
    want = torch.func.jvp(lambda a: reference.rotary(a, **kw, **opts), (t["x"],), (tx,))[1]
    for requires_grad in (False, True):
        x = t["x"].clone().requires_grad_(requires_grad)
        with fwAD.dual_level():
            out = fastattn.rotary(fwAD.make_dual(x, tx), **kw, **opts)
            tangent = fwAD.unpack_dual(out).tangent
            assert tangent is not None
            _assert_close(tangent, want, "tangent")
            if requires_grad:
                (gx,) = torch.autograd.grad(fwAD.unpack_dual(out).primal.sum(), x)
                xd = t["x"].clone().requires_grad_()
                (gx_ref,) = torch.autograd.grad(reference.rotary(xd, **kw, **opts).sum(), xd)
                torch.testing.assert_close(gx, gx_ref)


def test_forward_ad_float32_and_bfloat16():
    """The tangent wrt x is the op on the tangent, bit for bit, in float32 and bfloat16."""
    inv = _inv_freq(8, torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 2, 6, 8).to(dtype)
        tx = torch.randn_like(x)
        _, tan = torch.func.jvp(lambda a: fastattn.rotary(a, inv_freq=inv), (x,), (tx,))
        torch.testing.assert_close(tan, fastattn.rotary(tx, inv_freq=inv), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the CPU output-buffer cache (csrc/cpu/output_buffers.cpp)
# ---------------------------------------------------------------------------------------------
CACHE_OFF = os.environ.get("FASTATTN_CPU_OUTPUT_CACHE") == "0"
MiB = 2 ** 20


def _cache_stats() -> tuple[int, int, int]:
    """(buffers held, bytes held, the most bytes it may hold now)."""
    buffers, held, cap = ops._cpu_cache_stats()
    return buffers, held, cap


def _output_of(mib: float, inv=_inv_freq(128, torch.float32)):
    """A rotary output of about `mib` MiB (float32, D = 128)."""
    S = max(1, int(mib * MiB / (4 * 128 * 8)))
    return fastattn.rotary(torch.empty(1, 8, S, 128).normal_(), inv_freq=inv)


@pytest.fixture
def empty_cache():
    gc.collect()
    fastattn.empty_cache()
    yield
    fastattn.empty_cache()


@pytest.mark.skipif(CACHE_OFF, reason="FASTATTN_CPU_OUTPUT_CACHE=0")
def test_empty_cache_releases_everything(empty_cache):
    outs = [_output_of(m) for m in (9, 12, 16)]
    assert _cache_stats()[:2] == (0, 0)  # live outputs are not in the cache
    del outs
    buffers, held, _ = _cache_stats()
    assert buffers == 3 and held >= (9 + 12 + 16) * MiB
    fastattn.empty_cache()
    assert _cache_stats()[:2] == (0, 0)


@pytest.mark.skipif(CACHE_OFF, reason="FASTATTN_CPU_OUTPUT_CACHE=0")
def test_cache_reuses_a_repeated_size(empty_cache):
    x = torch.randn(2, 8, 1024, 128)
    inv = _inv_freq(128, torch.float32)
    out = fastattn.rotary(x, inv_freq=inv)
    ptr = out.data_ptr()
    del out
    for _ in range(3):
        out = fastattn.rotary(x, inv_freq=inv)
        assert out.data_ptr() == ptr
        del out
    assert _cache_stats()[0] == 1


@pytest.mark.skipif(CACHE_OFF, reason="FASTATTN_CPU_OUTPUT_CACHE=0")
def test_varying_sizes_stay_under_the_cap(empty_cache):
    """Varying sequence lengths: the cache used to keep up to 8 buffers / 2 GiB, never reused
    and never evicted. Now it holds at most its cap (256 MiB for these sizes) and 8 buffers,
    the most recently released ones."""
    sizes = [9 + 5 * i for i in range(16)]  # 9 .. 84 MiB, each a new size
    for i in range(0, len(sizes), 4):
        outs = [_output_of(m) for m in sizes[i:i + 4]]  # several live at once, then released
        while outs:
            outs.pop(0)  # in order: the largest last
        buffers, held, cap = _cache_stats()
        assert buffers <= 8 and held <= cap, (buffers, held / MiB, cap / MiB)
        assert cap <= 256 * MiB
    assert held >= 150 * MiB  # it does hold the recent ones
    last = _output_of(sizes[-1])  # the most recently released size is still there
    assert _cache_stats()[1] < held
    del last


@pytest.mark.skipif(CACHE_OFF, reason="FASTATTN_CPU_OUTPUT_CACHE=0")
def test_unused_buffers_are_dropped(empty_cache):
    """A buffer that later requests do not reuse is freed after a while (here: requests)."""
    first = _output_of(20)
    del first
    assert _cache_stats()[0] == 1
    x = torch.empty(2, 8, 1024, 128).normal_()
    inv = _inv_freq(128, torch.float32)
    for _ in range(300):
        fastattn.rotary(x, inv_freq=inv)  # 8 MiB, released at once
    buffers, held, _ = _cache_stats()
    assert buffers == 1 and held == 8 * MiB


@pytest.mark.skipif(CACHE_OFF, reason="FASTATTN_CPU_OUTPUT_CACHE=0")
def test_cached_outputs_are_resizable(empty_cache):
    """resize_ and out= on a large output (its storage was not resizable before)."""
    x = torch.randn(2, 8, 1040, 128)  # > 8 MiB of float32
    inv = _inv_freq(128, torch.float32)
    y = fastattn.rotary(x, inv_freq=inv)
    want = y.clone()
    y.resize_(2, 8, 2000, 128)
    assert y.shape == (2, 8, 2000, 128)
    torch.testing.assert_close(y.view(-1)[: want.numel()], want.view(-1), rtol=0, atol=0)
    assert _cache_stats()[0] == 1  # the old buffer went back to the cache
    y = fastattn.rotary(x, inv_freq=inv)
    a, b = torch.randn(2, 8, 3000, 128), torch.randn(2, 8, 3000, 128)
    torch.add(a, b, out=y.resize_(0))  # (resize_(0): how PyTorch asks for a larger out= to be reused)
    torch.testing.assert_close(y, a + b, rtol=0, atol=0)
    y = fastattn.rotary(x, inv_freq=inv)
    torch.add(x, x, out=y)  # same shape
    torch.testing.assert_close(y, 2 * x, rtol=0, atol=0)
    y.resize_(0)
    y.resize_(4, 4)  # small: an ordinary allocation
    y.fill_(1.0)
    assert y.sum() == 16
