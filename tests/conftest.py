"""Shared test machinery: devices, per-dtype tolerances, input builders, and an independent
dense-SDPA formulation of fastattn.attention.

The attention tests compare the fused op with two references:
  - fastattn.reference.attention (the project's own pure-PyTorch twin), and
  - `dense_sdpa_attention` below: torch.nn.functional.scaled_dot_product_attention fed with
    a bias/mask materialized here, written independently of reference.py (different code
    path for the distance table, the masks and the span's log-mask; GQA by repeat_interleave).
Both references run in float64 on the CPU, on the very same (already rounded) input values as
the fused call.

Tolerances. float32/float64 results must be within an absolute + relative (to the largest
exact value) bound of the float64 result. For float16/bfloat16 the bound is twice the error of
the same math run in that precision (the dense formulation with q, k, v and the bias in the
dtype, no upcast), plus a half-ulp-sized slack relative to the largest exact value.

Helpers are imported by the test modules (`from conftest import ...`); pytest puts tests/ on
sys.path (rootdir-relative "prepend" import mode).
"""
from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import fastattn
from fastattn import reference

# ---------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------


def _cuda_kernels_built() -> bool:
    try:
        return fastattn.build_info().get("cuda", "0") not in ("0", "", "none")
    except Exception:
        return False


HAS_CUDA = torch.cuda.is_available() and _cuda_kernels_built()

# "cpu" always; "cuda" only with a GPU *and* a library built with the CUDA kernels.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fastattn")]),
]

# What each device's kernels are expected to support. The CUDA kernels are tensor-core
# kernels: float16/bfloat16 and head dims 32..256.
DEVICE_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16, torch.float16, torch.float32),
}
# The dtype a CPU case (float32 by default) runs in on the device: the CUDA kernels' main path
# is the tensor-core one, so the option grids run in bfloat16 there; the float32 CUDA kernel
# is covered by the dtype tests.
DEVICE_CASE_DTYPE = {"cuda": torch.bfloat16}
DEVICE_HEAD_DIM = {"cpu": 16, "cuda": 32}        # a small head dim each device supports
DEVICE_HEAD_DIM_V = {"cpu": 8, "cuda": 64}       # a different value head dim (Dqk != Dv)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


# ---------------------------------------------------------------------------------------------
# CPU threads
# ---------------------------------------------------------------------------------------------
def pytest_configure(config):
    config.addinivalue_line(
        "markers", "multithread: run with (at least) 2 intra-op CPU threads; the attention tests "
        "otherwise pin 1 thread")


_DEFAULT_THREADS = torch.get_num_threads()


def pin_threads(request):
    """Body of the attention modules' autouse fixture.

    Tiny problems are fastest on one thread (and on a loaded 2-core machine, OpenMP's spinning
    threads make them 20x slower), so tests use one thread unless marked `multithread`; those
    (larger shapes, the determinism check) run the kernels' parallel paths on >= 2 threads.
    """
    want = max(2, _DEFAULT_THREADS) if request.node.get_closest_marker("multithread") else 1
    before = torch.get_num_threads()
    torch.set_num_threads(want)
    yield
    torch.set_num_threads(before)


def load_example(name: str):
    """examples/<name>.py, imported as a module (its main() runs only when called)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def per_sequence_calls(q, k, v, cu_q, cu_k, options, fn=fastattn.attention):
    """attention_varlen's peer: one fn call per sequence of the packed q (total_q, Hq, D), k, v
    on (1, H, len, D) views, sequence s with its row of (n_seq, Hq) alibi_slopes / span; returns
    (out (total_q, Hq, Dv), lse (Hq, total_q))."""
    bq, bk = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for s in range(len(bq) - 1):
        kw = {n: (t[s:s + 1] if n in ("alibi_slopes", "span") and t.dim() == 2 else t) for n, t in options.items()}
        view = lambda t, b: t[b[s]:b[s + 1]].transpose(0, 1).unsqueeze(0)  # noqa: E731
        o, lse = fn(view(q, bq), view(k, bk), view(v, bk), return_lse=True, **kw)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, 1)


def seeded_sequence_calls(drawn, n_seq: int, op=None):
    """A fastattn.attention(q, k, v, **options) for per_sequence_calls: the attention op `op`
    (default fastattn's) called, sequence s after sequence s - 1, with the dropout [seed,
    offset + s] attention_varlen gives sequence s (`drawn`: the call's one draw, or None)."""
    import inspect

    signature = inspect.signature(fastattn.attention)
    op = torch.ops.fastattn.attention.default if op is None else op
    seeds = iter([None if drawn is None else drawn + torch.tensor([0, s], device=drawn.device)
                  for s in range(n_seq)])

    def call(q, k, v, **options):
        bound = signature.bind(q, k, v, **options)
        bound.apply_defaults()
        return fastattn.functional._attention(op, *bound.arguments.values(), drawn_seed=next(seeds))
    return call


@pytest.fixture(scope="module")
def one_thread():
    """Examples' tiny models: one thread is fastest, and immune to a busy machine's
    oversubscription (module-wide, unlike pin_threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# random tests (Hypothesis)
# ---------------------------------------------------------------------------------------------
def random_settings(default_examples: int):
    """Settings of the random (Hypothesis) tests. By default a fixed, derandomized set of
    `default_examples` examples: the same every run, so CI is reproducible.
    FASTATTN_RANDOM_EXAMPLES=N runs N freshly random examples instead, for bug hunting (a
    failure prints the falsifying call; Hypothesis's database in .hypothesis/ replays it)."""
    requested = os.environ.get("FASTATTN_RANDOM_EXAMPLES")
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    if requested:
        return settings(max_examples=int(requested), **common)
    return settings(max_examples=default_examples, derandomize=True, database=None, **common)


@st.composite
def any_tensor(draw, rank_range=(0, 5), size_max=4, dtypes=(torch.float32, torch.float64, torch.int64)):
    """A tensor of any rank, sizes (0 included) and dtype: what a bent argument of a direct
    torch.ops call may be (the op-level fuzz tests)."""
    rank = draw(st.integers(*rank_range))
    shape = tuple(draw(st.integers(0, size_max)) for _ in range(rank))
    dtype = draw(st.sampled_from(dtypes))
    return torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(-2, 6, shape)


# ---------------------------------------------------------------------------------------------
# tolerances
# ---------------------------------------------------------------------------------------------
LOW_PRECISION = (torch.float16, torch.bfloat16)

# float32 / float64: |actual - exact| <= atol + rtol * max|exact|.
# float64 is not held to 1e-12: the kernels read the bias table, slopes, span and scale as
# float32 and keep lse in float32 (see csrc/common/attention_params.h), so ~1e-7 relative
# errors are by design.
TOL = {
    torch.float64: dict(atol=1e-7, rtol=2e-6),
    torch.float32: dict(atol=1e-5, rtol=5e-5),
}
# float16 / bfloat16: |actual - exact| <= 2 * |same_math_in_dtype - exact| + slack * max|exact|,
# slack = half an ulp at 1 (2^-11 for float16, 2^-8 for bfloat16).
LOWP_SLACK = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# ... plus an absolute floor at float32 accumulation noise, for results whose exact value is 0
# while their terms are not (a table row whose dS sum cancels exactly, say): the kernels
# accumulate in float32, in another order than the reference.
LOWP_ATOL = 1e-5
# lse is float32 whatever the input dtype: |actual - exact| <= tol * max(1, |exact|).
LSE_TOL = {torch.float64: 2e-5, torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def assert_close(name: str, actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                 lowp: Optional[torch.Tensor] = None, lowp_exact: Optional[torch.Tensor] = None,
                 extra_atol: float = 0.0, floor: Optional[torch.Tensor] = None) -> None:
    """actual (any dtype/device) against exact (float64); lowp is the reference run in dtype,
    whose error (against lowp_exact, default exact) sets the low-precision budget; extra_atol
    is added to the bound; floor (broadcastable to exact) adds a per-element allowance (the
    floors of `error_floors`).

    Non-finite values must sit at the same places with the same values (e.g. lse = -inf of
    empty rows); NaN is never accepted.
    """
    assert actual is not None, f"{name}: no value (gradient missing?)"
    a = actual.detach().to("cpu", torch.float64)
    e = exact.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{name}: contains NaN"
    fin = torch.isfinite(e)
    mismatch = torch.isfinite(a) != fin
    assert not mismatch.any(), (f"{name}: finite/non-finite pattern differs at "
                                f"{mismatch.nonzero()[:5].tolist()} (actual {a[mismatch][:5].tolist()}, "
                                f"expected {e[mismatch][:5].tolist()})")
    assert torch.equal(a[~fin], e[~fin]), f"{name}: non-finite values differ"
    if not fin.any():
        return
    diff = (a - e).abs().masked_fill(~fin, 0)
    err = diff.max().item()
    big = e[fin].abs().max().item()
    if dtype in LOW_PRECISION:
        assert lowp is not None, f"{name}: low-precision check needs the reference run in {dtype}"
        lp = lowp.detach().to("cpu", torch.float64)
        le = e if lowp_exact is None else lowp_exact.detach().to("cpu", torch.float64)
        ref_err = (lp - le).abs().masked_fill(~fin, 0).max().item()
        bound = 2.0 * ref_err + LOWP_SLACK[dtype] * max(big, 1e-3) + LOWP_ATOL + extra_atol
        how = f"2 * error of the math run in {dtype} {ref_err:.3g} + slack"
    else:
        tol = TOL[dtype]
        bound = tol["atol"] + tol["rtol"] * big + extra_atol
        how = f"atol {tol['atol']} + rtol {tol['rtol']} * max|exact| {big:.3g}"
    if extra_atol:
        how += f" + {extra_atol:g}"
    if floor is None:
        if not err <= bound:
            where = tuple(int(x) for x in torch.nonzero(diff == diff.max())[0])
            raise AssertionError(f"{name} ({dtype}): max error {err:.4g} > bound {bound:.4g} ({how}); "
                                 f"worst at {where}: got {a[where].item():.6g}, expected {e[where].item():.6g}")
        return
    allowed = bound + floor.detach().to(torch.float64).expand_as(diff)
    excess = diff - allowed
    if (excess > 0).any():
        where = tuple(int(x) for x in torch.nonzero(excess == excess.max())[0])
        raise AssertionError(f"{name} ({dtype}): error {diff[where].item():.4g} > bound {bound:.4g} ({how}) "
                             f"+ floor {allowed[where].item() - bound:.4g} at {where}: "
                             f"got {a[where].item():.6g}, expected {e[where].item():.6g}")


def assert_lse_close(name: str, actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    a = actual.detach().to("cpu", torch.float64)
    e = exact.detach().to("cpu", torch.float64)
    assert actual.dtype == torch.float32, f"{name}: lse must be float32, got {actual.dtype}"
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{name}: contains NaN"
    fin = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), fin) and torch.equal(a[~fin], e[~fin]), \
        f"{name}: -inf rows differ (actual {a[~fin][:5].tolist()} where expected -inf)"
    if fin.any():
        err = ((a - e).abs() / e.abs().clamp_min(1.0))[fin].max().item()
        assert err <= LSE_TOL[dtype], f"{name}: max relative error {err:.3g} > {LSE_TOL[dtype]}"


# ---------------------------------------------------------------------------------------------
# test cases
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One attention call: shapes, dtype, layout and every option of fastattn.attention.

    rel_bias: max_dist of a (2*max_dist-1, Hq) table, or None.
    span: None, "h" (Hq,) or "bh" (B, Hq); span_values cycles over heads (and batches).
        span_grad=False keeps the span out of the gradient check: m = clamp(..., 0, 1) has a
        kink where R + span - |d| hits 0 or R (integer spans), and there the reference
        (torch.clamp's inclusive subgradient) and the kernels (0 at m == 1) legitimately differ.
    key_lengths: per-batch lengths (0 empties a whole batch), or None.
    scale: "default", a float, or "tensor" (0-dim tensor that requires grad).
    layout: "contiguous", "bshd" ((B, S, H, D).transpose(1, 2) views), "packed" (views into
        one (B, S, Hq + 2 Hkv, D) buffer) or "lastdim" (last dim strided by 2: the wrapper copies).
    dropout: attention dropout_p; every formulation draws the same mask (dropout_generator,
        and the (seed, offset) it gives for the references).
    q_offset, k_offset: per-batch positions of query 0 and key 0, or None (the defaults).
    attn_mask: None, "bool" ((B, 1, Sq, Sk), 75% True), "float" ((Hq, Sq, Sk) added, some -inf)
        or "float_grad" ((1, Hq, Sq, Sk), requires grad); "blocks" / "blocks_float_grad": a
        block-diagonal mask of documents (bool (B, 1, Sq, Sk); float (1, Hq, Sq, Sk) with -inf
        across documents, requires grad) whose whole tiles are hidden (the kernels skip them).
    """
    B: int = 2
    Hq: int = 4
    Hkv: int = 4
    Sq: int = 17
    Sk: int = 17
    Dqk: int = 16
    Dv: int = 16
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    causal: bool = False
    window: tuple = (-1, -1)
    rel_bias: Optional[int] = None
    alibi: bool = False
    span: Optional[str] = None
    span_values: tuple = (3.5, 20.25)
    span_ramp: float = 32.0
    span_grad: bool = True
    num_global: int = 0
    key_lengths: Optional[tuple] = None
    scale: object = "default"
    softcap: float = 0.0
    dropout: float = 0.0
    q_offset: Optional[tuple] = None
    k_offset: Optional[tuple] = None
    attn_mask: Optional[str] = None
    layout: str = "contiguous"
    seed: int = 0

    def options(self) -> dict:
        return dict(causal=self.causal, window=self.window, span_ramp=self.span_ramp,
                    num_global=self.num_global, softcap=self.softcap)


def _randn(shape, gen, dtype, device):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return t.to(device)


def make_inputs(case: Case, requires_grad: bool = True) -> dict:
    """Leaf tensors for `case` in its dtype/device (q/k/v with the case's strides)."""
    g = torch.Generator().manual_seed(case.seed)
    dt, dev = case.dtype, case.device
    B, Hq, Hkv, Sq, Sk, Dqk, Dv = case.B, case.Hq, case.Hkv, case.Sq, case.Sk, case.Dqk, case.Dv

    def leaf(t):
        t = t.detach()
        return t.requires_grad_(requires_grad) if requires_grad else t

    def bhsd(H, S, D):  # a (B, H, S, D) tensor with the requested strides
        if case.layout == "bshd":
            return _randn((B, S, H, D), g, dt, dev).transpose(1, 2)
        if case.layout == "lastdim":
            return _randn((B, H, S, 2 * D), g, dt, dev)[..., ::2]
        return _randn((B, H, S, D), g, dt, dev)

    if case.layout == "packed":
        assert Sq == Sk and Dqk == Dv, "packed layout needs Sq == Sk and Dqk == Dv"
        buf = _randn((B, Sq, Hq + 2 * Hkv, Dqk), g, dt, dev)
        q = buf[:, :, :Hq].transpose(1, 2)
        k = buf[:, :, Hq:Hq + Hkv].transpose(1, 2)
        v = buf[:, :, Hq + Hkv:].transpose(1, 2)
    else:
        q, k, v = bhsd(Hq, Sq, Dqk), bhsd(Hkv, Sk, Dqk), bhsd(Hkv, Sk, Dv)
    inp = dict(q=leaf(q), k=leaf(k), v=leaf(v))
    # Small parameters: float32 for low-precision inputs (as a model under autocast keeps
    # them), the input dtype otherwise.
    pdt = torch.float32 if dt in LOW_PRECISION else dt
    if case.rel_bias is not None:
        rows = 2 * case.rel_bias - 1
        inp["rel_bias"] = leaf((0.5 * torch.randn(rows, Hq, generator=g, dtype=torch.float64)).to(pdt).to(dev))
    if case.alibi:
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / Hq) for h in range(Hq)], dtype=pdt)
        inp["alibi_slopes"] = slopes.to(dev)
    if case.span is not None:
        vals = list(itertools.islice(itertools.cycle(case.span_values), B * Hq))
        sp = torch.tensor(vals, dtype=torch.float64).view(B, Hq)
        sp = sp[0] if case.span == "h" else sp
        sp = sp.to(pdt).to(dev)
        inp["span"] = leaf(sp) if case.span_grad else sp
    if case.key_lengths is not None:
        inp["key_lengths"] = torch.tensor(case.key_lengths, dtype=torch.int64, device=dev)
    if case.attn_mask == "bool":
        inp["attn_mask"] = (torch.rand(B, 1, case.Sq, case.Sk, generator=g) < 0.75).to(dev)
    elif case.attn_mask in ("float", "float_grad"):
        shape = (Hq, case.Sq, case.Sk) if case.attn_mask == "float" else (1, Hq, case.Sq, case.Sk)
        m = 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)
        m = torch.where(torch.rand(*shape, generator=g) < 0.05, torch.full((), -math.inf, dtype=torch.float64), m)
        m = m.to(pdt).to(dev)
        inp["attn_mask"] = leaf(m) if case.attn_mask == "float_grad" else m
    elif case.attn_mask in ("blocks", "blocks_float_grad"):
        m = _block_diagonal_mask(case, Hq, g, pdt, dev)
        inp["attn_mask"] = leaf(m) if m.is_floating_point() else m
    for name in ("q_offset", "k_offset"):
        if getattr(case, name) is not None:
            inp[name] = torch.tensor(getattr(case, name), dtype=torch.int64, device=dev)
    if case.scale == "tensor":
        inp["scale"] = leaf(torch.tensor(0.37, dtype=pdt, device=dev))
    elif case.scale != "default":
        inp["scale"] = float(case.scale)
    return inp


def clone_inputs(inp: dict, dtype: Optional[torch.dtype] = None, device="cpu", requires_grad=True) -> dict:
    """Fresh leaves with the same values (cast to dtype when given; params stay float if lowp)."""
    out = {}
    for name, t in inp.items():
        if not isinstance(t, torch.Tensor):
            out[name] = t
            continue
        t = t.detach().to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if requires_grad and inp[name].requires_grad:
            t = t.clone().requires_grad_(True)
        out[name] = t
    return out


def _block_diagonal_mask(case, Hq, g, pdt, dev):
    """Documents of a packed row: query i and key j see each other when they lie in the same
    document, documents cut at the same fractions of Sq and of Sk (some shorter than a tile,
    some longer: whole tiles off the diagonal are hidden)."""
    cuts = torch.tensor([0.0, 0.1, 0.15, 0.55, 1.0])

    def doc_of(n):
        edges = (cuts * n).round().long()
        return torch.searchsorted(edges[1:-1], torch.arange(n), right=True)

    same = doc_of(case.Sq)[:, None] == doc_of(case.Sk)[None, :]   # (Sq, Sk)
    if case.attn_mask == "blocks":
        return same.expand(case.B, 1, case.Sq, case.Sk).to(dev)
    m = 0.5 * torch.randn(1, Hq, case.Sq, case.Sk, generator=g, dtype=torch.float64)
    return torch.where(same, m, torch.full((), -math.inf, dtype=torch.float64)).to(pdt).to(dev)


GRAD_NAMES = ("q", "k", "v", "rel_bias", "span", "scale", "attn_mask")


def dropout_generator(case: Case) -> torch.Generator:
    """The generator a case's fused call draws its dropout (seed, offset) from."""
    return torch.Generator(device=case.device).manual_seed(case.seed + 77)


def run_attention(fn, inp: dict, case: Case, grad_out=None, grad_lse=None, backward=True) -> dict:
    """Call fn(q, k, v, **options) with return_lse; backprop sum(out*grad_out) (+ lse term).
    With dropout, the references get the (seed, offset) the fused call draws."""
    kw = {n: inp[n] for n in ("rel_bias", "alibi_slopes", "span", "key_lengths", "scale", "q_offset", "k_offset",
                              "attn_mask") if n in inp}
    if case.dropout:
        kw["dropout_p"] = case.dropout
        if fn in (reference.attention, dense_sdpa_attention):
            kw["dropout_seed"] = fastattn.functional.dropout_seed(case.dropout, dropout_generator(case),
                                                                  inp["q"]).cpu()
        else:
            kw["generator"] = dropout_generator(case)
    out, lse = fn(inp["q"], inp["k"], inp["v"], return_lse=True, **kw, **case.options())
    res = dict(out=out, lse=lse)
    if backward and grad_out is not None:
        loss = (out.to(torch.float64) * grad_out.to(out.device, torch.float64)).sum()
        if grad_lse is not None:
            finite = torch.isfinite(lse)
            loss = loss + (torch.where(finite, lse, torch.zeros_like(lse)).to(torch.float64)
                           * grad_lse.to(lse.device, torch.float64)).sum()
        leaves = [inp[n] for n in GRAD_NAMES if isinstance(inp.get(n), torch.Tensor) and inp[n].requires_grad]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        it = iter(grads)
        for n in GRAD_NAMES:
            if isinstance(inp.get(n), torch.Tensor) and inp[n].requires_grad:
                res["grad_" + n] = next(it)
    return res


# ---------------------------------------------------------------------------------------------
# direct op calls
# ---------------------------------------------------------------------------------------------
# The attention op's arguments other than q, k, v, as fastattn.attention passes them by default.
ATTENTION_OP_DEFAULTS = dict(scale=None, scale_tensor=None, causal=False, window_left=-1, window_right=-1,
                             rel_bias=None, alibi_slopes=None, span=None, span_ramp=32.0, num_global=0,
                             key_lengths=None, softcap=0.0, dropout_p=0.0, dropout_seed=None,
                             q_offset=None, k_offset=None, attn_mask=None)


def attention_op_args(q, k, v, **options) -> tuple:
    """The positional arguments of torch.ops.fastattn.attention, in schema order (names and order
    read from the registered schema: fastattn.ops.ATTENTION_ARGS)."""
    from fastattn.ops import ATTENTION_ARGS
    unknown = set(options) - set(ATTENTION_OP_DEFAULTS)
    assert not unknown, f"not attention op arguments: {unknown}"
    named = dict(ATTENTION_OP_DEFAULTS, **options, q=q, k=k, v=v)
    assert set(named) == set(ATTENTION_ARGS), f"the op's arguments changed: {ATTENTION_ARGS}"
    return tuple(named[n] for n in ATTENTION_ARGS)


def attention_backward_op_args(grad_out, out, lse, grad_lse, args: tuple, need_rel_bias_grad=True,
                               need_span_grad=True, need_attn_mask_grad=True) -> tuple:
    """The arguments of torch.ops.fastattn.attention_backward for the forward call `args`."""
    return (grad_out, out, lse, grad_lse, need_rel_bias_grad, need_span_grad, need_attn_mask_grad, *args)


# ---------------------------------------------------------------------------------------------
# the independent dense-SDPA formulation
# ---------------------------------------------------------------------------------------------
def dense_visibility_and_bias(B, Hq, Sq, Sk, *, causal=False, window=(-1, -1), rel_bias=None,
                              alibi_slopes=None, span=None, span_ramp=32.0, num_global=0,
                              key_lengths=None, q_offset=None, k_offset=None, attn_mask=None,
                              dtype=torch.float64):
    """(visible (B, Hq, Sq, Sk) bool, additive bias (B, Hq, Sq, Sk)) from DESIGN.md's rules.

    Written from the spec, not from reference.py: query i of row b stands at position
    q_offset[b] + i (default Sk - Sq), key j at k_offset[b] + j (default 0), distance d =
    pos_q - pos_k. attn_mask follows SDPA: bool True may attend, a float is added (-inf hides
    the pair). The bias is computed in float64 and returned in `dtype`.
    """
    out_dtype, dtype = dtype, torch.float64
    q0 = (torch.full((B,), Sk - Sq) if q_offset is None else q_offset.cpu().long()).view(B, 1, 1, 1)
    k0 = (torch.zeros(B, dtype=torch.long) if k_offset is None else k_offset.cpu().long()).view(B, 1, 1, 1)
    qpos = q0 + torch.arange(Sq).view(1, 1, Sq, 1)                       # (B, 1, Sq, 1)
    kpos = k0 + torch.arange(Sk).view(1, 1, 1, Sk)                       # (B, 1, 1, Sk)
    dist = qpos - kpos                                                   # (B, 1, Sq, Sk)
    adist = dist.abs().to(dtype)
    shape = (B, Hq, Sq, Sk)

    visible = torch.ones(shape, dtype=torch.bool)
    if key_lengths is not None:  # by key index
        visible = visible & (torch.arange(Sk).view(1, 1, 1, Sk) < key_lengths.cpu().view(B, 1, 1, 1))
    if causal:
        visible = visible & (dist >= 0)

    # Longformer global tokens: the first G keys, and queries at positions 0..G-1. With G = 0
    # nothing is global (not even queries at negative positions when Sq > Sk).
    global_pair = ((kpos < num_global) | (qpos < num_global)) & (num_global > 0)  # (B, 1, Sq, Sk)
    left, right = window
    in_window = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
    if left != -1:
        in_window = in_window & (dist <= left)
    if right != -1:
        in_window = in_window & (dist >= -right)
    local_ok = in_window.expand(shape)

    bias = torch.zeros(shape, dtype=dtype)
    if span is not None:
        s = span.to(dtype)
        s = s.view(1, Hq, 1, 1) if s.dim() == 1 else s.view(B, Hq, 1, 1)
        ratio = (span_ramp + s - adist) / span_ramp                       # (B|1, Hq, Sq, Sk)
        # m = clamp(ratio, 0, 1), written with where so that the gradient is 0 at m == 1
        # (the kernels' convention; the tests keep spans off the kinks anyway).
        one = torch.ones((), dtype=dtype)
        m = torch.where(ratio >= 1, one, torch.where(ratio <= 0, torch.zeros((), dtype=dtype), ratio))
        m = m.expand(shape)
        local_ok = local_ok & (m > 0)
        log_m = torch.where(m > 0, m, one).log()
        bias = bias + torch.where(global_pair, torch.zeros((), dtype=dtype), log_m)
    visible = visible & (global_pair | local_ok)

    if rel_bias is not None:
        max_dist = (rel_bias.shape[0] + 1) // 2
        row = (dist.clamp(min=-(max_dist - 1), max=max_dist - 1) + (max_dist - 1))[:, 0]  # (B, Sq, Sk)
        table_bias = F.embedding(row, rel_bias.to(dtype))                # (B, Sq, Sk, Hq)
        bias = bias + table_bias.permute(0, 3, 1, 2)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype)
        bias = bias - (slopes.view(1, Hq, 1, 1) if slopes.dim() == 1 else slopes.view(B, Hq, 1, 1)) * adist
    if attn_mask is not None:
        m = attn_mask.cpu()
        if m.dtype == torch.bool:
            visible = visible & m
        else:
            hidden = torch.isneginf(m)
            visible = visible & ~hidden
            bias = bias + torch.where(hidden, torch.zeros((), dtype=dtype), m.to(dtype))
    return visible, bias.to(out_dtype)


def dense_sdpa_attention(q, k, v, *, scale=None, causal=False, window=(-1, -1), rel_bias=None,
                         alibi_slopes=None, span=None, span_ramp=32.0, num_global=0,
                         key_lengths=None, q_offset=None, k_offset=None, attn_mask=None, softcap=0.0,
                         dropout_p=0.0, dropout_seed=None, return_lse=True):
    """fastattn.attention's math through F.scaled_dot_product_attention with a dense mask.

    Runs in q's dtype (use float64 CPU inputs). Rows with no visible key are computed with a
    harmless mask and then replaced by the expected zeros (lse -inf). With softcap, whose cap
    SDPA cannot apply, the softmax of the capped scores is written out densely instead; with
    dropout too (SDPA draws its own mask), the weights then times reference.dropout_keep_mask.
    """
    B, Hq, Sq, Dqk = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dtype = q.dtype
    visible, bias = dense_visibility_and_bias(
        B, Hq, Sq, Sk, causal=causal, window=window, rel_bias=rel_bias, alibi_slopes=alibi_slopes,
        span=span, span_ramp=span_ramp, num_global=num_global, key_lengths=key_lengths,
        q_offset=q_offset, k_offset=k_offset, attn_mask=attn_mask, dtype=dtype)
    kr = k.repeat_interleave(Hq // Hkv, dim=1)
    vr = v.repeat_interleave(Hq // Hkv, dim=1)
    if scale is None:
        scale = Dqk ** -0.5
    # A tensor scale (learnable) multiplies q so that autograd reaches it; SDPA's own scale is 1.
    qs = q * scale.to(dtype) if isinstance(scale, torch.Tensor) else q * scale
    mask = torch.where(visible, bias, torch.full((), -math.inf, dtype=dtype))
    empty_row = ~visible.any(dim=-1)                                     # (B, Hq, Sq)
    safe_mask = torch.where(empty_row.unsqueeze(-1), torch.zeros((), dtype=dtype), mask)
    scores = qs @ kr.transpose(-1, -2)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    lse = torch.logsumexp(scores + safe_mask, dim=-1)
    lse = torch.where(empty_row, torch.full((), -math.inf, dtype=dtype), lse)
    if softcap > 0 or dropout_p > 0:
        weights = torch.softmax(scores + safe_mask, dim=-1)
        if dropout_p > 0:
            keep = reference.dropout_keep_mask(int(dropout_seed[0]), int(dropout_seed[1]), B, Hq, Sq, Sk,
                                               dropout_p, q.device, q_offset, k_offset)
            weights = weights * keep / (1 - dropout_p)
        out = weights @ vr
    else:
        out = F.scaled_dot_product_attention(qs, kr, vr, attn_mask=safe_mask, scale=1.0)
    out = torch.where(empty_row.unsqueeze(-1), torch.zeros((), dtype=dtype), out)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# error floors
# ---------------------------------------------------------------------------------------------
# Per-element allowances for two rounding effects that a bound relative to the largest exact
# value cannot express, each carried through the formula of the value it affects, added up
# linearly where the errors are shared and as a root-sum-square (rss) where they are
# independent roundings (a linear sum over thousands of them would allow errors no kernel
# makes); the allowance is FLOOR_ULPS times the result.
#
# 1. Cancellation (every dtype). Every gradient but dV goes through dS = P * (dP - D),
#    D_i = rowsum(dO_i * O_i) - grad_lse_i, whose two terms cancel: where a row sees one key
#    (P = 1, dP = D) the exact dS is 0 while a float32 kernel leaves noise of the size of the
#    terms, and sums of it over many pairs (dK over the queries, a table row over a distance,
#    the scale over everything) exceed any bound relative to an exact value that is itself ~0.
#    At float32's unit roundoff (the kernels read lse, the table and the scale as float32 in
#    every dtype, so float64 calls carry float32-sized noise here too):
#      N_ij  = P_ij * (|dO_i|.|v_j| + |dO_i|.|O_i| + |grad_lse_i|
#                      + |dP_ij - D_i| * (scale |q_i|.|k_j| + |bias_ij| + |lse_i|))
#              (the cancelling terms, and P's relative error from its exponent's terms),
#    linear within a query row (its lse and D errors are shared by its keys), rss across rows:
#      dQ_i  <- scale * sum_j N_ij |k_j|,               dK_j <- scale * rss_i(N_ij |q_i|),
#      scale <- rss_i(sum_j N_ij |q_i . k_j|),          table[r, h] <- rss_i(sum_{j at row r} N_ij),
#      span  <- rss_i(sum_j N_ij |d log m_ij / d span|), dV (P dO: no cancellation) <- 0.
# 2. Element-type operands (float16/bfloat16 calls that run in that dtype). Flash kernels
#    feed P and dS to their tensor-core products in the element type (the CUDA kernels do;
#    FlashAttention does), and the CUDA kernels sum the table gradient from that dS too: each
#    term of those sums may be off by a unit roundoff u of the dtype, independently:
#      out_i <- u * rss_j(P_ij v_j) (before the division by l),  dV_j <- u * rss_i(P_ij dO_i),
#      dK_j  <- u * scale * rss_i(dS_ij q_i),  dQ_i <- u * scale * rss_j(dS_ij k_j),
#      table[r, h] <- u * rss(dS_ij over the pairs at row r).
#    The low-precision budget (the dense math run in the dtype) would cover these if it
#    rounded the same operands; PyTorch's CPU math upcasts them, so on tiny problems, where
#    nothing averages out, it does not.
FLOOR_ULPS = 4.0
FP32_UNIT = 2.0 ** -24
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def error_floors(case: "Case", inp: dict, grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
                 exact: dict) -> dict:
    """{"out": tensor, "grad_q": tensor, ...}: per-element allowances (see above), computed
    with float64 dense math from the inputs and the exact results (out, lse)."""
    f64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    q, k, v = f64(inp["q"]), f64(inp["k"]), f64(inp["v"])
    B, Hq, Sq, Dqk = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = inp.get("scale")
    learnable_scale = isinstance(scale, torch.Tensor) and scale.requires_grad
    scale = abs(Dqk ** -0.5 if scale is None else float(scale.detach() if isinstance(scale, torch.Tensor) else scale))
    opt = lambda n: f64(inp[n]) if isinstance(inp.get(n), torch.Tensor) else None  # noqa: E731
    visible, bias = dense_visibility_and_bias(
        B, Hq, Sq, Sk, causal=case.causal, window=case.window, rel_bias=opt("rel_bias"),
        alibi_slopes=opt("alibi_slopes"), span=opt("span"), span_ramp=case.span_ramp,
        num_global=case.num_global, key_lengths=inp.get("key_lengths"), q_offset=inp.get("q_offset"),
        k_offset=inp.get("k_offset"), attn_mask=opt("attn_mask") if inp.get("attn_mask") is not None
        and inp["attn_mask"].is_floating_point() else inp.get("attn_mask"))
    lse = f64(exact["lse"]).unsqueeze(-1)
    finite_lse = lse.nan_to_num(0, 0, 0)
    finite_bias = torch.where(visible, bias, torch.zeros((), dtype=torch.float64))
    p = torch.where(visible & torch.isfinite(lse),
                    torch.exp(scale * (q @ kr.transpose(-1, -2)) + finite_bias - finite_lse),
                    torch.zeros((), dtype=torch.float64))
    d_out, out = f64(grad_out), f64(exact["out"])
    glse = torch.zeros(B, Hq, Sq, dtype=torch.float64) if grad_lse is None else f64(grad_lse)
    dp = d_out @ vr.transpose(-1, -2)
    delta = (d_out * out).sum(-1) - glse
    ds = p * (dp - delta.unsqueeze(-1))
    rss = lambda t, dims: t.square().sum(dims).sqrt()  # noqa: E731
    per_kv_head = lambda t: t.unflatten(1, (Hkv, group)).sum(2)  # noqa: E731  (sum over a group)

    # 1. cancellation
    terms = (d_out.abs() @ vr.abs().transpose(-1, -2) + (d_out.abs() * out.abs()).sum(-1, keepdim=True)
             + glse.abs().unsqueeze(-1))
    exponent = scale * (q.abs() @ kr.abs().transpose(-1, -2)) + finite_bias.abs() + finite_lse.abs()
    noise = (p * terms + ds.abs() * exponent) * (FLOOR_ULPS * FP32_UNIT)
    floors = {
        "out": torch.zeros(()),
        "grad_q": scale * (noise @ kr.abs()),
        "grad_k": scale * per_kv_head((noise.square().transpose(-1, -2) @ q.square())).sqrt(),
        "grad_v": torch.zeros(()),
        "grad_scale": rss((noise * (q @ kr.transpose(-1, -2)).abs()).sum(-1), (0, 1, 2)),
    }
    table_rows = None
    if isinstance(inp.get("rel_bias"), torch.Tensor):
        rows = inp["rel_bias"].shape[0]
        max_dist = (rows + 1) // 2
        dist = torch.arange(Sk - Sq, Sk).view(Sq, 1) - torch.arange(Sk).view(1, Sk)
        table_rows = (dist.clamp(1 - max_dist, max_dist - 1) + max_dist - 1).expand(B, Hq, Sq, Sk)
        per_row = torch.zeros(B, Hq, Sq, rows, dtype=torch.float64).scatter_add_(-1, table_rows, noise)
        floors["grad_rel_bias"] = rss(per_row, (0, 2)).t()               # (rows, Hq)
    if isinstance(inp.get("span"), torch.Tensor):
        span = f64(inp["span"])
        s = span.view(1, Hq, 1, 1) if span.dim() == 1 else span.view(B, Hq, 1, 1)
        qpos = torch.arange(Sk - Sq, Sk).view(Sq, 1)
        kpos = torch.arange(Sk).view(1, Sk)
        ratio = (case.span_ramp + s - (qpos - kpos).abs()) / case.span_ramp
        on_ramp = (ratio > 0) & (ratio < 1)
        glob = ((kpos < case.num_global) | (qpos < case.num_global)) & (case.num_global > 0)
        dlogm = torch.where(on_ramp & ~glob, 1.0 / (case.span_ramp * ratio.clamp_min(1e-300)),
                            torch.zeros((), dtype=torch.float64))
        per_row = (noise * dlogm).sum(-1)                                # (B, Hq, Sq)
        floors["grad_span"] = rss(per_row, (0, 2)) if span.dim() == 1 else rss(per_row, (2,))

    # 2. element-type operands
    if case.dtype in UNIT_ROUNDOFF and not learnable_scale:  # (a learnable scale runs in float32)
        unit = FLOOR_ULPS * UNIT_ROUNDOFF[case.dtype]
        floors["out"] = unit * (p.square() @ vr.square()).sqrt()
        floors["grad_v"] = unit * per_kv_head(p.square().transpose(-1, -2) @ d_out.square()).sqrt()
        floors["grad_k"] = floors["grad_k"] + unit * scale * per_kv_head(ds.square().transpose(-1, -2) @ q.square()).sqrt()
        floors["grad_q"] = floors["grad_q"] + unit * scale * (ds.square() @ kr.square()).sqrt()
        if table_rows is not None:
            squares = torch.zeros(B, Hq, Sq, rows, dtype=torch.float64).scatter_add_(-1, table_rows, (unit * ds).square())
            floors["grad_rel_bias"] = floors["grad_rel_bias"] + squares.sum((0, 2)).sqrt().t()
    return floors


# ---------------------------------------------------------------------------------------------
# the full check of one case
# ---------------------------------------------------------------------------------------------
def check_case(case: Case, *, backward: bool = True, lse_grad: bool = False,
               against: Sequence[str] = ("reference", "sdpa"), fn=None) -> dict:
    """Run fastattn.attention (or `fn`, a function with its signature: the CUDA emulator's) on
    `case` and compare out, lse and every gradient with the float64 references. Returns the
    fused results (for extra assertions)."""
    inp = make_inputs(case, requires_grad=backward)
    g = torch.Generator().manual_seed(case.seed + 1000)
    grad_out = torch.randn(case.B, case.Hq, case.Sq, case.Dv, generator=g, dtype=torch.float64).to(case.dtype)
    grad_lse = torch.randn(case.B, case.Hq, case.Sq, generator=g, dtype=torch.float64) if lse_grad else None

    fused = run_attention(fn or fastattn.attention, inp, case, grad_out.to(case.device), grad_lse, backward)
    assert fused["out"].dtype == case.dtype and fused["out"].device.type == torch.device(case.device).type
    assert fused["out"].shape == (case.B, case.Hq, case.Sq, case.Dv)

    exact = {}
    if "reference" in against:
        exact["reference"] = run_attention(reference.attention, clone_inputs(inp, torch.float64), case,
                                           grad_out, grad_lse, backward)
    if "sdpa" in against:
        exact["sdpa"] = run_attention(dense_sdpa_attention, clone_inputs(inp, torch.float64), case,
                                      grad_out, grad_lse, backward)
    lowp = None
    if case.dtype in LOW_PRECISION:
        # The error budget: the same math run *in* the low precision: q, k, v and the
        # materialized bias in the dtype, SDPA in the dtype, nothing upcast (what plain
        # PyTorch gives in that dtype; FlashAttention's criterion). reference.attention upcasts to float32 internally, so
        # its own error is only the final rounding: it cannot serve as the budget.
        lowp = run_attention(dense_sdpa_attention, clone_inputs(inp), case, grad_out, grad_lse, backward)

    floors = error_floors(case, inp, grad_out, grad_lse, next(iter(exact.values()))) if exact else {}
    for ref_name, ex in exact.items():
        tag = f"vs {ref_name}"
        assert_close(f"out {tag}", fused["out"], ex["out"], case.dtype, lowp and lowp["out"], floor=floors.get("out"))
        assert_lse_close(f"lse {tag}", fused["lse"], ex["lse"], case.dtype)
        ex_grads = ex
        # (fastattn.attention runs fp16/bf16 calls with a learnable scale in float32, with no
        # rounded output inside: nothing to adjust there.)
        ran_in_dtype = not (isinstance(inp.get("scale"), torch.Tensor) and inp["scale"].requires_grad)
        if lowp is not None and backward and ran_in_dtype:
            # A flash backward computes D_i = rowsum(dO_i * O_i) from the output it delivered
            # (rounded to the dtype, from P rounded to the dtype): FlashAttention's formulation.
            # Using that O instead of the exact one shifts D_i by delta_i, which is exactly the
            # gradient of an extra loss term -delta_i * lse_i. So the gradients the kernel
            # should match are the exact gradients with grad_lse - delta (the low-precision
            # budget is still measured against the plain exact gradients). Sums of dS along
            # the clamped rows of a bias table are where this shows.
            delta = ((fused["out"].detach().to("cpu", torch.float64) - ex["out"].detach().double())
                     * grad_out.double()).sum(-1)
            adjusted = (grad_lse if grad_lse is not None else torch.zeros_like(delta)) - delta
            ex_grads = run_attention(reference.attention if ref_name == "reference" else dense_sdpa_attention,
                                     clone_inputs(inp, torch.float64), case, grad_out, adjusted, backward)
        for n in GRAD_NAMES:
            key = "grad_" + n
            if key in ex:
                assert key in fused and fused[key] is not None, f"{key}: fused op gave no gradient"
                assert fused[key].dtype == inp[n].dtype, f"{key}: dtype {fused[key].dtype}, expected {inp[n].dtype}"
                # On the float32 path (a learnable scale), the small parameters' gradients are
                # sums of dS over every pair of a head computed in float32: where the exact sum
                # is 0 (e.g. rows that see one key: P = 1, dS = 0), the float32 noise of the
                # pairs' P ~ 1 +- 1e-7 remains, so such sums also get the float32 atol.
                aggregated_fp32 = not ran_in_dtype and n in ("rel_bias", "span", "scale")
                assert_close(f"{key} {tag}", fused[key], ex_grads[key], case.dtype, lowp and lowp[key],
                             lowp_exact=ex[key],
                             extra_atol=TOL[torch.float32]["atol"] if aggregated_fp32 else 0.0,
                             floor=floors.get(key))
    return fused


# ---------------------------------------------------------------------------------------------
# pairwise (all-pairs) covering of option grids
# ---------------------------------------------------------------------------------------------
def pairwise(factors: dict, seed: int = 0, candidates: int = 40) -> list[dict]:
    """A small list of assignments such that every pair of values of every two factors
    appears together at least once (greedy AETG). Deterministic for a given seed."""
    names = list(factors)
    rng = random.Random(seed)
    uncovered = {((a, i), (b, j))
                 for a, b in itertools.combinations(range(len(names)), 2)
                 for i in range(len(factors[names[a]])) for j in range(len(factors[names[b]]))}

    def gain(row, f, i):
        return sum(1 for g2, j in row.items()
                   if (((min(f, g2), i if f < g2 else j), (max(f, g2), j if f < g2 else i)) in uncovered))

    rows = []
    while uncovered:
        best, best_new = None, -1
        for _ in range(candidates):
            (fa, ia), (fb, ib) = rng.choice(sorted(uncovered))
            row = {fa: ia, fb: ib}
            order = [f for f in range(len(names)) if f not in row]
            rng.shuffle(order)
            for f in order:
                n = len(factors[names[f]])
                scores = [(gain(row, f, i), rng.random(), i) for i in range(n)]
                row[f] = max(scores)[2]
            new = sum(1 for a, b in itertools.combinations(sorted(row), 2)
                      if ((a, row[a]), (b, row[b])) in uncovered)
            if new > best_new:
                best, best_new = row, new
        for a, b in itertools.combinations(sorted(best), 2):
            uncovered.discard(((a, best[a]), (b, best[b])))
        rows.append({names[f]: factors[names[f]][i] for f, i in best.items()})
    return rows


def case_id(case: Case) -> str:
    """A short readable test id."""
    parts = [f"B{case.B}H{case.Hq}/{case.Hkv}", f"S{case.Sq}x{case.Sk}", f"D{case.Dqk}" +
             (f"v{case.Dv}" if case.Dv != case.Dqk else ""), str(case.dtype).replace("torch.", "")]
    if case.causal:
        parts.append("causal")
    if case.window != (-1, -1):
        parts.append(f"win{case.window[0]}_{case.window[1]}")
    if case.num_global:
        parts.append(f"G{case.num_global}")
    if case.rel_bias is not None:
        parts.append(f"rel{case.rel_bias}")
    if case.alibi:
        parts.append("alibi")
    if case.span is not None:
        parts.append(f"span{case.span}{'_'.join(f'{s:g}' for s in case.span_values)}R{case.span_ramp:g}")
    if case.key_lengths is not None:
        parts.append("kl" + "_".join(map(str, case.key_lengths)))
    if case.scale != "default":
        parts.append(f"scale{case.scale}")
    if case.softcap:
        parts.append(f"cap{case.softcap:g}")
    if case.dropout:
        parts.append(f"drop{case.dropout:g}")
    if case.attn_mask is not None:
        parts.append(f"mask_{case.attn_mask}")
    if case.q_offset is not None or case.k_offset is not None:
        parts.append(f"pos{case.q_offset}_{case.k_offset}".replace(" ", "").replace(",", "."))
    if case.layout != "contiguous":
        parts.append(case.layout)
    return "-".join(parts)


def for_device(case: Case, device: str, keep_dtype: bool = False) -> Case:
    """Adapt a CPU case to `device` (dtype and head dims the device's kernels support).
    keep_dtype: the case tests that dtype (the caller skips dtypes the device lacks)."""
    if device == "cpu":
        return case
    if keep_dtype:
        dt = case.dtype
    else:
        dt = case.dtype if case.dtype in DEVICE_DTYPES[device] and case.dtype != torch.float32 \
            else DEVICE_CASE_DTYPE[device]
    dqk = max(case.Dqk, DEVICE_HEAD_DIM[device])
    dv = dqk if case.Dv == case.Dqk else DEVICE_HEAD_DIM_V[device]
    return replace(case, device=device, dtype=dt, Dqk=dqk, Dv=dv)
