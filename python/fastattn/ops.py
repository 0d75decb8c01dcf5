"""Thin wrappers of torch.ops.fastattn.*, with their fake (meta) kernels and autograd.

The op schemas are defined once, in csrc/fastattn.cpp; CPU and CUDA kernels register there.
Here each op gets
  - a fake kernel (shapes/dtypes only), so torch.compile(fullgraph=True) and FakeTensor
    tracing see real custom ops, and
  - an autograd formula whose backward is the op's own `*_backward` kernel, registered in
    C++ (csrc/common/autograd.cpp) for speed; this module only documents it.
Input validation for users lives in fastattn.functional; these wrappers assume valid input.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.fastattn


def _check_devices(ref: Tensor, ref_name: str, named) -> None:
    # The fake kernels are also the Meta kernels: a direct op call that mixes a meta tensor with
    # tensors of another device and skips the Autograd kernel (inference mode, or an op whose
    # Autograd kernel does not check) lands here, and would return uninitialized memory on the
    # other device. Refuse it as the device kernels' checks would (check_same_device).
    for t, name in named:
        if t is not None and t.device != ref.device:
            raise ValueError(f"fastattn: {name} must be on the same device as {ref_name} "
                             f"({ref.device}), got {t.device}")


def _check_required(**named) -> None:
    # The dispatcher hands a fake kernel None for a required Tensor argument given as None;
    # answer as the device kernels do, not with an AttributeError further down.
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"fastattn: {name} must be a Tensor, got {type(t).__name__}")


def _empty_grad(like: Tensor) -> Tensor:
    # Gradients that were not asked for come back as empty tensors (custom ops cannot
    # return None); autograd wrappers below turn them into None.
    return like.new_empty((0,))


# ---------------------------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------------------------
def _check_rotary_devices(x, inv_freq, cos, sin, positions, rotation):
    _check_required(x=x)
    _check_devices(x, "x", ((inv_freq, "inv_freq"), (cos, "cos"), (sin, "sin"),
                            (positions, "positions"), (rotation, "rotation")))


@torch.library.register_fake("fastattn::rotary")
def _rotary_fake(x, inv_freq, cos, sin, positions, rotation, offset, interleaved, rotary_dim):
    _check_rotary_devices(x, inv_freq, cos, sin, positions, rotation)
    return x.new_empty(x.shape)


@torch.library.register_fake("fastattn::rotary_")
def _rotary_inplace_fake(x, inv_freq, cos, sin, positions, rotation, offset, interleaved, rotary_dim):
    _check_rotary_devices(x, inv_freq, cos, sin, positions, rotation)
    return None


@torch.library.register_fake("fastattn::rotary_backward")
def _rotary_backward_fake(grad_out, x, inv_freq, cos, sin, positions, rotation, offset,
                          interleaved, rotary_dim, output_mask):
    _check_required(grad_out=grad_out)
    _check_rotary_devices(x, inv_freq, cos, sin, positions, rotation)
    _check_devices(x, "x", ((grad_out, "grad_out"),))
    need_x, need_freq, need_table, need_rot = output_mask
    gx = x.new_empty(x.shape) if need_x else _empty_grad(x)
    gf = inv_freq.new_empty(inv_freq.shape) if (need_freq and inv_freq is not None) else _empty_grad(x)
    gc = cos.new_empty(cos.shape) if (need_table and cos is not None) else _empty_grad(x)
    gs = sin.new_empty(sin.shape) if (need_table and sin is not None) else _empty_grad(x)
    gr = rotation.new_empty(rotation.shape) if (need_rot and rotation is not None) else _empty_grad(x)
    return gx, gf, gc, gs, gr


# rotary's autograd formula is registered in C++ (csrc/common/autograd.cpp): the op is cheap
# enough that a Python autograd layer would cost as much per call as the kernel. For the same
# reason the wrappers are the overloads themselves, not the packets (which resolve the
# overload on every call).
rotary = _ops.rotary.default


def rotary_(x: Tensor, inv_freq: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor],
            positions: Optional[Tensor], rotation: Optional[Tensor], offset: int,
            interleaved: bool, rotary_dim: int) -> Tensor:
    _ops.rotary_(x, inv_freq, cos, sin, positions, rotation, offset, interleaved, rotary_dim)
    return x


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
# The attention op's arguments (q, k, v, scale, ..., in schema order: csrc/common/attention_args.h)
# are read by name from the registered schema, so a new option needs no change here unless it
# changes the output shapes.
ATTENTION_ARGS = tuple(a.name for a in _ops.attention.default._schema.arguments)


def _check_attention_devices(named: dict, also=()) -> None:
    # Every tensor argument sits on q's device, except a scale tensor on the CPU (read on the
    # host, as csrc/common/attention_args.cpp's check_scale allows).
    _check_required(**{n: named[n] for n in ("q", "k", "v")})
    q = named["q"]
    _check_devices(q, "q", [(t, "scale (scale_tensor)" if n == "scale_tensor" else n)
                            for n, t in named.items()
                            if isinstance(t, Tensor) and n != "q"
                            and not (n == "scale_tensor" and t.device.type == "cpu")])
    _check_devices(q, "q", also)


@torch.library.register_fake("fastattn::attention")
def _attention_fake(q, k, v, *options):
    _check_attention_devices(dict(zip(ATTENTION_ARGS, (q, k, v) + options)))
    B, Hq, Sq, _ = q.shape
    out = q.new_empty((B, Hq, Sq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("fastattn::attention_backward")
def _attention_backward_fake(grad_out, out, lse, grad_lse, need_rel_bias_grad, need_span_grad,
                             need_attn_mask_grad, *attention_args):
    a = dict(zip(ATTENTION_ARGS, attention_args))
    _check_required(grad_out=grad_out, out=out, lse=lse)
    _check_attention_devices(a, ((grad_out, "grad_out"), (out, "out"), (lse, "lse"), (grad_lse, "grad_lse")))
    q, k, v, rel_bias, span, mask = a["q"], a["k"], a["v"], a["rel_bias"], a["span"], a["attn_mask"]
    gq, gk, gv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    gb = rel_bias.new_empty(rel_bias.shape) if (need_rel_bias_grad and rel_bias is not None) else _empty_grad(q)
    gs = span.new_empty(span.shape) if (need_span_grad and span is not None) else _empty_grad(q)
    want_mask = need_attn_mask_grad and mask is not None and mask.is_floating_point()
    gm = mask.new_empty(mask.shape) if want_mask else _empty_grad(q)
    return gq, gk, gv, gb, gs, gm


# attention's autograd formula is registered in C++ too (csrc/common/autograd.cpp).
attention = _ops.attention.default


# ---------------------------------------------------------------------------------------------
# attention_varlen: (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, <attention args>)
# on packed q (total_q, Hq, Dqk), k (total_k, Hkv, Dqk), v (total_k, Hkv, Dv)
# ---------------------------------------------------------------------------------------------
VARLEN_ARGS = tuple(a.name for a in _ops.attention_varlen.default._schema.arguments)


def _check_varlen_devices(named: dict, also=()) -> None:
    _check_required(cu_seqlens_q=named["cu_seqlens_q"], cu_seqlens_k=named["cu_seqlens_k"])
    _check_attention_devices({n: t for n, t in named.items() if n in ATTENTION_ARGS},
                             also + ((named["cu_seqlens_q"], "cu_seqlens_q"), (named["cu_seqlens_k"], "cu_seqlens_k")))


@torch.library.register_fake("fastattn::attention_varlen")
def _attention_varlen_fake(*args):
    a = dict(zip(VARLEN_ARGS, args))
    _check_varlen_devices(a)
    q, v = a["q"], a["v"]
    total_q, Hq = q.shape[0], q.shape[1]
    return q.new_empty((total_q, Hq, v.shape[-1])), q.new_empty((Hq, total_q), dtype=torch.float32)


@torch.library.register_fake("fastattn::attention_varlen_backward")
def _attention_varlen_backward_fake(grad_out, out, lse, grad_lse, output_mask, *varlen_args):
    a = dict(zip(VARLEN_ARGS, varlen_args))
    _check_required(grad_out=grad_out, out=out, lse=lse)
    _check_varlen_devices(a, ((grad_out, "grad_out"), (out, "out"), (lse, "lse"), (grad_lse, "grad_lse")))
    q, k, v = a["q"], a["k"], a["v"]
    grads = [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]
    for wanted, name in zip(output_mask, ("rel_bias", "alibi_slopes", "span", "scale_tensor")):
        p = a[name]
        grads.append(p.new_empty(p.shape) if (wanted and p is not None) else _empty_grad(q))
    return tuple(grads)


# attention_varlen's autograd formula is registered in C++ (csrc/common/autograd.cpp); its
# backward is the op attention_varlen_backward.
attention_varlen = _ops.attention_varlen.default


def build_info() -> dict:
    """What the loaded library was compiled with (cuda, cuda_archs, cpu_isa, compiler)."""
    return dict(kv.split("=", 1) for kv in _ops.build_info().split(";"))
