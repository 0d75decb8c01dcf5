"""Thin wrappers of torch.ops.fastattn.*, with their fake (meta) kernels and autograd.

The op schemas are defined once, in csrc/fastattn.cpp; CPU and CUDA kernels register there.
Here each op gets
  - a fake kernel (shapes/dtypes only), so torch.compile(fullgraph=True) and FakeTensor
    tracing see real custom ops, and
  - an autograd formula whose backward is the op's own `*_backward` kernel (rotary's is
    registered in C++, csrc/common/autograd.cpp; attention's below).
Input validation for users lives in fastattn.functional; these wrappers assume valid input.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.fastattn


def _empty_grad(like: Tensor) -> Tensor:
    # Gradients that were not asked for come back as empty tensors (custom ops cannot
    # return None); autograd wrappers below turn them into None.
    return like.new_empty((0,))


# ---------------------------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("fastattn::rotary")
def _rotary_fake(x, inv_freq, cos, sin, positions, rotation, offset, interleaved, rotary_dim):
    return x.new_empty(x.shape)


@torch.library.register_fake("fastattn::rotary_")
def _rotary_inplace_fake(x, inv_freq, cos, sin, positions, rotation, offset, interleaved, rotary_dim):
    return None


@torch.library.register_fake("fastattn::rotary_backward")
def _rotary_backward_fake(grad_out, x, inv_freq, cos, sin, positions, rotation, offset,
                          interleaved, rotary_dim, output_mask):
    need_x, need_freq, need_table, need_rot = output_mask
    gx = x.new_empty(x.shape) if need_x else _empty_grad(x)
    gf = inv_freq.new_empty(inv_freq.shape) if (need_freq and inv_freq is not None) else _empty_grad(x)
    gc = cos.new_empty(cos.shape) if (need_table and cos is not None) else _empty_grad(x)
    gs = sin.new_empty(sin.shape) if (need_table and sin is not None) else _empty_grad(x)
    gr = rotation.new_empty(rotation.shape) if (need_rot and rotation is not None) else _empty_grad(x)
    return gx, gf, gc, gs, gr


# rotary's autograd formula is registered in C++ (csrc/common/autograd.cpp): the op is cheap
# enough that a Python autograd layer would cost as much per call as the kernel. For the same
# reason the wrapper is the overload itself, not the packet (which resolves it on every call).
rotary = _ops.rotary.default


def rotary_(x: Tensor, inv_freq: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor],
            positions: Optional[Tensor], rotation: Optional[Tensor], offset: int,
            interleaved: bool, rotary_dim: int) -> Tensor:
    _ops.rotary_(x, inv_freq, cos, sin, positions, rotation, offset, interleaved, rotary_dim)
    return x


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("fastattn::attention")
def _attention_fake(q, k, v, scale, scale_tensor, causal, window_left, window_right, rel_bias,
                    alibi_slopes, span, span_ramp, num_global, key_lengths):
    B, Hq, Sq, _ = q.shape
    out = q.new_empty((B, Hq, Sq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("fastattn::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, grad_lse, scale, scale_tensor, causal,
                             window_left, window_right, rel_bias, alibi_slopes, span, span_ramp,
                             num_global, key_lengths, need_rel_bias_grad, need_span_grad):
    gq, gk, gv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    gb = rel_bias.new_empty(rel_bias.shape) if (need_rel_bias_grad and rel_bias is not None) else _empty_grad(q)
    gs = span.new_empty(span.shape) if (need_span_grad and span is not None) else _empty_grad(q)
    return gq, gk, gv, gb, gs


def _attention_setup_context(ctx, inputs, output):
    (q, k, v, scale, scale_tensor, causal, window_left, window_right, rel_bias, alibi_slopes,
     span, span_ramp, num_global, key_lengths) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, scale_tensor, rel_bias, alibi_slopes, span, key_lengths)
    ctx.scale, ctx.causal, ctx.window = scale, causal, (window_left, window_right)
    ctx.span_ramp, ctx.num_global = span_ramp, num_global


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, scale_tensor, rel_bias, alibi_slopes, span, key_lengths = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    gq, gk, gv, gb, gs = _ops.attention_backward(
        grad_out, q, k, v, out, lse, grad_lse, ctx.scale, scale_tensor, ctx.causal,
        ctx.window[0], ctx.window[1], rel_bias, alibi_slopes, span, ctx.span_ramp,
        ctx.num_global, key_lengths, bool(need[8]), bool(need[10]))
    g_scale = None
    if need[4]:
        # logits = s * q.k + ...  =>  dL/ds = sum_ij dS_ij q_i.k_j = sum(q * dq) / s (undefined
        # at s == 0, where it comes out inf/nan). functional.attention runs fp16/bf16 inputs in
        # fp32 when s is learnable: this sum cancels heavily and needs fp32 dq and out.
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        g_scale = ((q.to(acc) * gq.to(acc)).sum() / scale_tensor.to(acc)).to(scale_tensor.dtype)
    return (gq, gk, gv, None, g_scale, None, None, None, gb if need[8] else None, None,
            gs if need[10] else None, None, None, None)


torch.library.register_autograd("fastattn::attention", _attention_backward,
                                setup_context=_attention_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, scale_tensor: Optional[Tensor],
              causal: bool, window_left: int, window_right: int, rel_bias: Optional[Tensor],
              alibi_slopes: Optional[Tensor], span: Optional[Tensor], span_ramp: float,
              num_global: int, key_lengths: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _ops.attention(q, k, v, scale, scale_tensor, causal, window_left, window_right,
                          rel_bias, alibi_slopes, span, span_ramp, num_global, key_lengths)


def build_info() -> dict:
    """What the loaded library was compiled with (cuda, cuda_archs, cpu_isa, compiler)."""
    return dict(kv.split("=", 1) for kv in _ops.build_info().split(";"))
