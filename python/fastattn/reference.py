"""Pure-PyTorch references of every fastattn op: the math, spelled out.

Each function has the same signature as its fused twin in fastattn.functional and is
differentiable by autograd. Math runs in float32 (float64 for float64 inputs) and the result
is cast back to the input's dtype. These materialize the full (Sq, Sk) score matrix: they
are for checking and reading, not for speed.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["attention", "rotary", "attention_mask_and_bias", "rotary_angles"]


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------------------------
def rotary_angles(
    seqlen: int,
    batch: int,
    *,
    inv_freq: Optional[Tensor] = None,
    cos: Optional[Tensor] = None,
    sin: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
    offset: int = 0,
    device=None,
    dtype=torch.float32,
) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, each (B or 1, S, rotary_dim / 2)."""
    if positions is None:
        positions = torch.arange(offset, offset + seqlen, device=device)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)  # (1, S)
    positions = positions.long()
    if inv_freq is not None:
        angle = positions.to(dtype).unsqueeze(-1) * inv_freq.to(dtype)  # (B, S, R/2)
        return angle.cos(), angle.sin()
    return cos.to(dtype)[positions], sin.to(dtype)[positions]


def rotary(
    x: Tensor,
    *,
    inv_freq: Optional[Tensor] = None,
    cos: Optional[Tensor] = None,
    sin: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
    offset: int = 0,
    interleaved: bool = False,
    rotary_dim: Optional[int] = None,
    rotation: Optional[Tensor] = None,
    inplace: bool = False,
) -> Tensor:
    """Rotary position embedding, y = rope(x @ rotation).

    x: (B, H, S, D). Pair t of the first rotary_dim dims is (2t, 2t+1) when interleaved, else
    (t, t + rotary_dim/2); it is rotated by angle p * inv_freq[t] (or read from cos/sin
    tables (S_max, rotary_dim/2) at row p), p = positions[(b,) s] or offset + s.
    Dims past rotary_dim pass through. Returns (B, H, S, D) in x's dtype.
    """
    B, H, S, D = x.shape
    rd = D if rotary_dim is None else rotary_dim
    md = _math_dtype(x)
    xf = x.to(md)
    if rotation is not None:
        xf = xf @ rotation.to(md)
    c, s = rotary_angles(S, B, inv_freq=inv_freq, cos=cos, sin=sin, positions=positions,
                         offset=offset, device=x.device, dtype=md)
    c, s = c.unsqueeze(1), s.unsqueeze(1)  # (B|1, 1, S, R/2)
    rot, rest = xf[..., :rd], xf[..., rd:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
        rot_out = torch.stack([y1, y2], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
        rot_out = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    out = torch.cat([rot_out, rest], dim=-1).to(x.dtype)
    if inplace:
        with torch.no_grad():
            x.copy_(out)
        return x
    return out


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def attention_mask_and_bias(
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    *,
    device=None,
    dtype=torch.float32,
    causal: bool = False,
    window: Sequence[int] = (-1, -1),
    rel_bias: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    span: Optional[Tensor] = None,
    span_ramp: float = 32.0,
    num_global: int = 0,
    key_lengths: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The visibility mask (bool) and the additive logit bias, each (B, H, Sq, Sk).

    Mirrors csrc/common/attention_params.h::pair_bias. The bias is differentiable w.r.t.
    rel_bias, alibi_slopes and span; it is 0 (not -inf) where the mask is False.
    """
    pos_q = torch.arange(seqlen_q, device=device) + (seqlen_k - seqlen_q)
    pos_k = torch.arange(seqlen_k, device=device)
    d = pos_q[:, None] - pos_k[None, :]  # (Sq, Sk)
    visible = torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if key_lengths is not None:
        visible = visible & (pos_k[None, None, None, :] < key_lengths.to(device).long()[:, None, None, None])
    if causal:
        visible = visible & (d >= 0)
    # (Sq, Sk). With G = 0 nothing is global, also queries at negative positions (Sq > Sk).
    is_global = ((pos_k[None, :] < num_global) | (pos_q[:, None] < num_global)) & (num_global > 0)
    local_ok = torch.ones_like(d, dtype=torch.bool)
    left, right = window
    if left >= 0:
        local_ok = local_ok & (d <= left)
    if right >= 0:
        local_ok = local_ok & (d >= -right)
    bias = torch.zeros(batch, heads, seqlen_q, seqlen_k, dtype=dtype, device=device)
    if span is not None:
        sp = span.to(dtype)
        sp = sp.expand(batch, heads) if sp.dim() == 1 else sp
        m_raw = (span_ramp + sp[:, :, None, None] - d.abs().to(dtype)) / span_ramp
        # clamp to [0, 1], with no gradient at m == 1 exactly (as the kernels: the ramp starts
        # strictly past |d| = span); m <= 0 is masked, so its gradient never matters.
        m = torch.where(m_raw < 1, m_raw, torch.ones_like(m_raw)).clamp_min(0.0)
        span_ok = m > 0
        local_ok = local_ok & span_ok
        log_m = torch.log(torch.where(span_ok, m, torch.ones_like(m)))
        bias = bias + torch.where(is_global, torch.zeros_like(log_m), log_m)
    visible = visible & (is_global | local_ok)
    if rel_bias is not None:
        max_dist = (rel_bias.shape[0] + 1) // 2
        idx = d.clamp(1 - max_dist, max_dist - 1) + max_dist - 1
        bias = bias + rel_bias.to(dtype)[idx].permute(2, 0, 1).unsqueeze(0)
    if alibi_slopes is not None:
        bias = bias - alibi_slopes.to(dtype)[None, :, None, None] * d.abs().to(dtype)
    return visible, bias


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Union[float, Tensor, None] = None,
    causal: bool = False,
    window: Sequence[int] = (-1, -1),
    rel_bias: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    span: Optional[Tensor] = None,
    span_ramp: float = 32.0,
    num_global: int = 0,
    key_lengths: Optional[Tensor] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """Attention with fastattn's masks and biases, materialized.

    q (B, Hq, Sq, Dqk), k (B, Hkv, Sk, Dqk), v (B, Hkv, Sk, Dv), Hq % Hkv == 0.
    Returns out (B, Hq, Sq, Dv) in q's dtype, and lse (B, Hq, Sq) float32 when return_lse.
    A row with no visible key gives zeros and lse = -inf.
    """
    B, Hq, Sq, Dqk = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    md = _math_dtype(q)
    if scale is None:
        scale = Dqk ** -0.5
    group = Hq // Hkv
    qf = q.to(md)
    kf = k.to(md).repeat_interleave(group, dim=1)
    vf = v.to(md).repeat_interleave(group, dim=1)
    scale_t = scale.to(md) if isinstance(scale, Tensor) else scale
    logits = scale_t * (qf @ kf.transpose(-1, -2))
    if softcap > 0:  # capped before any bias or mask
        logits = softcap * torch.tanh(logits / softcap)
    visible, bias = attention_mask_and_bias(
        B, Hq, Sq, Sk, device=q.device, dtype=md, causal=causal, window=window,
        rel_bias=rel_bias, alibi_slopes=alibi_slopes, span=span, span_ramp=span_ramp,
        num_global=num_global, key_lengths=key_lengths)
    logits = torch.where(visible, logits + bias, torch.full_like(logits, -math.inf))
    lse = torch.logsumexp(logits, dim=-1)  # -inf for empty rows
    empty = torch.isneginf(lse)
    safe_lse = torch.where(empty, torch.zeros_like(lse), lse)
    probs = torch.exp(logits - safe_lse.unsqueeze(-1))  # exp(-inf) = 0 on masked keys
    out = (probs @ vf).to(q.dtype)
    if return_lse:
        return out, lse.to(torch.float32)
    return out
