"""Attention dropout in the fused kernels (CPU here; the CUDA kernels through the emulator in
tests/test_cuda_emulation.py): the kernel's mask is bitwise reference.py's independent Philox
mask, outputs and gradients match the reference for the sampled mask with every option, the
mask is reproducible and independent of the thread count, its statistics are right, and the
op's checks, fake kernel, opcheck and torch.compile hold with dropout."""
from __future__ import annotations

import math

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.functional import dropout_seed
from conftest import attention_op_args, attention_backward_op_args

F32, F64 = torch.float32, torch.float64


def _qkv(B=2, Hq=4, Hkv=2, Sq=33, Sk=47, D=8, dtype=F64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, s, D, generator=g, dtype=dtype).requires_grad_(requires_grad)
                 for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))


def _seed(value: int, p: float, q: torch.Tensor) -> torch.Tensor:
    """The [seed, offset] fastattn.attention draws from a generator seeded with `value`."""
    return dropout_seed(p, torch.Generator().manual_seed(value), q)


def _kernel_mask(B, Hq, Sq, Sk, p, seed, **options) -> torch.Tensor:
    """The kernel's keep mask, read back through the output: zero scores (uniform weights 1/Sk
    on every key) and v = identity give out[b, h, i, j] = keep / ((1 - p) Sk)."""
    q = torch.zeros(B, Hq, Sq, 4, dtype=F64)
    k = torch.zeros(B, Hq, Sk, 4, dtype=F64)
    v = torch.eye(Sk, dtype=F64).expand(B, Hq, Sk, Sk).contiguous()
    out, _ = torch.ops.fastattn.attention(*attention_op_args(q, k, v, dropout_p=p, dropout_seed=seed, **options))
    scaled = out * (1 - p) * Sk
    assert torch.all((scaled - scaled.round()).abs() < 1e-9)
    return scaled.round().bool()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(2, 3, 37, 45), (1, 2, 5, 130), (1, 1, 70, 9)])
def test_kernel_mask_is_the_reference_mask_bit_for_bit(p, shape):
    B, H, Sq, Sk = shape
    seed = torch.tensor([-2 ** 63 + 12345, 2 ** 40 + 7], dtype=torch.int64)  # the ends of int64 too
    got = _kernel_mask(B, H, Sq, Sk, p, seed)
    want = reference.dropout_keep_mask(int(seed[0]), int(seed[1]), B, H, Sq, Sk, p, "cpu")
    assert torch.equal(got, want)


def test_kept_fraction_and_independence_of_the_kernel_mask():
    """Over 1.2M weights: the kept fraction within 5 binomial standard deviations of 1 - p;
    neighbouring keys, queries, heads and batches uncorrelated (|r| < 5 / sqrt(n))."""
    p = 0.1
    mask = _kernel_mask(2, 4, 384, 384, p, torch.tensor([7, 0])).double()
    n = mask.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(mask.mean().item() - (1 - p)) < 5 * sigma, (mask.mean().item(), sigma)

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return ((a * b).sum() / (a.norm() * b.norm())).item(), a.numel()

    for name, (a, b) in {"key": (mask[..., :-1], mask[..., 1:]), "query": (mask[:, :, :-1], mask[:, :, 1:]),
                         "head": (mask[:, :-1], mask[:, 1:]), "batch": (mask[:-1], mask[1:])}.items():
        r, m = corr(a, b)
        assert abs(r) < 5 / math.sqrt(m), (name, r)


OPTION_SETS = {
    "plain": dict(),
    "causal-table": dict(causal=True, rel_bias=True),
    "window-alibi": dict(window=(5, 2), alibi=True),
    "span-global": dict(span=True, num_global=3),
    "lengths-softcap-scale": dict(key_lengths=True, softcap=2.0, scale=True),
}


def _options(name, Hq, B, dtype):
    o = dict(OPTION_SETS[name])
    g = torch.Generator().manual_seed(11)
    if o.pop("rel_bias", False):
        o["rel_bias"] = torch.randn(9, Hq, generator=g, dtype=dtype).requires_grad_()
    if o.pop("alibi", False):
        o["alibi_slopes"] = torch.rand(Hq, generator=g, dtype=dtype)
    if o.pop("span", False):
        o["span"] = (torch.rand(Hq, generator=g, dtype=dtype) * 20 + 4).requires_grad_()
        o["span_ramp"] = 6.0
    if o.pop("key_lengths", False):
        o["key_lengths"] = torch.tensor([40, 0][:B])
    if o.pop("scale", False):
        o["scale"] = torch.tensor(0.4, dtype=dtype, requires_grad=True)
    return o


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("dtype", [F64, F32])
def test_outputs_and_gradients_match_the_reference_for_the_sampled_mask(name, dtype):
    p = 0.3
    q, k, v = _qkv(dtype=dtype, requires_grad=True)
    o = _options(name, 4, 2, dtype)
    out, lse = fastattn.attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(5),
                                  return_lse=True, **o)
    want, want_lse = reference.attention(q, k, v, dropout_p=p, dropout_seed=_seed(5, p, q),
                                         return_lse=True, **o)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == F64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, want, **tol)
    torch.testing.assert_close(lse, want_lse.float(), atol=1e-5, rtol=1e-5)  # lse of the undropped weights
    leaves = [t for t in (q, k, v, *o.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    g = torch.randn_like(out)
    for got, exp in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(got, exp, **(tol if dtype == F64 else dict(atol=1e-4, rtol=1e-4)))


def test_gradcheck_with_dropout():
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Sq=9, Sk=13, D=4, requires_grad=True)
    table = torch.randn(5, 2, dtype=F64, requires_grad=True)
    span = torch.tensor([5.3, 9.7], dtype=F64, requires_grad=True)
    scale = torch.tensor(0.6, dtype=F64, requires_grad=True)
    seed = torch.tensor([99, 3])

    def f(q, k, v, table, span, scale):
        return torch.ops.fastattn.attention(*attention_op_args(
            q, k, v, scale_tensor=scale, causal=True, rel_bias=table, span=span, span_ramp=4.0,
            softcap=3.0, dropout_p=0.4, dropout_seed=seed))[0]

    assert torch.autograd.gradcheck(f, (q, k, v, table, span, scale))


def test_same_seed_same_result_and_other_seeds_differ():
    q, k, v = _qkv(dtype=F32, requires_grad=True)

    def run(seed):
        torch.manual_seed(seed)  # the default generator: torch.manual_seed makes a call reproducible
        out = fastattn.attention(q, k, v, causal=True, dropout_p=0.2)
        return (out, *torch.autograd.grad(out.sum(), (q, k, v)))

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # consecutive calls draw new seeds
    torch.manual_seed(1)
    first = fastattn.attention(q, k, v, dropout_p=0.2)
    second = fastattn.attention(q, k, v, dropout_p=0.2)
    assert not torch.equal(first, second)


def test_results_are_bitwise_the_same_on_1_2_and_3_threads():
    q, k, v = _qkv(B=1, Hq=4, Hkv=1, Sq=300, Sk=300, D=16, dtype=F32, requires_grad=True)
    table = torch.randn(17, 4, requires_grad=True)
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = fastattn.attention(q, k, v, causal=True, rel_bias=table, dropout_p=0.1,
                                     generator=torch.Generator().manual_seed(3))
            runs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, table))))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_zero_dropout_draws_nothing_and_equals_no_dropout():
    q, k, v = _qkv(dtype=F32)
    state = torch.get_rng_state()
    out = fastattn.attention(q, k, v, dropout_p=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out, fastattn.attention(q, k, v))


def test_mean_over_seeds_is_the_undropped_output():
    """E[out] = the output without dropout: the mean over 400 seeds within 5 standard errors."""
    q, k, v = _qkv(B=1, Hq=1, Hkv=1, Sq=4, Sk=6, D=3)
    want = fastattn.attention(q, k, v)
    outs = torch.stack([fastattn.attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(s))
                        for s in range(400)])
    stderr = outs.std(0) / math.sqrt(len(outs))
    assert torch.all((outs.mean(0) - want).abs() < 5 * stderr + 1e-12)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_dropout_p_outside_0_1_raises(bad):
    q, k, v = _qkv(dtype=F32)
    with pytest.raises(ValueError, match="dropout_p"):
        fastattn.attention(q, k, v, dropout_p=bad)
    with pytest.raises(ValueError, match="dropout_p"):
        torch.ops.fastattn.attention(*attention_op_args(q, k, v, dropout_p=bad, dropout_seed=torch.tensor([1, 2])))


def test_bad_generator_and_seed_raise():
    q, k, v = _qkv(dtype=F32)
    with pytest.raises(TypeError, match="generator"):
        fastattn.attention(q, k, v, dropout_p=0.1, generator=3)
    with pytest.raises(ValueError, match="generator"):  # a CPU generator for tensors elsewhere
        qm, km, vm = (t.to("meta") for t in (q, k, v))
        fastattn.attention(qm, km, vm, dropout_p=0.1, generator=torch.Generator())
    for seed, err in ((None, ValueError), (torch.tensor([1, 2, 3]), ValueError),
                      (torch.tensor([1.0, 2.0]), TypeError)):
        with pytest.raises(err, match="dropout_seed"):
            torch.ops.fastattn.attention(*attention_op_args(q, k, v, dropout_p=0.1, dropout_seed=seed))


def test_opcheck_with_dropout():
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Sq=5, Sk=7, D=8, dtype=F32, requires_grad=True)
    table = torch.randn(5, 2, requires_grad=True)
    args = attention_op_args(q, k, v, causal=True, rel_bias=table, dropout_p=0.25,
                             dropout_seed=torch.tensor([5, 6]))
    torch.library.opcheck(torch.ops.fastattn.attention.default, args)
    out, lse = torch.ops.fastattn.attention(*args)
    plain = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(torch.ops.fastattn.attention_backward.default,
                          attention_backward_op_args(torch.randn_like(out), out.detach(), lse, None, plain,
                                                     need_span_grad=False))


def test_compile_fullgraph_with_dropout():
    torch._dynamo.reset()
    q, k, v = _qkv(dtype=F32, requires_grad=True)

    def block(q, k, v):
        return fastattn.attention(q * 1.0, k, v, causal=True, dropout_p=0.2).square().sum()

    compiled = torch.compile(block, fullgraph=True)
    torch.manual_seed(4)
    loss = compiled(q, k, v)
    loss.backward()
    assert torch.isfinite(loss) and q.grad is not None and torch.isfinite(q.grad).all()
    # the compiled graph drew its seed from the default generator: a different seed, a different loss
    torch.manual_seed(5)
    assert compiled(q, k, v).item() != loss.item()


# ---- on a GPU: the CUDA kernels draw the CPU kernel's mask --------------------------------------
from conftest import HAS_CUDA  # noqa: E402


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fastattn")
@pytest.mark.parametrize("dtype", [F32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed_device", ["cpu", "cuda"])
def test_cuda_mask_is_the_cpu_mask(dtype, seed_device):
    """The seed on the CPU (read on the host) or on the GPU (read by the kernel)."""
    B, H, Sq, Sk = 2, 4, 70, 200
    q = torch.zeros(B, H, Sq, 16, dtype=dtype)
    k = torch.zeros(B, H, Sk, 16, dtype=dtype)
    v = torch.eye(Sk, dtype=dtype)[:, :128].expand(B, H, Sk, 128).contiguous()
    seed = torch.tensor([2 ** 61 + 3, 5])
    want, _ = torch.ops.fastattn.attention(*attention_op_args(q, k, v, dropout_p=0.3, dropout_seed=seed))
    got, _ = torch.ops.fastattn.attention(*attention_op_args(q.cuda(), k.cuda(), v.cuda(), dropout_p=0.3,
                                                             dropout_seed=seed.to(seed_device)))
    assert torch.equal(got.cpu() != 0, want != 0)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fastattn")
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_cuda_dropout_matches_the_cpu_kernel(name):
    q, k, v = _qkv(dtype=F32)
    o = _options(name, 4, 2, F32)
    results = []
    for dev in ("cpu", "cuda"):
        leaves = [t.detach().to(dev).requires_grad_() for t in (q, k, v)]
        opts = {n: (t.detach().to(dev).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t)
                for n, t in o.items()}
        seed = torch.tensor([42, 1], device=dev)
        out = torch.ops.fastattn.attention(*attention_op_args(
            *leaves, **{n: opts[n] for n in opts if n not in ("window", "scale")},
            **({"window_left": o["window"][0], "window_right": o["window"][1]} if "window" in o else {}),
            **({"scale_tensor": opts["scale"]} if "scale" in opts else {}),
            dropout_p=0.3, dropout_seed=seed))[0]
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results.append([t.cpu() for t in (out, *grads)])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=2e-4)


def test_a_chunk_with_offsets_draws_the_chunk_of_the_whole_mask():
    """The draws go by position: queries 20..29 and keys 13..44 of a sequence, called with their
    offsets, drop exactly the weights the whole call drops there (chunked prefill, a shard of
    context parallelism, a packed sequence)."""
    seed = torch.tensor([12345, 6])
    whole = _kernel_mask(2, 3, 50, 45, 0.4, seed, q_offset=torch.tensor([-5, -5]))
    part = _kernel_mask(2, 3, 10, 32, 0.4, seed, q_offset=torch.tensor([15, 15]), k_offset=torch.tensor([13, 13]))
    assert torch.equal(part, whole[:, :, 20:30, 13:45])
    want = reference.dropout_keep_mask(12345, 6, 2, 3, 10, 32, 0.4, "cpu", q_offset=15, k_offset=13)
    assert torch.equal(part, want)
