"""The public functions: fastattn.attention, fastattn.attention_varlen, fastattn.attention_weights,
fastattn.rotary, and the packing functions fastattn.unpad and fastattn.pad.

They normalize their arguments (Python scalars, defaults, a non-contiguous last dim) and call
the fused ops in fastattn.ops, which validate them (ValueError / TypeError naming the argument,
the expected and the received value; for rotary, the checks below come first). Their pure-PyTorch twins, with the same signatures,
are in fastattn.reference.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops, reference

__all__ = ["attention", "attention_varlen", "attention_weights", "rotary", "unpad", "pad", "check_options"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _fail(msg: str, exc=ValueError):
    raise exc(f"fastattn: {msg}")


def _check_tensor(t, name: str, rank: Optional[int] = None, *, floating: bool = True):
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if rank is not None and t.dim() != rank:
        _fail(f"{name} must have {rank} dimensions, got {t.dim()} (shape {tuple(t.shape)})")
    if floating and t.dtype not in _FLOAT_DTYPES:
        _fail(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}", TypeError)


def _check_device(t: Tensor, name: str, ref: Tensor, ref_name: str):
    if t.device != ref.device:
        _fail(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def _check_table_dtype(t: Tensor, name: str, x: Tensor):
    # Small parameter tensors are read in fp32 by the kernels; storing them in fp32 or in x's
    # dtype are the two layouts models use (anything else is most likely a mistake).
    if t.dtype != x.dtype and t.dtype != torch.float32:
        _fail(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}", TypeError)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    # Kernels take any strides but need a unit stride in the last dim.
    # (The common cases are tested first, cheapest first: these checks run on every call.)
    if t.is_contiguous() or t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------
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
    """Rotary position embedding, fused: y = rope(x @ rotation).

    Args:
        x: (B, H, S, D), any strides with a contiguous last dim (e.g. a (B, S, H, D) tensor's
            .transpose(1, 2)).
        inv_freq: (rotary_dim / 2,) frequencies; angle of pair t at position p is p * inv_freq[t].
            Differentiable (learned frequencies).
        cos, sin: (S_max, rotary_dim / 2) tables, instead of inv_freq. Differentiable.
        positions: (S,) or (B, S) integer positions; default offset + arange(S).
        offset: first position when positions is None (KV-cache decoding).
        interleaved: pairs (2t, 2t+1) (GPT-J) instead of (t, t + rotary_dim/2) (GPT-NeoX);
            the output keeps the input's layout.
        rotary_dim: leading dims that are rotated (even, <= D; default D); the rest pass through.
        rotation: (D, D) learned matrix applied first (x @ rotation). Differentiable.
        inplace: write into x (x must not require grad). Returns x.
    Returns:
        (B, H, S, D) in x's dtype.
    """
    _check_tensor(x, "x", 4)
    B, H, S, D = x.shape
    rd = D if rotary_dim is None else rotary_dim
    if not isinstance(rd, int) or isinstance(rd, bool):
        _fail(f"rotary_dim must be an int, got {type(rotary_dim).__name__}", TypeError)
    if rd <= 0 or rd % 2 != 0 or rd > D:
        _fail(f"rotary_dim must be even and in [2, D={D}], got {rd}")
    half = rd // 2
    offset = _int(offset, "offset", "an int")
    if (inv_freq is None) == (cos is None and sin is None):
        _fail("give either inv_freq or both cos and sin tables (exactly one of the two), got "
              f"inv_freq={'set' if inv_freq is not None else 'None'}, "
              f"cos={'set' if cos is not None else 'None'}, sin={'set' if sin is not None else 'None'}")
    if inv_freq is not None:
        _check_tensor(inv_freq, "inv_freq", 1)
        _check_device(inv_freq, "inv_freq", x, "x")
        if inv_freq.shape[0] != half:
            _fail(f"inv_freq must have rotary_dim / 2 = {half} entries, got {inv_freq.shape[0]}")
        _check_table_dtype(inv_freq, "inv_freq", x)
    else:
        if cos is None or sin is None:
            _fail("cos and sin must be given together")
        for t, name in ((cos, "cos"), (sin, "sin")):
            _check_tensor(t, name, 2)
            _check_device(t, name, x, "x")
            if t.shape[1] != half:
                _fail(f"{name} must be (S_max, rotary_dim / 2 = {half}), got {tuple(t.shape)}")
            _check_table_dtype(t, name, x)
        if cos.shape != sin.shape:
            _fail(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
        cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    if positions is not None:
        _check_tensor(positions, "positions", floating=False)
        _check_device(positions, "positions", x, "x")
        if positions.dtype not in (torch.int64, torch.int32):
            _fail(f"positions must be int64 or int32, got {positions.dtype}", TypeError)
        if positions.dim() == 1:
            if positions.shape[0] != S:
                _fail(f"positions (S,) must have S = {S} entries, got {positions.shape[0]}")
        elif positions.dim() == 2:
            if tuple(positions.shape) != (B, S):
                _fail(f"positions (B, S) must be ({B}, {S}), got {tuple(positions.shape)}")
        else:
            _fail(f"positions must be (S,) or (B, S), got {positions.dim()} dimensions")
        positions = positions.long().contiguous()
        if cos is not None and positions.numel() > 0 and not _is_compiling():
            lo, hi = int(positions.min()), int(positions.max())
            if lo < 0 or hi >= cos.shape[0]:
                _fail(f"positions must lie in [0, {cos.shape[0]}) (the cos/sin table's rows), "
                      f"got values in [{lo}, {hi}]")
    elif cos is not None and S > 0 and (offset < 0 or offset + S > cos.shape[0]):
        _fail(f"positions offset..offset+S-1 = {offset}..{offset + S - 1} lie past the cos/sin "
              f"table's {cos.shape[0]} rows")
    if rotation is not None:
        _check_tensor(rotation, "rotation", 2)
        _check_device(rotation, "rotation", x, "x")
        if tuple(rotation.shape) != (D, D):
            _fail(f"rotation must be (D, D) = ({D}, {D}), got {tuple(rotation.shape)}")
        _check_table_dtype(rotation, "rotation", x)
        rotation = rotation.contiguous()
    if inplace:
        if x.requires_grad and torch.is_grad_enabled():
            _fail("inplace=True needs an x that does not require grad (autograd needs the input); "
                  "use inplace=False")
        if x.stride(-1) != 1:
            _fail("inplace=True needs x with a contiguous last dimension")
        learned = [n for t, n in ((inv_freq, "inv_freq"), (cos, "cos"), (sin, "sin"), (rotation, "rotation"))
                   if t is not None and t.requires_grad]
        if learned and torch.is_grad_enabled():
            _fail(f"inplace=True gives no gradients, but {', '.join(learned)} requires grad; use inplace=False")
        return ops.rotary_(x, inv_freq, cos, sin, positions, rotation, offset, bool(interleaved), rd)
    x = _last_dim_contiguous(x)
    return ops.rotary(x, inv_freq, cos, sin, positions, rotation, offset, bool(interleaved), rd)


# ---------------------------------------------------------------------------------------------
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
    q_offset: Union[int, Tensor, None] = None,
    k_offset: Union[int, Tensor, None] = None,
    attn_mask: Optional[Tensor] = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    return_lse: bool = False,
):
    """Fused attention with relative-position bias, ALiBi, windows, global tokens and spans.

    Args:
        q: (B, Hq, Sq, Dqk); k: (B, Hkv, Sk, Dqk); v: (B, Hkv, Sk, Dv). Hq % Hkv == 0 (GQA;
            Hkv == 1 is MQA). Any strides with a contiguous last dim. Query i stands at
            position i + Sk - Sq (bottom-right aligned), key j at j; d = pos_q - j.
        scale: logit scale (default Dqk ** -0.5); a 0-dim tensor gets a gradient.
        causal: keep keys with d >= 0.
        window: (left, right): keep keys with -right <= d <= left; -1 is unbounded.
        rel_bias: (2 * max_dist - 1, Hq) table; adds table[clamp(d) + max_dist - 1, h].
        alibi_slopes: (Hq,) or (B, Hq); adds -slope[h] * |d|. Differentiable (per-batch
            slopes: the backward runs once per batch row; not with dropout).
        span: (B, Hq) or (Hq,) float tokens; the soft mask clamp((R + span - |d|) / R, 0, 1)
            multiplies the weights before renormalization (R = span_ramp). Differentiable.
        num_global: keys at positions < G are seen by all queries, queries at positions < G
            see all keys (window and span do not apply to them; causal does).
        key_lengths: (B,) integer; keys j >= key_lengths[b] are masked.
        q_offset, k_offset: positions: query i of batch b stands at q_offset[b] + i, key j at
            k_offset[b] + j; each an int or a (B,) integer tensor on q's device. The defaults
            (Sk - Sq and 0) align the last query with the last key. Every rule (table, ALiBi,
            window, span, global tokens by position, causal) uses these positions; e.g.
            new tokens appended to caches of lengths L[b]: q_offset = L - Sq.
        attn_mask: SDPA's mask: bool (True = may attend) or float (added to the logits, -inf
            hides a pair), broadcastable to (B, Hq, Sq, Sk); read where it lies (size-1 or
            stride-0 dims are never expanded), combined with every other option (the table
            and ALiBi add on top, the other masks intersect). A float mask that requires
            grad gets its gradient in its own shape, summed over the broadcast dims in a fixed
            order; the kernels then form dS of size (B, Hq, Sq, Sk) to reduce.
        softcap: logit soft-capping (Gemma 2): the scaled score s = scale * q.k becomes
            softcap * tanh(s / softcap) before the biases and masks; 0 turns it off.
        dropout_p: attention dropout, in [0, 1): after the softmax each weight is kept with
            probability 1 - dropout_p and kept weights are scaled by 1 / (1 - dropout_p) (lse
            is that of the undropped weights). The mask is a function of a seed and an offset
            drawn from `generator` and of (b, h, i, j), the same on every device and thread
            count, regenerated in the backward (never stored). Pass 0 when not training.
        generator: the torch.Generator the dropout seed is drawn from (default: the default
            generator of q's device, so torch.manual_seed makes a call reproducible).
        return_lse: also return the log-sum-exp of the logits, (B, Hq, Sq) float32.
    Returns:
        out (B, Hq, Sq, Dv) in q's dtype (a row with no visible key is 0, its lse -inf);
        with return_lse, (out, lse).
    """
    return _attention(ops.attention, q, k, v, scale, causal, window, rel_bias, alibi_slopes, span,
                      span_ramp, num_global, key_lengths, q_offset, k_offset, attn_mask, softcap, dropout_p,
                      generator, return_lse)


def dropout_seed(dropout_p: float, generator: Optional[torch.Generator], q: Tensor) -> Optional[Tensor]:
    """The (2,) int64 [seed, offset] of a dropout mask, drawn from `generator` (default: the
    default generator of q's device) on the generator's device, or None when dropout_p is 0.
    A traceable torch operation: torch.compile keeps it in the graph."""
    if dropout_p == 0:
        return None
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            _fail(f"generator must be a torch.Generator or None, got {type(generator).__name__}", TypeError)
        if generator.device.type != q.device.type:
            _fail(f"generator must be on q's device type ({q.device.type}), got {generator.device}")
        device = generator.device
    else:
        device = q.device
    return torch.randint(2 ** 62, (2,), dtype=torch.int64, device=device, generator=generator)


def _attention(op, q, k, v, scale, causal, window, rel_bias, alibi_slopes, span, span_ramp, num_global,
               key_lengths, q_offset, k_offset, attn_mask, softcap, dropout_p, generator, return_lse, *,
               drawn_seed: Optional[Tensor] = None):
    # (the arguments of fastattn.attention, in its order: the emulator's tests bind them by name)
    # `op` is the attention op (the CUDA emulator's in its tests). `drawn_seed`, a [seed,
    # offset] tensor, replaces the draw from `generator` (for callers that place dropout masks
    # themselves).
    q, k, v, out_dtype, options = _op_arguments(q, k, v, scale, causal, window, rel_bias, alibi_slopes, span,
                                                span_ramp, num_global, key_lengths, q_offset, k_offset, attn_mask,
                                                softcap, dropout_p, generator, drawn_seed)
    out, lse = op(q, k, v, *options)
    if out.dtype != out_dtype:  # (Tensor.to costs a few us even when it is a no-op)
        out = out.to(out_dtype)
    return (out, lse) if return_lse else out


def _op_arguments(q, k, v, scale, causal, window, rel_bias, alibi_slopes, span, span_ramp, num_global, key_lengths,
                  q_offset, k_offset, attn_mask, softcap, dropout_p, generator, drawn_seed=None) -> tuple:
    """(q, k, v, the output's dtype, the attention op's arguments after v), from the public
    functions' arguments. Every check of shapes, dtypes, devices and ranges is the op's own (C++:
    one set for every caller, raising ValueError / TypeError); here only what Python alone can
    do: Python scalars, defaults, a non-contiguous last dim, the dropout draw."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    for t, name in ((rel_bias, "rel_bias"), (alibi_slopes, "alibi_slopes"), (span, "span"),
                    (key_lengths, "key_lengths"), (attn_mask, "attn_mask")):
        if t is not None and not isinstance(t, Tensor):
            _fail(f"{name} must be a torch.Tensor or None, got {type(t).__name__}", TypeError)
    scale_f, scale_tensor = None, None
    if isinstance(scale, Tensor):
        scale_tensor = scale
    elif scale is not None:
        scale_f = _real(scale, "scale", "a float, a 0-dim tensor or None")
    left, right = _window(window)
    num_global = _int(num_global, "num_global", "an int")
    span_ramp = _real(span_ramp, "span_ramp", "a number")
    softcap = _real(softcap, "softcap", "a number")
    dropout_p = _dropout_p(dropout_p)
    seed = drawn_seed if drawn_seed is not None and dropout_p > 0 else dropout_seed(dropout_p, generator, q)

    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    # A learnable scale's gradient, sum(q * dq) / s, cancels heavily: with fp16/bf16 rounding of
    # dq and of the saved output it can be off by 10%. Such calls run in fp32 (exact gradient,
    # slower); to keep low-precision speed, use a fixed float scale.
    out_dtype = q.dtype
    if (scale_tensor is not None and scale_tensor.requires_grad and torch.is_grad_enabled()
            and out_dtype in (torch.float16, torch.bfloat16)):
        q, k, v = q.float(), k.float(), v.float()
    options = (scale_f, scale_tensor, bool(causal), left, right, rel_bias, alibi_slopes, span, span_ramp, num_global,
               key_lengths, softcap, dropout_p, seed, _offset(q_offset, "q_offset", q),
               _offset(k_offset, "k_offset", q), attn_mask)
    return q, k, v, out_dtype, options


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
    q_offset: Union[int, Tensor, None] = None,
    k_offset: Union[int, Tensor, None] = None,
    attn_mask: Optional[Tensor] = None,
    softcap: float = 0.0,
    heads=None,
) -> Tensor:
    """The attention probabilities of fastattn.attention (no dropout), for inspection.

    The options are fastattn.attention's. The kernel computes each row's log-sum-exp (a call
    with no value columns); then one dense pass over the selected heads builds the logits by
    the same rules (fastattn.reference.attention_logits) and returns exp(logit - lse): the
    weights the kernel normalizes with, 0 on masked pairs and on rows with no visible key.
    This materializes (Sq, Sk) per selected head: pick heads to bound the memory.

    Args:
        q, k: as fastattn.attention.
        heads: query-head indices (a list / tuple of ints or a 1-d integer tensor, each in
            [0, Hq)); None: every head.
    Returns:
        (B, len(heads) or Hq, Sq, Sk) in q's dtype, computed in float32 (float64 for float64
        q). Differentiable: gradients reach q, k, rel_bias, span and scale, through the dense
        pass and through the kernel's lse (whose float32 rounding limits float64 results to
        ~1e-7 relative accuracy).
    """
    for t, name in ((q, "q"), (k, "k")):
        _check_tensor(t, name, 4, floating=False)
    idx = reference.head_indices(heads, q.shape[1], q.device)
    # lse from the kernel: a call with no value columns (Dv = 0) computes the softmax statistics
    # and no output; its backward carries lse's gradient.
    B, Hkv, Sk = k.shape[0], k.shape[1], k.shape[2]
    no_values = k.new_zeros(()).expand(B, Hkv, Sk, 0)
    _, lse = _attention(ops.attention, q, k, no_values, scale, causal, window, rel_bias, alibi_slopes,
                        span, span_ramp, num_global, key_lengths, q_offset, k_offset, attn_mask, softcap,
                        0.0, None, True)
    # (the op call above has checked every option; these only normalize Python scalars)
    args = (q, k, idx, scale, causal, _window(window), rel_bias, alibi_slopes, span,
            _real(span_ramp, "span_ramp", "a number"), _int(num_global, "num_global", "an int"),
            key_lengths, _real(softcap, "softcap", "a number"), _offset(q_offset, "q_offset", q),
            _offset(k_offset, "k_offset", q), attn_mask)
    logits = _logits_by_distance(*args) if args[10] == 0 and attn_mask is None else reference._logits(*args)
    lse = lse if idx is None else lse.index_select(1, idx)
    lse = lse.to(logits.dtype).unsqueeze(-1)
    # A row with lse = -inf has no visible pair (every logit -inf): its weights are exp(-inf) = 0
    # with a 0 shift, never exp(-inf + inf).
    shift = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return torch.exp(logits - shift).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# packed variable-length sequences
# ---------------------------------------------------------------------------------------------
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
    generator: Optional[torch.Generator] = None,
    return_lse: bool = False,
):
    """fastattn.attention over packed sequences of different lengths (FlashAttention's varlen
    layout): each sequence attends only within itself.

    Sequence s holds queries cu_seqlens_q[s] .. cu_seqlens_q[s + 1] - 1 and keys
    cu_seqlens_k[s] .. cu_seqlens_k[s + 1] - 1, aligned bottom-right within itself: its query
    i stands at position len_k(s) - len_q(s) + i and its key j at j (FlashAttention's varlen
    convention), so a prefill or a decode step of one sequence gives what the padded call gives
    it. Every rule (causal, window, table, ALiBi, span, global tokens) uses these positions.

    One op (fastattn::attention_varlen, with a fake kernel: torch.compile(fullgraph=True)
    keeps it in its graph, and the output shapes depend only on the input shapes). Inside it,
    each sequence is one attention kernel call on views of q, k and v (no padding; on the CPU
    a sequence of 32 queries or more is copied head-major into a reused buffer first, which
    the kernels read faster): time and memory follow the real tokens. The op reads the
    cu_seqlens values on the host (one transfer for both tensors: a device sync on a GPU).

    Args:
        q: (total_q, Hq, Dqk); k: (total_k, Hkv, Dqk); v: (total_k, Hkv, Dv). Hq % Hkv == 0.
            Any strides with a contiguous last dim.
        cu_seqlens_q, cu_seqlens_k: (n_seq + 1,) int32 or int64 on q's device: 0, then the
            running sums of the sequences' lengths, ending at total_q / total_k (zero-length
            sequences are allowed).
        max_seqlen_q, max_seqlen_k: ints at least every sequence's length (as FlashAttention
            requires; checked).
        scale, causal, window, rel_bias, span_ramp, num_global, softcap: as fastattn.attention.
        alibi_slopes: (Hq,), or (n_seq, Hq) per sequence; differentiable.
        span: (Hq,), or (n_seq, Hq) per sequence; differentiable.
        dropout_p, generator: as fastattn.attention. One [seed, offset] is drawn from the
            generator for the whole call; sequence s draws the mask of a call with
            [seed, offset + s] (fastattn.reference.dropout_keep_mask(seed, offset + s, 1, Hq,
            len_q(s), len_k(s), dropout_p)).
        return_lse: also return lse (Hq, total_q) float32.
    Returns:
        out (total_q, Hq, Dv) in q's dtype (a query with no visible key gives 0, its lse
        -inf); with return_lse, (out, lse). Gradients reach q, k, v, rel_bias,
        alibi_slopes, span and scale. The backward adds the sequences' contributions to a
        shared parameter one after another in a fixed order (last sequence first, as autograd
        would for one call per sequence), so gradients are bitwise reproducible, on any
        thread count.
    """
    return _attention_varlen(ops.attention_varlen, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             scale, causal, window, rel_bias, alibi_slopes, span, span_ramp, num_global, softcap,
                             dropout_p, generator, return_lse)


def _attention_varlen(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, window,
                      rel_bias, alibi_slopes, span, span_ramp, num_global, softcap, dropout_p, generator, return_lse):
    # (the arguments of fastattn.attention_varlen, in its order; `op` is the varlen op, the CUDA
    # emulator's in its tests)
    for t, name in ((cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
        if not isinstance(t, Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    max_seqlen_q = _int(max_seqlen_q, "max_seqlen_q", "an int")
    max_seqlen_k = _int(max_seqlen_k, "max_seqlen_k", "an int")
    q, k, v, out_dtype, options = _op_arguments(q, k, v, scale, causal, window, rel_bias, alibi_slopes, span,
                                                span_ramp, num_global, None, None, None, None, softcap, dropout_p,
                                                generator)
    out, lse = op(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k, v, *options)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    return (out, lse) if return_lse else out


def unpad(x: Tensor, attention_mask: Tensor) -> tuple:
    """Packs the tokens of a padded batch for attention_varlen (FlashAttention's unpad_input).

    Args:
        x: (B, S, ...) any tensor.
        attention_mask: (B, S) bool, or integer of 0 / 1: 1 marks a real token; left or right
            padding alike (the kept tokens of row b, in order, are sequence b).
    Returns:
        (x_packed (total, ...), indices (total,) int64 (the kept tokens' flat indices b * S + t),
        cu_seqlens (B + 1,) int32, max_seqlen int). Differentiable in x (index_select).
        Reads the lengths on the host (max_seqlen).
    """
    if not isinstance(x, Tensor):
        _fail(f"x must be a torch.Tensor, got {type(x).__name__}", TypeError)
    if x.dim() < 2:
        _fail(f"x must be (B, S, ...), got {x.dim()} dimensions (shape {tuple(x.shape)})")
    mask = attention_mask
    if not isinstance(mask, Tensor):
        _fail(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}", TypeError)
    if mask.dtype != torch.bool and (mask.dtype.is_floating_point or mask.dtype.is_complex):
        _fail(f"attention_mask must be bool or an integer dtype of 0 / 1, got {mask.dtype}", TypeError)
    if tuple(mask.shape) != tuple(x.shape[:2]):
        _fail(f"attention_mask must be (B, S) = {tuple(x.shape[:2])} (x's first two dims), got {tuple(mask.shape)}")
    _check_device(mask, "attention_mask", x, "x")
    if mask.dtype != torch.bool:
        if mask.numel() > 0 and not bool(((mask == 0) | (mask == 1)).all()):
            lo, hi = int(mask.min()), int(mask.max())
            _fail(f"attention_mask must hold 0 and 1 only, got values in [{lo}, {hi}]")
        mask = mask != 0
    B, S = mask.shape
    lengths = mask.sum(1, dtype=torch.int32)
    indices = torch.nonzero(mask.reshape(-1), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    max_seqlen = int(lengths.max()) if B > 0 else 0
    return x.reshape(B * S, *x.shape[2:]).index_select(0, indices), indices, cu_seqlens, max_seqlen


def pad(x_packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """The inverse of unpad: (batch, seqlen, ...) with x_packed's rows at the flat positions
    `indices` (b * seqlen + t) and zeros elsewhere (FlashAttention's pad_input).
    Differentiable in x_packed (index_copy; its gradient is an index_select)."""
    if not isinstance(x_packed, Tensor):
        _fail(f"x_packed must be a torch.Tensor, got {type(x_packed).__name__}", TypeError)
    if x_packed.dim() < 1:
        _fail("x_packed must be (total, ...), got a 0-dim tensor")
    if not isinstance(indices, Tensor):
        _fail(f"indices must be a torch.Tensor, got {type(indices).__name__}", TypeError)
    if indices.dtype not in (torch.int32, torch.int64):
        _fail(f"indices must be int64 or int32, got {indices.dtype}", TypeError)
    if indices.dim() != 1 or indices.shape[0] != x_packed.shape[0]:
        _fail(f"indices must be (total,) = ({x_packed.shape[0]},) (one per row of x_packed), "
              f"got shape {tuple(indices.shape)}")
    _check_device(indices, "indices", x_packed, "x_packed")
    batch, seqlen = _int(batch, "batch", "an int"), _int(seqlen, "seqlen", "an int")
    for value, name in ((batch, "batch"), (seqlen, "seqlen")):
        if value < 0:
            _fail(f"{name} must be >= 0, got {value}")
    if indices.numel() > 0 and not _is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= batch * seqlen:
            _fail(f"indices must lie in [0, batch * seqlen = {batch * seqlen}), got values in [{lo}, {hi}]")
    out = x_packed.new_zeros((batch * seqlen, *x_packed.shape[1:]))
    return out.index_copy(0, indices.long(), x_packed).view(batch, seqlen, *x_packed.shape[1:])


def _logits_by_distance(q, k, idx, scale, causal, window, rel_bias, alibi_slopes, span, span_ramp,
                        num_global, key_lengths, softcap, q_offset, k_offset, attn_mask) -> Tensor:
    """reference._logits for calls whose rules all go by distance (no global tokens, no
    attn_mask): the rules are evaluated once per distance, on the Sq + Sk - 1 distances of each
    row, and laid over the (Sq, Sk) scores as a Toeplitz matrix (a strided view, flipped), so
    the dense pass costs a product and a few elementwise passes (the general path builds an
    int64 distance per pair and a mask per rule)."""
    logits, rel_bias, alibi_slopes, span, _ = reference._head_scores(
        q, k, idx, scale, softcap, rel_bias, alibi_slopes, span, None)
    B, n, Sq, Sk = logits.shape
    md = logits.dtype
    if Sq == 0 or Sk == 0:
        return logits
    # One query at position 0 against L = Sq + Sk - 1 keys at decreasing distances: key u' of row
    # b stands at distance d = shift_b + (Sq - 1) - u' (shift_b = q_offset[b] - k_offset[b]),
    # the distances of the pairs (i, j) with u' = (Sq - 1) - i + j.
    L = Sq + Sk - 1
    qo = torch.full((B,), Sk - Sq, dtype=torch.int64, device=q.device) if q_offset is None else q_offset.long()
    ko = torch.zeros(B, dtype=torch.int64, device=q.device) if k_offset is None else k_offset.long()
    visible, bias = reference.attention_mask_and_bias(
        B, n, 1, L, device=q.device, dtype=md, causal=causal, window=window, rel_bias=rel_bias,
        alibi_slopes=alibi_slopes, span=span, span_ramp=span_ramp, num_global=0,
        q_offset=torch.zeros_like(qo), k_offset=-(Sq - 1) - (qo - ko))
    row = torch.where(visible, bias, torch.full((), -math.inf, dtype=md, device=q.device)).reshape(B, n, L)
    by_pair = row.as_strided((B, n, Sq, Sk), (n * L, L, 1, 1)).flip(-2)  # [i, j] = row[(Sq - 1) - i + j]
    logits = logits + by_pair
    if key_lengths is not None:
        hidden = torch.arange(Sk, device=q.device).view(1, 1, 1, Sk) >= key_lengths.to(q.device).view(B, 1, 1, 1)
        logits = logits.masked_fill(hidden, -math.inf)
    return logits


def _dropout_p(value) -> float:
    """dropout_p as a float in [0, 1) (checked before a seed is drawn for it)."""
    p = _real(value, "dropout_p", "a number in [0, 1)")
    if not 0 <= p < 1:
        _fail(f"dropout_p must be in [0, 1), got {p}")
    return p


def _offset(value, name: str, q: Tensor) -> Optional[Tensor]:
    """A position offset as the op takes it: None, or a (B,) integer tensor (an int is
    broadcast to every batch row, on q's device)."""
    if value is None or isinstance(value, Tensor):
        return value
    value = _int(value, name, "an int, a (B,) integer tensor or None")
    return torch.full((q.shape[0],), value, dtype=torch.int64, device=q.device)


def check_options(**options) -> None:
    """Checks attention options (window, softcap, causal, ...) as fastattn.attention would,
    before any call: with the op's own checks, through a call on empty meta tensors (no data,
    no kernel). For modules, which validate their options when they are built. Options that
    depend on the shapes (num_global, tensors) are checked at the call."""
    q = torch.empty(1, 1, 0, 1, device="meta")
    attention(q, q, q, **options)


# Python scalars: any real number (numpy's too) where a float is expected, any integral one
# (operator.index) where an int is; never a bool. The ops take int64 integers: an int outside
# that range gets a ValueError naming the argument rather than torch's schema error.
_INT64_MIN, _INT64_MAX = -2 ** 63, 2 ** 63 - 1


def _real(value, name: str, expected: str) -> float:
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(f"{name} must be {expected}, got {type(value).__name__}", TypeError)
    try:
        return float(value)
    except OverflowError:
        _fail(f"{name} must be a finite number, got a value too large for a float")


def _int(value, name: str, expected: str):
    """An integral scalar as an int in int64's range (a SymInt while tracing passes as is)."""
    if type(value) is not int:
        if isinstance(value, torch.SymInt):
            return value
        wrong = f"{name} must be {expected}, got {type(value).__name__} ({value!r})"
        if isinstance(value, bool):
            _fail(wrong, TypeError)
        try:
            value = operator.index(value)
        except TypeError:
            _fail(wrong, TypeError)
    if not _INT64_MIN <= value <= _INT64_MAX:
        shown = value if value.bit_length() <= 128 else f"an int of {value.bit_length()} bits"
        _fail(f"{name} must fit in int64 ([-2**63, 2**63 - 1]), got {shown}")
    return value


def _window(window) -> tuple:
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        _fail(f"window must be a (left, right) pair of ints, got {window!r}", TypeError)
    return (_int(window[0], "window", "a (left, right) pair of ints"),
            _int(window[1], "window", "a (left, right) pair of ints"))
