"""fastattn.rotary: every option against reference.py (float64), against the common eager formula
(interleaved pairs in, halves out),
gradients (gradcheck in float64), torch.library.opcheck, torch.compile, odd shapes, strided
inputs, in-place, and every bad input the public function must reject.

Comparisons use conftest.assert_close: float32/float64 within atol + rtol * max|exact| of the
float64 reference; float16/bfloat16 within 2x the reference's own error when it runs in that
dtype (plus a half-ulp slack).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastattn
from fastattn import reference
from conftest import HAS_CUDA, LOW_PRECISION, any_tensor, assert_close, pairwise, random_settings

ops = torch.ops.fastattn

# The rotary kernels' dtypes per device (float64 is CPU only).
ROTARY_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}
CUDA_MARK = [pytest.mark.cuda,
             pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fastattn")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARK)]

GRAD_KEYS = ("x", "inv_freq", "cos", "sin", "rotation")
OFFSET = 3          # the `offset` used by the "offset" positions option
EXTRA_ROWS = 6      # cos/sin tables have S + OFFSET + EXTRA_ROWS rows


# ---------------------------------------------------------------------------------------------
# inputs and runs
# ---------------------------------------------------------------------------------------------
def make_inputs(*, B=2, H=3, S=5, D=8, dtype=torch.float32, device="cpu", angles="freq",
                positions=None, rd=None, rotation=False, layout="contiguous", grads="all",
                seed=0) -> tuple[dict, dict]:
    """(tensors, options) for one rotary call.

    angles: "freq" (inv_freq) or "table" (cos/sin). positions: None (0..S-1), "offset"
    (OFFSET..OFFSET+S-1), "S" ((S,) with repeats) or "BS" ((B, S)). layout: "contiguous" or
    "bshd" (a (B, S, H, D) tensor's transpose(1, 2)). grads: "all", "x", "params" or "none":
    which tensors require grad. Small parameters are float32 for half/bfloat16 x (as a model
    under autocast keeps them), x's dtype otherwise.
    """
    g = torch.Generator().manual_seed(seed)
    rd = D if rd is None else rd
    half = rd // 2
    pdt = torch.float32 if dtype in LOW_PRECISION else dtype

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(pdt)

    if layout == "bshd":
        x = torch.randn(B, S, H, D, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(dtype)
    t = {"x": x}
    rows = S + OFFSET + EXTRA_ROWS
    if angles == "freq":
        # RoPE's frequencies, jittered so that no two pairs share one.
        base = 1.0 / (100.0 ** (torch.arange(0, rd, 2, dtype=torch.float64) / max(rd, 1)))
        t["inv_freq"] = (base * (1.0 + 0.2 * torch.rand(half, generator=g, dtype=torch.float64))).to(pdt)
    else:
        # Arbitrary tables (not unit-norm pairs), so that cos and sin gradients differ.
        t["cos"], t["sin"] = randn(rows, half), randn(rows, half)
    opts = dict(offset=0, interleaved=False, rotary_dim=rd)
    if positions == "offset":
        opts["offset"] = OFFSET
    elif positions == "S":
        t["positions"] = torch.randint(0, rows, (S,), generator=g)
        if S > 2:
            t["positions"][1] = t["positions"][2]  # a repeated position: table rows accumulate
    elif positions == "BS":
        t["positions"] = torch.randint(0, rows, (B, S), generator=g)
    if rotation:
        t["rotation"] = randn(D, D, scale=D ** -0.5)
    for k in GRAD_KEYS:
        want = (grads == "all" or (grads == "x" and k == "x") or (grads == "params" and k != "x"))
        if k in t and want:
            t[k].requires_grad_(True)
    t = {k: (v.detach().to(device).requires_grad_(v.requires_grad) if v.is_floating_point() else v.to(device))
         for k, v in t.items()}
    return t, opts


def clone(t: dict, dtype=None, device="cpu") -> dict:
    """Fresh leaves with the same values; floating tensors cast to dtype when given."""
    out = {}
    for k, v in t.items():
        w = v.detach().to(device)
        if dtype is not None and w.is_floating_point():
            w = w.to(dtype)
        out[k] = w.clone().requires_grad_(v.requires_grad) if w.is_floating_point() else w.clone()
    return out


def run(fn, t: dict, opts: dict, grad_out=None, inplace=False) -> dict:
    """Call fn(x, **tensors, **opts); with grad_out, backprop sum(out * grad_out)."""
    kw = {k: v for k, v in t.items() if k != "x"}
    out = fn(t["x"], **kw, **opts, inplace=inplace)
    res = {"out": out}
    leaves = [k for k in GRAD_KEYS if k in t and t[k].requires_grad]
    if grad_out is not None and leaves:
        loss = (out.to(torch.float64) * grad_out.to(out.device, torch.float64)).sum()
        for k, gr in zip(leaves, torch.autograd.grad(loss, [t[k] for k in leaves])):
            res["grad_" + k] = gr
    return res


def check(t: dict, opts: dict, dtype, *, inplace=False, seed=0) -> dict:
    """Fused op vs reference.rotary in float64 (and in dtype for the low-precision bound)."""
    x = t["x"]
    g = torch.Generator().manual_seed(seed + 1000)
    grad_out = torch.randn(*x.shape, generator=g, dtype=torch.float64).to(dtype)
    if inplace:
        # In place needs an x without grad; the pristine values go to the references.
        exact = run(reference.rotary, clone(t, torch.float64), opts)
        lowp = run(reference.rotary, clone(t), opts) if dtype in LOW_PRECISION else None
        before = x.detach().clone()
        ptr = x.data_ptr()
        fused = run(fastattn.rotary, t, opts, inplace=True)
        assert fused["out"] is x and x.data_ptr() == ptr, "inplace=True must return x itself"
        assert_close("out (inplace)", x, exact["out"], dtype, lowp and lowp["out"])
        rd = opts["rotary_dim"]
        if "rotation" not in t:
            assert torch.equal(x[..., rd:], before[..., rd:]), "pass-through dims changed in place"
        return fused
    fused = run(fastattn.rotary, t, opts, grad_out.to(x.device))
    exact = run(reference.rotary, clone(t, torch.float64), opts, grad_out)
    lowp = run(reference.rotary, clone(t), opts, grad_out) if dtype in LOW_PRECISION else None
    out = fused["out"]
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert_close("out", out, exact["out"], dtype, lowp and lowp["out"])
    for k in GRAD_KEYS:
        key = "grad_" + k
        if key in exact:
            assert fused.get(key) is not None, f"{key}: no gradient from the fused op"
            assert fused[key].dtype == t[k].dtype, f"{key}: dtype {fused[key].dtype}, expected {t[k].dtype}"
            assert_close(key, fused[key], exact[key], dtype, lowp and lowp[key])
    return fused


# ---------------------------------------------------------------------------------------------
# every option combination against reference.py
# ---------------------------------------------------------------------------------------------
ANGLES = ("freq", "table")
POSITIONS = (None, "offset", "S", "BS")
FULL_GRID = list(itertools.product(ANGLES, POSITIONS, (False, True), ("full", "partial"),
                                   (False, True), (False, True)))


def _grid_id(p):
    angles, positions, inter, rd, rot, inplace = p
    return (f"{angles}-pos{positions}-{'inter' if inter else 'half'}-{rd}"
            f"{'-rot' if rot else ''}{'-inplace' if inplace else ''}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("combo", FULL_GRID, ids=[_grid_id(p) for p in FULL_GRID])
def test_all_options_float32(device, combo):
    """The full product of the options, float32, forward and every gradient."""
    angles, positions, inter, rd, rot, inplace = combo
    t, opts = make_inputs(D=12, rd=12 if rd == "full" else 6, angles=angles, positions=positions,
                          rotation=rot, device=device, grads="none" if inplace else "all")
    opts["interleaved"] = inter
    check(t, opts, torch.float32, inplace=inplace)


# Every pair of (dtype, layout, shape, gradients asked) with every pair of the options.
_PAIR_FACTORS = dict(
    dtype=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
    angles=ANGLES, positions=POSITIONS, interleaved=(False, True), rd=("full", "partial"),
    rotation=(False, True), inplace=(False, True), layout=("contiguous", "bshd"),
    shape=("B2H3S5D8", "B1H2S1D8", "B2H1S17D10", "B3H2S9D7"), grads=("all", "x", "params"),
)
PAIR_ROWS = pairwise(_PAIR_FACTORS, seed=1)


def _shape(name):
    nums = [int(v) for v in name.replace("B", " ").replace("H", " ").replace("S", " ").replace("D", " ").split()]
    return dict(zip("BHSD", nums))


def _pair_id(r):
    return "-".join(str(v).replace("torch.", "") for v in r.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row", PAIR_ROWS, ids=[_pair_id(r) for r in PAIR_ROWS])
def test_options_pairwise(device, row):
    """Dtypes, strided (B, S, H, D) views, S = 1, odd D (D = 7 with rotary_dim 6 or 2) and
    subsets of gradients, crossed pairwise with every option."""
    dtype = row["dtype"]
    if dtype not in ROTARY_DTYPES[device]:
        pytest.skip(f"{dtype} is not supported on {device}")
    shp = _shape(row["shape"])
    D = shp["D"]
    full = D if D % 2 == 0 else D - 1
    rd = full if row["rd"] == "full" else max(2, (full // 2) & ~1)
    t, opts = make_inputs(**shp, dtype=dtype, device=device, angles=row["angles"],
                          positions=row["positions"], rd=rd, rotation=row["rotation"],
                          layout=row["layout"], grads="none" if row["inplace"] else row["grads"],
                          seed=3)
    opts["interleaved"] = row["interleaved"]
    check(t, opts, dtype, inplace=row["inplace"], seed=3)


@st.composite
def rotary_calls(draw, device: str):
    """(tensors, options, dtype, inplace, seed) of one random rotary call on `device`: any
    head dim (odd ones too), any even rotary_dim, every option and layout, a random subset of
    the gradients (Hypothesis; FASTATTN_RANDOM_EXAMPLES=N explores N fresh calls)."""
    dtype = draw(st.sampled_from(ROTARY_DTYPES[device]))
    D = draw(st.integers(2, 136))
    full = D - D % 2
    rd = draw(st.one_of(st.just(full), st.integers(1, full // 2).map(lambda pairs: 2 * pairs)))
    inplace = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 20))
    t, opts = make_inputs(B=draw(st.integers(1, 3)), H=draw(st.integers(1, 4)), S=draw(st.integers(1, 70)),
                          D=D, rd=rd, dtype=dtype, device=device,
                          angles=draw(st.sampled_from(ANGLES)), positions=draw(st.sampled_from(POSITIONS)),
                          rotation=draw(st.booleans()), layout=draw(st.sampled_from(("contiguous", "bshd"))),
                          grads="none" if inplace else draw(st.sampled_from(("all", "x", "params"))), seed=seed)
    opts["interleaved"] = draw(st.booleans())
    return t, opts, dtype, inplace, seed


@pytest.mark.parametrize("device", DEVICES)
@random_settings(100)
@given(data=st.data())
def test_random_calls(device, data):
    t, opts, dtype, inplace, seed = data.draw(rotary_calls(device))
    check(t, opts, dtype, inplace=inplace, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
def test_larger_rows_vector_paths(device):
    """D = 128 rows (the kernels' vector loops, not just their scalar tails), both layouts, with
    a non-contiguous view, per-batch positions and every gradient."""
    for inter, dtype in itertools.product((False, True), ROTARY_DTYPES[device]):
        t, opts = make_inputs(B=2, H=2, S=33, D=128, rd=96, dtype=dtype, device=device,
                              positions="BS", layout="bshd", angles="freq", seed=5)
        opts["interleaved"] = inter
        check(t, opts, dtype)
        t, opts = make_inputs(B=1, H=3, S=20, D=64, dtype=dtype, device=device, positions="S",
                              angles="table", rotation=True, seed=6)
        opts["interleaved"] = inter
        check(t, opts, dtype)


def test_last_dim_strided_input():
    """A last dim with stride 2 is copied by the wrapper, then rotated normally."""
    xs = torch.randn(2, 3, 5, 16)[..., ::2]
    inv = torch.rand(4)
    assert_close("out", fastattn.rotary(xs, inv_freq=inv), reference.rotary(xs.double(), inv_freq=inv.double()),
                 torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    """B = 0, H = 0 and S = 0 give empty outputs and zero (not missing) parameter gradients."""
    for B, H, S in ((0, 2, 4), (2, 0, 4), (2, 3, 0)):
        t, opts = make_inputs(B=B, H=H, S=S, D=8, device=device, angles="table", positions="BS" if B else None,
                              rotation=True)
        res = run(fastattn.rotary, t, opts, torch.zeros(B, H, S, 8, device=device))
        assert res["out"].shape == (B, H, S, 8)
        for k in ("cos", "sin", "rotation"):
            gr = res["grad_" + k]
            assert gr.shape == t[k].shape and not gr.any(), f"grad_{k} of an empty input must be 0"
        t, opts = make_inputs(B=B, H=H, S=S, D=8, device=device, angles="freq")
        res = run(fastattn.rotary, t, opts, torch.zeros(B, H, S, 8, device=device))
        assert res["grad_inv_freq"].shape == (4,) and not res["grad_inv_freq"].any()
        y = t["x"].detach().clone()
        fastattn.rotary(y, inv_freq=t["inv_freq"].detach(), inplace=True)


# ---------------------------------------------------------------------------------------------
# the eager formula that reads interleaved pairs and writes halves
# ---------------------------------------------------------------------------------------------
def eager_rotary(x_bshd, inv_freq):
    """A common eager rotary formula on (B, S, H, D) input (rotate_queries_or_keys): it reads
    interleaved pairs (x[..., ::2], x[..., 1::2]) and writes the two halves. (Positions are float
    so that the einsum runs.)"""
    pos = torch.arange(x_bshd.shape[1], device=x_bshd.device, dtype=inv_freq.dtype)
    sinusoid_inp = torch.einsum("i , j -> i j", pos, inv_freq)
    sin = sinusoid_inp.sin()[None, :, None, :]
    cos = sinusoid_inp.cos()[None, :, None, :]
    x1, x2 = x_bshd[..., ::2], x_bshd[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def deinterleave(y):
    """Our interleaved output, rearranged as the eager formula writes it (rotated firsts, then
    seconds)."""
    return torch.cat([y[..., 0::2], y[..., 1::2]], dim=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_rotation", [False, True])
def test_matches_eager_formula(device, with_rotation):
    """interleaved=True computes the eager formula's rotation (our output keeps the interleaved
    layout); with a rotation matrix, x @ rotation is applied first. Values and gradients, the
    float64 eager formula vs the fused float32 kernel."""
    B, S, H, D = 2, 11, 3, 16
    g = torch.Generator().manual_seed(7)
    x64 = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    inv64 = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    rot64 = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    gout = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)

    xs = x64.clone().requires_grad_(True)
    rs = rot64.clone().requires_grad_(True)
    inp = torch.matmul(xs, rs) if with_rotation else xs     # the rotation layer, then rotary
    want = eager_rotary(inp, inv64)
    want.backward(gout)

    xf = x64.float().to(device).requires_grad_(True)
    rf = rot64.float().to(device).requires_grad_(True)
    y = fastattn.rotary(xf.transpose(1, 2), inv_freq=inv64.float().to(device), interleaved=True,
                        rotation=rf if with_rotation else None)              # (B, H, S, D)
    got = deinterleave(y).transpose(1, 2)                                    # (B, S, H, D), halves
    got.backward(gout.float().to(device))
    assert_close("out vs eager formula", got, want, torch.float32)
    assert_close("grad_x vs eager formula", xf.grad, xs.grad, torch.float32)
    if with_rotation:
        assert_close("grad_rotation vs eager formula", rf.grad, rs.grad, torch.float32)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_inv_freq_rotation(interleaved):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    inv = torch.rand(2, generator=g, dtype=torch.float64).requires_grad_(True)
    rot = torch.randn(6, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    pos = torch.tensor([[0, 4, 2], [1, 1, 7]])

    def f(x, inv, rot):
        return fastattn.rotary(x, inv_freq=inv, positions=pos, rotary_dim=4, rotation=rot,
                               interleaved=interleaved)

    assert torch.autograd.gradcheck(f, (x, inv, rot))
    assert torch.autograd.gradcheck(
        lambda x, inv: fastattn.rotary(x.transpose(1, 2), inv_freq=inv, offset=2, interleaved=interleaved),
        (torch.randn(2, 3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True), inv))


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_tables(interleaved):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    cos = torch.randn(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    sin = torch.randn(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    rot = torch.randn(5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([3, 0, 3, 5])  # a repeated row

    def f(x, cos, sin, rot):
        return fastattn.rotary(x, cos=cos, sin=sin, positions=pos, rotary_dim=4, rotation=rot,
                               interleaved=interleaved)

    assert torch.autograd.gradcheck(f, (x, cos, sin, rot))


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
def _op_args(angles, with_rotation, requires_grad, device="cpu"):
    t, opts = make_inputs(B=2, H=2, S=4, D=8, rd=6, angles=angles, positions="BS",
                          rotation=with_rotation, grads="all" if requires_grad else "none",
                          device=device)
    return (t["x"], t.get("inv_freq"), t.get("cos"), t.get("sin"), t.get("positions"),
            t.get("rotation"), 0, True, 6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("angles,with_rotation", [("freq", False), ("table", True)])
def test_opcheck(device, angles, with_rotation):
    args = _op_args(angles, with_rotation, True, device)
    torch.library.opcheck(ops.rotary.default, args)
    plain = _op_args(angles, with_rotation, False, device)
    torch.library.opcheck(ops.rotary_.default, (plain[0].clone(),) + plain[1:])
    grad_out = torch.randn_like(plain[0])
    for mask in ([True, True, True, True], [True, False, False, False], [False, True, True, True]):
        torch.library.opcheck(ops.rotary_backward.default, (grad_out,) + plain + (mask,))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 6, 8, generator=g, requires_grad=True)
    inv = torch.rand(4, generator=g, requires_grad=True)
    rot = torch.randn(8, 8, generator=g, requires_grad=True)

    def f(x, inv, rot):
        return fastattn.rotary(x, inv_freq=inv, offset=1, interleaved=True, rotation=rot)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, inv, rot)
    want = f(x, inv, rot)
    assert torch.allclose(out, want, atol=1e-6, rtol=1e-6)
    gout = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (x, inv, rot), gout)
    want_grads = torch.autograd.grad(want, (x, inv, rot), gout)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# kernel-level properties
# ---------------------------------------------------------------------------------------------
def test_table_gradients_deterministic():
    """The cos/sin and inv_freq gradients are summed in a fixed order: bitwise repeatable."""
    t, opts = make_inputs(B=3, H=4, S=40, D=32, angles="table", positions="BS", grads="params", seed=21)
    g = torch.randn(3, 4, 40, 32)
    first = run(fastattn.rotary, t, opts, g)
    threads = torch.get_num_threads()
    try:
        for n in (1, threads, threads):  # the same bits for any thread count too
            torch.set_num_threads(n)
            again = run(fastattn.rotary, t, opts, g)
            assert torch.equal(first["grad_cos"], again["grad_cos"])
            assert torch.equal(first["grad_sin"], again["grad_sin"])
    finally:
        torch.set_num_threads(threads)
    t, opts = make_inputs(B=3, H=4, S=40, D=32, angles="freq", positions="BS", grads="params", seed=22)
    first = run(fastattn.rotary, t, opts, g)
    assert torch.equal(first["grad_inv_freq"], run(fastattn.rotary, t, opts, g)["grad_inv_freq"])


def test_backward_op_output_mask():
    """Only the requested gradients are computed; the rest come back empty."""
    args = _op_args("table", True, False)
    x = args[0]
    grad_out = torch.randn_like(x)
    gx, gf, gc, gs, gr = ops.rotary_backward(grad_out, *args, [False, False, True, False])
    assert gx.numel() == 0 and gf.numel() == 0 and gr.numel() == 0
    assert gc.shape == args[2].shape and gs.shape == args[3].shape
    gx, gf, gc, gs, gr = ops.rotary_backward(grad_out, *args, [True, False, False, True])
    assert gx.shape == x.shape and gx.is_contiguous() and gr.shape == (8, 8)
    assert gc.numel() == 0 and gs.numel() == 0


def test_direct_op_calls_are_checked():
    """torch.ops.fastattn.* called directly (no Python validation) never reads out of bounds."""
    x = torch.randn(2, 2, 4, 8)
    inv = torch.rand(4)
    cos, sin = torch.randn(5, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="rotary_dim"):
        ops.rotary(x, inv, None, None, None, None, 0, False, 7)
    with pytest.raises(ValueError, match="inv_freq"):
        ops.rotary(x, torch.rand(3), None, None, None, None, 0, False, 8)
    with pytest.raises(ValueError, match="positions"):
        ops.rotary(x, None, cos, sin, torch.tensor([0, 1, 2, 5]), None, 0, False, 8)
    with pytest.raises(ValueError, match="offset"):
        ops.rotary(x, None, cos, sin, None, None, 2, False, 8)
    with pytest.raises(ValueError, match="rotation"):
        ops.rotary(x, inv, None, None, None, torch.eye(7), 0, False, 8)
    with pytest.raises(ValueError, match="grad_out"):
        ops.rotary_backward(torch.randn(2, 2, 4, 7), x, inv, None, None, None, None, 0, False, 8,
                            [True, True, False, False])
    with pytest.raises(RuntimeError):
        ops.rotary_(torch.randn(1, 1, 4, 8).expand(2, 2, 4, 8), inv, None, None, None, None, 0, False, 8)


@pytest.mark.parametrize("inference", (False, True), ids=("grad-mode", "inference-mode"))
@pytest.mark.parametrize("name", ("x", "inv_freq", "cos", "positions", "rotation", "grad_out"))
def test_direct_op_calls_mixing_devices_raise(name, inference):
    """A call mixing a meta tensor with CPU tensors must not reach the fake (meta) kernel and
    come back as uninitialized memory (or, in place, as an x left unrotated)."""
    x, inv = torch.randn(2, 2, 4, 8), torch.rand(4)
    cos, sin = torch.randn(5, 4), torch.randn(5, 4)
    args = dict(x=x, inv_freq=None if name == "cos" else inv, cos=cos if name == "cos" else None,
                sin=sin if name == "cos" else None, positions=torch.arange(4) if name == "positions" else None,
                rotation=torch.eye(8) if name == "rotation" else None)
    grad_out = torch.randn_like(x)
    if name == "grad_out":
        grad_out = grad_out.to("meta")
    else:
        args[name] = args[name].to("meta")
    bent = "inv_freq" if name == "x" else name  # with a meta x, the CPU table is the odd one out
    values = (*args.values(), 0, False, 8)
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        if name != "grad_out":
            with pytest.raises(ValueError, match=rf"fastattn: {bent}\b.*device"):
                ops.rotary(*values)
            with pytest.raises(ValueError, match=rf"fastattn: {bent}\b.*device"):
                ops.rotary_(*values)
        with pytest.raises(ValueError, match=rf"fastattn: {bent}\b.*device"):
            ops.rotary_backward(grad_out, *values, [True, True, True, True])


@st.composite
def _op_arguments(draw):
    """Arguments of torch.ops.fastattn.rotary as a caller that skips the Python checks could
    pass them: a valid call (inv_freq or cos/sin tables, any positions, rotation, layout) with
    up to two arguments bent: a tensor of any rank, size or dtype, positions past the table,
    an offset or rotary_dim out of range."""
    B, H, S = (draw(st.integers(1, 3)) for _ in range(3))
    D = draw(st.integers(2, 12))
    rd = 2 * draw(st.integers(1, D // 2))
    rows = S + draw(st.integers(0, 3))
    table = draw(st.booleans())
    args = dict(x=torch.randn(B, H, S, D), inv_freq=None if table else torch.rand(rd // 2),
                cos=torch.randn(rows, rd // 2) if table else None, sin=torch.randn(rows, rd // 2) if table else None,
                positions=draw(st.sampled_from((None, torch.randint(0, rows, (S,)), torch.randint(0, rows, (B, S))))),
                rotation=draw(st.sampled_from((None, torch.randn(D, D) / D))),
                offset=draw(st.integers(0, rows - S)) if table else draw(st.integers(0, 100)),
                interleaved=draw(st.booleans()), rotary_dim=rd)
    bad = dict(positions=st.one_of(any_tensor(rank_range=(0, 3), dtypes=(torch.int64, torch.int32, torch.float32)),
                                   st.just(torch.full((S,), rows)), st.just(torch.full((B, S), -1))),
               offset=st.one_of(st.integers(-3, -1), st.integers(rows - S + 1, rows + 2)),
               rotary_dim=st.one_of(st.integers(-2, 1), st.integers(D + 1, D + 3), st.just(rd - 1)))
    for name in draw(st.lists(st.sampled_from(list(args)), max_size=2, unique=True)):
        if name == "interleaved":
            continue
        args[name] = draw(bad.get(name, any_tensor()))
    return args


@pytest.mark.parametrize("device", DEVICES)
@random_settings(300)
@given(data=st.data())
def test_op_level_calls_run_or_fail_in_the_checks(device, data):
    """A direct torch.ops call (no Python validation) with arguments bent in any way either runs
    (out of x's shape, its backward and the in-place variant too, no NaN from finite inputs) or
    fails in fastattn's own C++ checks: a ValueError or TypeError (or, for what a device cannot
    do, a RuntimeError) whose message starts with "fastattn:",
    not an ATen error from inside a kernel, nor a crash or an out-of-bounds read."""
    args = {n: a.to(device) if isinstance(a, torch.Tensor) else a for n, a in data.draw(_op_arguments()).items()}
    values = list(args.values())
    try:
        out = ops.rotary(*values)
    except (ValueError, TypeError, RuntimeError) as e:
        assert str(e).startswith("fastattn:"), f"rejected outside fastattn's checks: {str(e).splitlines()[0]}"
        return
    x = args["x"]
    assert out.shape == x.shape
    if device == "cpu" or _positions_in_table(args):  # (CUDA: NaN rows past the table, no sync)
        assert not out.isnan().any(), "NaN output from finite inputs"
    grads = ops.rotary_backward(torch.ones_like(out), *values, [True, True, True, True])
    assert grads[0].shape == x.shape
    y = x.clone()
    ops.rotary_(y, *values[1:])
    torch.testing.assert_close(y, out, atol=1e-6, rtol=0, equal_nan=True, msg="rotary_ and rotary differ")


def _positions_in_table(args) -> bool:
    cos = args["cos"]
    if cos is None or cos.dim() != 2:
        return True
    pos = args["positions"]
    if pos is None:
        pos = args["offset"] + torch.arange(args["x"].shape[2])
    return pos.numel() == 0 or (int(pos.min()) >= 0 and int(pos.max()) < cos.shape[0])


# ---------------------------------------------------------------------------------------------
# bad input: ValueError / TypeError naming the argument
# ---------------------------------------------------------------------------------------------
def _bad_calls():
    x = torch.randn(2, 3, 5, 8)
    inv = torch.rand(4)
    cos, sin = torch.randn(9, 4), torch.randn(9, 4)
    meta = torch.device("meta")
    return [
        ("odd rotary_dim", ValueError, "rotary_dim", lambda: fastattn.rotary(x, inv_freq=torch.rand(2), rotary_dim=5)),
        ("rotary_dim > D", ValueError, "rotary_dim", lambda: fastattn.rotary(x, inv_freq=torch.rand(5), rotary_dim=10)),
        ("inv_freq length", ValueError, "inv_freq", lambda: fastattn.rotary(x, inv_freq=torch.rand(3))),
        ("both inv_freq and tables", ValueError, "inv_freq", lambda: fastattn.rotary(x, inv_freq=inv, cos=cos, sin=sin)),
        ("neither inv_freq nor tables", ValueError, "inv_freq", lambda: fastattn.rotary(x)),
        ("cos without sin", ValueError, "sin", lambda: fastattn.rotary(x, cos=cos)),
        ("table width", ValueError, "cos", lambda: fastattn.rotary(x, cos=torch.randn(9, 3), sin=torch.randn(9, 3))),
        ("positions past the table", ValueError, "positions",
         lambda: fastattn.rotary(x, cos=cos, sin=sin, positions=torch.tensor([0, 1, 2, 3, 9]))),
        ("negative positions with a table", ValueError, "positions",
         lambda: fastattn.rotary(x, cos=cos, sin=sin, positions=torch.tensor([0, -1, 2, 3, 4]))),
        ("offset past the table", ValueError, "offset", lambda: fastattn.rotary(x, cos=cos, sin=sin, offset=5)),
        ("positions shape", ValueError, "positions", lambda: fastattn.rotary(x, inv_freq=inv, positions=torch.arange(4))),
        ("positions dtype", TypeError, "positions", lambda: fastattn.rotary(x, inv_freq=inv, positions=torch.arange(5.0))),
        ("rotation shape", ValueError, "rotation", lambda: fastattn.rotary(x, inv_freq=inv, rotation=torch.eye(7))),
        ("rotation dtype", TypeError, "rotation",
         lambda: fastattn.rotary(x, inv_freq=inv, rotation=torch.eye(8, dtype=torch.float64))),
        ("inv_freq dtype", TypeError, "inv_freq", lambda: fastattn.rotary(x, inv_freq=inv.double())),
        ("cos/sin dtype", TypeError, "cos",
         lambda: fastattn.rotary(x.half(), cos=cos.bfloat16(), sin=sin.bfloat16())),
        ("x dtype", TypeError, "x", lambda: fastattn.rotary(x.int(), inv_freq=inv)),
        ("x rank", ValueError, "x", lambda: fastattn.rotary(x[0], inv_freq=inv)),
        ("inv_freq device", ValueError, "inv_freq", lambda: fastattn.rotary(x, inv_freq=inv.to(meta))),
        ("cos device", ValueError, "cos", lambda: fastattn.rotary(x, cos=cos.to(meta), sin=sin)),
        ("rotation device", ValueError, "rotation",
         lambda: fastattn.rotary(x, inv_freq=inv, rotation=torch.eye(8, device=meta))),
        ("positions device", ValueError, "positions",
         lambda: fastattn.rotary(x, inv_freq=inv, positions=torch.arange(5, device=meta))),
        ("inplace on x requiring grad", ValueError, "inplace",
         lambda: fastattn.rotary(x.clone().requires_grad_(True), inv_freq=inv, inplace=True)),
        ("inplace with a parameter requiring grad", ValueError, "inplace",
         lambda: fastattn.rotary(x.clone(), inv_freq=inv.clone().requires_grad_(True), inplace=True)),
        ("offset type", TypeError, "offset", lambda: fastattn.rotary(x, inv_freq=inv, offset=1.5)),
        ("offset bool", TypeError, "offset", lambda: fastattn.rotary(x, inv_freq=inv, offset=True)),
        ("offset >= 2**63", ValueError, "offset", lambda: fastattn.rotary(x, inv_freq=inv, offset=2 ** 63)),
        ("offset < -2**63", ValueError, "offset", lambda: fastattn.rotary(x, inv_freq=inv, offset=-2 ** 63 - 1)),
        ("offset >= 2**63 with a table", ValueError, "offset",
         lambda: fastattn.rotary(x, cos=cos, sin=sin, offset=2 ** 64)),
    ]


def test_numpy_integer_offset_is_accepted():
    np = pytest.importorskip("numpy")
    x, inv = torch.randn(2, 3, 5, 8), torch.rand(4)
    want = fastattn.rotary(x, inv_freq=inv, offset=7)
    for t in (np.int64, np.int32, np.uint16):
        torch.testing.assert_close(fastattn.rotary(x, inv_freq=inv, offset=t(7)), want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="offset"):
        fastattn.rotary(x, inv_freq=inv, offset=np.float64(7))


BAD = _bad_calls()


@pytest.mark.parametrize("what,exc,name,call", BAD, ids=[b[0] for b in BAD])
def test_bad_input(what, exc, name, call):
    with pytest.raises(exc, match=name) as info:
        call()
    assert "fastattn" in str(info.value)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fastattn")
@pytest.mark.cuda
def test_cuda_out_of_table_positions_give_nan():
    """Direct op calls on CUDA are not range-checked on the host (no sync): rows at positions
    outside the cos/sin table come out NaN, the others are right, nothing is read out of bounds."""
    x = torch.randn(1, 2, 3, 4, device="cuda")
    cos, sin = torch.randn(5, 2, device="cuda"), torch.randn(5, 2, device="cuda")
    pos = torch.tensor([1, 7, -2], device="cuda")
    out = ops.rotary(x, None, cos, sin, pos, None, 0, False, 4)
    assert torch.isnan(out[:, :, 1:]).all() and not torch.isnan(out[:, :, 0]).any()
    want = reference.rotary(x[:, :, :1].cpu(), cos=cos.cpu(), sin=sin.cpu(), positions=pos[:1].cpu())
    assert torch.allclose(out[:, :, :1].cpu(), want, atol=1e-6)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fastattn")
@pytest.mark.cuda
def test_cuda_float64_is_rejected():
    x = torch.randn(1, 1, 2, 4, dtype=torch.float64, device="cuda")
    with pytest.raises(TypeError, match="float64"):
        fastattn.rotary(x, inv_freq=torch.rand(2, dtype=torch.float64, device="cuda"))


@pytest.mark.parametrize("device", DEVICES)
def test_large_outputs_live_on_the_input_device(device):
    """Outputs of 8 MiB and more (the CPU output cache's threshold) come back on x's device and
    right: a cached host buffer handed to a CUDA kernel would be an illegal address."""
    shape = (2, 8, 1040, 128)  # just over 8 MiB of float32
    g = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=g).to(device).requires_grad_()
    inv = (1.0 / (10000 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)))
    out = fastattn.rotary(x, inv_freq=inv.float().to(device))
    assert out.device == x.device
    gr = torch.randn(shape, generator=g).to(device)
    (gx,) = torch.autograd.grad(out, x, gr)
    assert gx.device == x.device
    xd = x.detach().cpu().double().requires_grad_()
    want = reference.rotary(xd, inv_freq=inv)
    (gx_ref,) = torch.autograd.grad(want, xd, gr.cpu().double())
    assert_close("rotary out (large)", out, want, torch.float32)
    assert_close("rotary grad_x (large)", gx, gx_ref, torch.float32)


# ---------------------------------------------------------------------------------------------
# large CPU outputs come from a cache of released buffers (csrc/cpu/output_buffers.cpp)
# ---------------------------------------------------------------------------------------------
def test_large_outputs_reuse_released_buffers_and_overwrite_them():
    """A released 8 MiB output buffer is handed out again: stale contents must never show (the
    pass-through dims past rotary_dim and the gradient are written in full), and live outputs
    never share memory."""
    torch.manual_seed(0)
    shape = (2, 8, 1024, 128)  # 8 MiB of float32: the cache's threshold
    inv = 1.0 / (10000 ** (torch.arange(0, 96, 2, dtype=torch.float64) / 96))
    first = fastattn.rotary(torch.randn(shape), inv_freq=inv.float(), rotary_dim=96)
    first_ptr = first.data_ptr()
    first.fill_(123.0)  # poison the buffer before releasing it
    del first
    x = torch.randn(shape, requires_grad=True)
    out = fastattn.rotary(x, inv_freq=inv.float(), rotary_dim=96)
    assert out.data_ptr() == first_ptr, "the released buffer was not reused"
    expected = reference.rotary(x.detach().double(), inv_freq=inv, rotary_dim=96)
    assert_close("rotary out (reused buffer)", out, expected, torch.float32)
    other = fastattn.rotary(x.detach(), inv_freq=inv.float(), rotary_dim=96)
    assert other.data_ptr() != out.data_ptr(), "two live outputs share memory"
    del other  # its buffer (poison-free but stale) is now the one the gradient gets
    g = torch.randn(shape)
    (gx,) = torch.autograd.grad(out, x, g)
    xd = x.detach().double().requires_grad_()
    (gx_ref,) = torch.autograd.grad(reference.rotary(xd, inv_freq=inv, rotary_dim=96), xd, g.double())
    assert_close("rotary grad_x (reused buffer)", gx, gx_ref, torch.float32)
