"""Pure-PyTorch references of every fastattn op: the math, spelled out.

Each function has the same signature as its fused twin in fastattn.functional and is
differentiable by autograd (attention's dropout takes an explicit (seed, offset) instead of a
generator). Math runs in float32 (float64 for float64 inputs) and the result is cast back to
the input's dtype. These materialize the full (Sq, Sk) score matrix: they are for checking and
reading, not for speed.

Attention dropout draws its keep mask from a counter-based generator (Philox-4x32-10), written
here independently in plain PyTorch: the CPU and CUDA kernels draw the same mask bit for bit
(dropout_keep_mask has the layout).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["attention", "attention_varlen", "attention_weights", "attention_logits", "rotary",
           "attention_mask_and_bias", "rotary_angles", "philox4x32_10", "dropout_keep_mask", "dropout_threshold",
           "head_indices"]


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
    q_offset=None,
    k_offset=None,
) -> tuple[Tensor, Tensor]:
    """The visibility mask (bool) and the additive logit bias, each (B, H, Sq, Sk).

    Mirrors csrc/common/attention_params.h::pair_bias. Query i of batch b stands at
    q_offset[b] + i (default Sk - Sq), key j at k_offset[b] + j (default 0); each an int or a
    (B,) tensor. The bias is differentiable w.r.t. rel_bias, alibi_slopes and span; it is 0
    (not -inf) where the mask is False.
    """
    def positions(offset, default, length):  # (B or 1, 1, length, 1)
        offset = default if offset is None else offset
        offset = torch.as_tensor(offset, device=device, dtype=torch.int64).reshape(-1, 1)
        return (offset + torch.arange(length, device=device)).view(offset.shape[0], 1, length, 1)

    pos_q = positions(q_offset, seqlen_k - seqlen_q, seqlen_q)                 # (B|1, 1, Sq, 1)
    pos_k = positions(k_offset, 0, seqlen_k).transpose(-1, -2)                # (B|1, 1, 1, Sk)
    d = pos_q - pos_k                                                         # (B|1, 1, Sq, Sk)
    visible = torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if key_lengths is not None:  # by key index, not position
        j = torch.arange(seqlen_k, device=device)
        visible = visible & (j[None, None, None, :] < key_lengths.to(device).long()[:, None, None, None])
    if causal:
        visible = visible & (d >= 0)
    # By absolute position. With G = 0 nothing is global, also queries at negative positions.
    is_global = ((pos_k < num_global) | (pos_q < num_global)) & (num_global > 0)
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
        idx = d.clamp(1 - max_dist, max_dist - 1) + max_dist - 1             # (B|1, 1, Sq, Sk)
        bias = bias + rel_bias.to(dtype)[idx[:, 0]].permute(0, 3, 1, 2)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        bias = bias - slopes * d.abs().to(dtype)
    return visible, bias


def head_indices(heads, num_heads: int, device=None) -> Optional[Tensor]:
    """``heads`` (None, a list / tuple of ints, or a 1-d integer tensor of query-head indices in
    [0, num_heads)) as an int64 tensor on ``device``; None stays None (every head).

    Raises TypeError / ValueError naming ``heads``."""
    if heads is None:
        return None
    if isinstance(heads, Tensor):
        if heads.dtype.is_floating_point or heads.dtype.is_complex or heads.dtype == torch.bool:
            raise TypeError(f"fastattn: heads must hold integers, got a tensor of {heads.dtype}")
        if heads.dim() != 1:
            raise ValueError(f"fastattn: heads must be a 1-d tensor of query-head indices, got shape "
                             f"{tuple(heads.shape)}")
        # (a range check reads the values: skipped while torch.compile traces, and for meta)
        if heads.numel() > 0 and heads.device.type != "meta" and not torch.compiler.is_compiling():
            lo, hi = int(heads.min()), int(heads.max())
            if lo < 0 or hi >= num_heads:
                raise ValueError(f"fastattn: heads must lie in [0, {num_heads}) (the query heads), "
                                 f"got values in [{lo}, {hi}]")
        return heads.to(device=device, dtype=torch.int64)
    if not isinstance(heads, (list, tuple)):
        raise TypeError(f"fastattn: heads must be None, a list or tuple of ints or a 1-d integer "
                        f"tensor, got {type(heads).__name__}")
    idx = []
    for h in heads:
        if isinstance(h, bool):
            raise TypeError(f"fastattn: heads must hold ints, got {h!r}")
        try:
            h = operator.index(h)
        except TypeError:
            raise TypeError(f"fastattn: heads must hold ints, got {type(h).__name__} ({h!r})") from None
        if not 0 <= h < num_heads:
            raise ValueError(f"fastattn: heads must lie in [0, {num_heads}) (the query heads), got {h}")
        idx.append(h)
    return torch.tensor(idx, dtype=torch.int64, device=device)


def _head_scores(q: Tensor, k: Tensor, idx: Optional[Tensor], scale, softcap, rel_bias, alibi_slopes,
                 span, attn_mask) -> tuple:
    """The scaled (soft-capped) scores (B, n, Sq, Sk) of the query heads ``idx`` (None: all) in
    the math dtype, with the per-head parameters of those heads: (scores, rel_bias,
    alibi_slopes, span, attn_mask)."""
    Hq, Dqk = q.shape[1], q.shape[3]
    group = Hq // k.shape[1]
    md = _math_dtype(q)
    if scale is None:
        scale = Dqk ** -0.5
    if idx is None:
        qf = q.to(md)
        kf = k.to(md).repeat_interleave(group, dim=1)
    else:  # only the selected heads (and each one's kv head), with their per-head parameters
        qf = q.index_select(1, idx).to(md)
        kf = k.index_select(1, torch.div(idx, group, rounding_mode="floor")).to(md)
        rel_bias = None if rel_bias is None else rel_bias.index_select(1, idx)
        alibi_slopes = None if alibi_slopes is None else alibi_slopes.index_select(alibi_slopes.dim() - 1, idx)
        span = None if span is None else span.index_select(span.dim() - 1, idx)
        if attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.shape[-3] > 1:
            attn_mask = attn_mask.index_select(attn_mask.dim() - 3, idx)
    scale_t = scale.to(md) if isinstance(scale, Tensor) else scale
    scores = scale_t * (qf @ kf.transpose(-1, -2))
    if softcap > 0:  # capped before any bias or mask
        scores = softcap * torch.tanh(scores / softcap)
    return scores, rel_bias, alibi_slopes, span, attn_mask


def _logits(q: Tensor, k: Tensor, idx: Optional[Tensor], scale, causal, window, rel_bias, alibi_slopes,
            span, span_ramp, num_global, key_lengths, softcap, q_offset=None, k_offset=None,
            attn_mask=None) -> Tensor:
    """The masked logits (B, n, Sq, Sk) of the query heads ``idx`` (None: all), in the math
    dtype, -inf where a pair is not visible."""
    logits, rel_bias, alibi_slopes, span, attn_mask = _head_scores(
        q, k, idx, scale, softcap, rel_bias, alibi_slopes, span, attn_mask)
    B, n, Sq, Sk = logits.shape
    md = logits.dtype
    visible, bias = attention_mask_and_bias(
        B, n, Sq, Sk, device=q.device, dtype=md, causal=causal, window=window,
        rel_bias=rel_bias, alibi_slopes=alibi_slopes, span=span, span_ramp=span_ramp,
        num_global=num_global, key_lengths=key_lengths, q_offset=q_offset, k_offset=k_offset)
    if attn_mask is not None:  # SDPA's: True may attend; a float is added (-inf hides the pair)
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            hidden = torch.isneginf(attn_mask)
            visible = visible & ~hidden
            bias = bias + torch.where(hidden, torch.zeros_like(attn_mask), attn_mask).to(bias.dtype)
    # (one select for every rule: a pair hidden by any of them passes no gradient)
    return torch.where(visible, logits + bias, torch.full_like(logits, -math.inf))


def attention_logits(
    q: Tensor,
    k: Tensor,
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
    q_offset=None,
    k_offset=None,
    attn_mask: Optional[Tensor] = None,
    softcap: float = 0.0,
    heads=None,
) -> Tensor:
    """The logits fastattn.attention normalizes, materialized: (B, len(heads) or Hq, Sq, Sk)
    in float32 (float64 for float64 q), -inf where a pair is not visible: the scaled score
    (soft-capped) plus the table, ALiBi and span terms. ``heads`` selects query heads
    (see head_indices)."""
    idx = head_indices(heads, q.shape[1], q.device)
    return _logits(q, k, idx, scale, causal, window, rel_bias, alibi_slopes, span, span_ramp,
                   num_global, key_lengths, softcap, q_offset, k_offset, attn_mask)


def _probs_and_lse(logits: Tensor) -> tuple[Tensor, Tensor]:
    lse = torch.logsumexp(logits, dim=-1)  # -inf for empty rows
    empty = torch.isneginf(lse)
    safe_lse = torch.where(empty, torch.zeros_like(lse), lse)
    return torch.exp(logits - safe_lse.unsqueeze(-1)), lse  # exp(-inf) = 0 on masked keys


def attention_weights(
    q: Tensor,
    k: Tensor,
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
    q_offset=None,
    k_offset=None,
    attn_mask: Optional[Tensor] = None,
    softcap: float = 0.0,
    heads=None,
) -> Tensor:
    """The attention probabilities (B, len(heads) or Hq, Sq, Sk) in q's dtype: the softmax of
    attention_logits over the keys, 0 on masked pairs and on rows with no visible key. No
    dropout."""
    logits = attention_logits(q, k, scale=scale, causal=causal, window=window, rel_bias=rel_bias,
                              alibi_slopes=alibi_slopes, span=span, span_ramp=span_ramp,
                              num_global=num_global, key_lengths=key_lengths, q_offset=q_offset,
                              k_offset=k_offset, attn_mask=attn_mask, softcap=softcap, heads=heads)
    return _probs_and_lse(logits)[0].to(q.dtype)


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
    q_offset=None,
    k_offset=None,
    attn_mask: Optional[Tensor] = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    dropout_seed=None,
    return_lse: bool = False,
):
    """Attention with fastattn's masks and biases, materialized.

    q (B, Hq, Sq, Dqk), k (B, Hkv, Sk, Dqk), v (B, Hkv, Sk, Dv), Hq % Hkv == 0.
    Returns out (B, Hq, Sq, Dv) in q's dtype, and lse (B, Hq, Sq) float32 when return_lse.
    A row with no visible key gives zeros and lse = -inf. Query i of batch b stands at
    q_offset[b] + i (default Sk - Sq), key j at k_offset[b] + j (default 0): ints or (B,)
    tensors.

    dropout_p in [0, 1): the weights are multiplied by dropout_keep_mask(seed, offset, ...)
    (B, Hq, Sq, Sk) and by 1 / (1 - dropout_p) before the product with v; lse stays that of
    the undropped weights. dropout_seed, (seed, offset) as a pair of ints or a 2-element int64
    tensor, is required when dropout_p > 0. Autograd gives the exact gradients for that mask.
    """
    dropout_p = _check_dropout_p(dropout_p)
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    md = _math_dtype(q)
    vf = v.to(md).repeat_interleave(Hq // Hkv, dim=1)
    logits = _logits(q, k, None, scale, causal, window, rel_bias, alibi_slopes, span, span_ramp,
                     num_global, key_lengths, softcap, q_offset, k_offset, attn_mask)
    probs, lse = _probs_and_lse(logits)
    if dropout_p > 0:
        seed, offset = _dropout_seed(dropout_seed)
        keep = dropout_keep_mask(seed, offset, B, Hq, Sq, Sk, dropout_p, q.device, q_offset, k_offset)
        # 1 / (1 - p) is evaluated in float64 and rounded to the math dtype, as the kernels do
        rescale = torch.tensor(1.0 / (1.0 - dropout_p), dtype=md, device=q.device)
        probs = probs * torch.where(keep, rescale, torch.zeros((), dtype=md, device=q.device))
    out = (probs @ vf).to(q.dtype)
    if return_lse:
        return out, lse.to(torch.float32)
    return out


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: Union[float, Tensor, None] = None,
    causal: bool = False,
    window: Sequence[int] = (-1, -1),
    rel_bias: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    span: Optional[Tensor] = None,
    span_ramp: float = 32.0,
    num_global: int = 0,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    dropout_seed=None,
    return_lse: bool = False,
):
    """Attention over packed sequences, materialized: q (total_q, Hq, Dqk), k (total_k, Hkv,
    Dqk), v (total_k, Hkv, Dv); sequence s holds queries cu_seqlens_q[s] .. cu_seqlens_q[s+1]-1
    and keys cu_seqlens_k[s] .. cu_seqlens_k[s+1]-1 and attends within itself, its query i at
    position len_k(s) - len_q(s) + i and its key j at j. Each sequence is attention() on its
    own (1, H, len, D) block, with its row of a (n_seq, Hq) alibi_slopes or span.

    dropout_seed (seed, offset) is the whole call's: sequence s draws
    dropout_keep_mask(seed, offset + s, 1, Hq, len_q(s), len_k(s), dropout_p).
    max_seqlen_q / max_seqlen_k are not used (the fused twin checks them).
    Returns out (total_q, Hq, Dv) in q's dtype, and lse (Hq, total_q) float32 when return_lse.
    """
    bq = [int(x) for x in cu_seqlens_q.tolist()]
    bk = [int(x) for x in cu_seqlens_k.tolist()]
    if dropout_p > 0:
        seed, offset = _dropout_seed(dropout_seed)
    outs, lses = [], []
    for s in range(len(bq) - 1):
        def block(t, b):  # (1, H, len, D)
            return t[b[s]:b[s + 1]].permute(1, 0, 2).unsqueeze(0)

        def row(t):
            return t[s:s + 1] if isinstance(t, Tensor) and t.dim() == 2 else t

        drop = dict(dropout_p=dropout_p, dropout_seed=(seed, offset + s)) if dropout_p > 0 else {}
        o, lse = attention(block(q, bq), block(k, bk), block(v, bk), scale=scale, causal=causal,
                           window=window, rel_bias=rel_bias, alibi_slopes=row(alibi_slopes),
                           span=row(span), span_ramp=span_ramp, num_global=num_global, softcap=softcap,
                           return_lse=True, **drop)
        outs.append(o[0].permute(1, 0, 2))
        lses.append(lse[0])
    Hq = q.shape[1]
    out = torch.cat(outs, 0) if outs else q.new_zeros(0, Hq, v.shape[2])
    if return_lse:
        return out, (torch.cat(lses, 1) if lses else torch.zeros(Hq, 0, device=q.device))
    return out


# ---------------------------------------------------------------------------------------------
# dropout: Philox-4x32-10 and the keep mask
# ---------------------------------------------------------------------------------------------
# Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
# SC 2011; Random123 and cuRAND use the same constants): round multipliers and key increments.
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF
_INT64_MIN, _INT64_MAX = -2 ** 63, 2 ** 63 - 1


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo): the high and low 32 bits of the 64-bit product of the uint32 constant ``a`` and
    the uint32 values of ``b`` (int64). The product itself does not fit in int64, so ``b`` is
    split into 16-bit halves: each partial product stays below 2^48."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    t = p_lo + ((p_hi & 0xFFFF) << 16)  # = a * b - (p_hi >> 16) * 2^32, < 2^49
    return (p_hi >> 16) + (t >> 32), t & _U32


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1).

    Each argument is an int64 tensor (or a Python int) of uint32 values, taken mod 2^32;
    they broadcast together. Returns the four output words, int64 tensors of uint32 values.
    A round: (hi0, lo0) = mulhilo32(M0, c0), (hi1, lo1) = mulhilo32(M1, c2), the counter
    becomes (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the key is bumped by (W0, W1) mod 2^32
    before each of rounds 2..10.
    """
    def word(x):
        x = x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.int64)
        if x.dtype != torch.int64:
            raise TypeError(f"fastattn: philox4x32_10 takes int64 tensors of uint32 values, got {x.dtype}")
        return x & _U32

    c0, c1, c2, c3, k0, k1 = (word(x) for x in (c0, c1, c2, c3, k0, k1))
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    shape = torch.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape)
    return tuple(c.expand(shape) for c in (c0, c1, c2, c3))


def dropout_threshold(dropout_p: float) -> int:
    """The keep threshold of a 16-bit draw u (keep iff u < threshold): round((1 - p) * 65536),
    Python's round of the float64 product (half to even, as C's nearbyint), clamped to
    [0, 65536]."""
    p = _check_dropout_p(dropout_p)
    return min(max(round((1.0 - p) * 65536.0), 0), 65536)


def dropout_keep_mask(seed, offset, B: int, H: int, Sq: int, Sk: int, dropout_p: float,
                      device=None, q_offset=None, k_offset=None) -> Tensor:
    """The dropout keep mask, bool (B, H, Sq, Sk), that fastattn's kernels draw.

    seed and offset: int64 values (Python ints or 0-dim / 1-element int64 tensors, e.g. the two
    entries of a [seed, offset] tensor), taken as uint64 (two's complement). H is the number of
    query heads. Element (b, h, i, j) stands at the positions P = q_offset[b] + i (default
    Sk - Sq) and K = k_offset[b] + j (default 0; offsets clamped to +-2^60 as the kernels do).
    The key is (seed mod 2^32, (seed >> 32) mod 2^32); the element reads the Philox-4x32-10
    output of the counter (K >> 3, P, b * H + h, offset) (each word mod 2^32, K >> 3 an
    arithmetic shift): of its word (K >> 1) & 3, the high 16 bits u for odd K, the low 16 bits
    for even K. It is kept iff u < dropout_threshold(dropout_p). One Philox call serves 8
    consecutive key positions; the mask of a chunk of a sequence (offsets) is the chunk of the
    whole sequence's mask.
    """
    threshold = dropout_threshold(dropout_p)
    seed = _seed_word(seed, "seed", device)
    offset = _seed_word(offset, "offset", device)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    limit = 2 ** 60

    def positions(off, default, n):  # (B, n) int64
        off = default if off is None else off
        off = torch.as_tensor(off, dtype=torch.int64, device=device).reshape(-1, 1).clamp(-limit, limit)
        return (off + torch.arange(n, dtype=torch.int64, device=device)).expand(B, n)

    qpos = positions(q_offset, Sk - Sq, Sq).view(B, 1, Sq, 1)
    kpos = positions(k_offset, 0, Sk).view(B, 1, 1, Sk)
    bh = (torch.arange(B, device=device).view(B, 1) * H + torch.arange(H, device=device)).view(B, H, 1, 1)
    words = philox4x32_10((kpos >> 3) & _U32, qpos & _U32, bh, offset & _U32, k0, k1)
    shape = (B, H, Sq, Sk)
    words = torch.stack([w.expand(shape) for w in words], dim=-1)             # (B, H, Sq, Sk, 4)
    word = words.gather(-1, ((kpos >> 1) & 3).expand(shape).unsqueeze(-1)).squeeze(-1)
    u = torch.where((kpos & 1).expand(shape).bool(), word >> 16, word & 0xFFFF)
    return u < threshold


def _check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"fastattn: dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:  # (NaN fails too)
        raise ValueError(f"fastattn: dropout_p must be in [0, 1), got {dropout_p!r}")
    return p


def _seed_word(value, name: str, device):
    """seed or offset as a Python int or a 0-dim int64 tensor on ``device``."""
    if isinstance(value, Tensor):
        if value.dtype != torch.int64 or value.numel() != 1:
            raise TypeError(f"fastattn: {name} must be an int or a one-element int64 tensor, got a "
                            f"{value.dtype} tensor of shape {tuple(value.shape)}")
        return value.reshape(()).to(device)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"fastattn: {name} must be an int or a one-element int64 tensor, got "
                        f"{type(value).__name__}")
    value = int(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"fastattn: {name} must fit in int64 ([-2**63, 2**63 - 1]), got {value}")
    return value


def _dropout_seed(dropout_seed):
    """(seed, offset) from a (seed, offset) pair or a 2-element int64 tensor [seed, offset]."""
    if dropout_seed is None:
        raise ValueError("fastattn: dropout_seed (seed, offset) must be given when dropout_p > 0, got None")
    if isinstance(dropout_seed, Tensor):
        if dropout_seed.dtype != torch.int64:
            raise TypeError(f"fastattn: dropout_seed must be an int64 tensor [seed, offset], got "
                            f"{dropout_seed.dtype}")
        if tuple(dropout_seed.shape) != (2,):
            raise ValueError(f"fastattn: dropout_seed must be a tensor of shape (2,) ([seed, offset]), "
                             f"got shape {tuple(dropout_seed.shape)}")
        return dropout_seed[0], dropout_seed[1]
    if not isinstance(dropout_seed, (tuple, list)) or len(dropout_seed) != 2:
        raise TypeError(f"fastattn: dropout_seed must be a (seed, offset) pair or an int64 tensor of "
                        f"shape (2,), got {dropout_seed!r}")
    return dropout_seed[0], dropout_seed[1]
