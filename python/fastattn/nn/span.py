"""Adaptive-span attention and hybrid local/global attention with a predicted span."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ._common import check_dropout, check_impl, check_input, check_packed_input, check_positive_int
from .attention import Cache, MultiheadAttention


def _check_span_args(max_span, span_ramp):
    if isinstance(max_span, bool) or not isinstance(max_span, (int, float)) or not max_span > 0:
        raise ValueError(f"max_span must be a positive number of tokens, got {max_span!r}")
    if isinstance(span_ramp, bool) or not isinstance(span_ramp, (int, float)) or not span_ramp > 0:
        raise ValueError(f"span_ramp must be a positive number of tokens, got {span_ramp!r}")


class AdaptiveSpanAttention(MultiheadAttention):
    """Attention with a learned span per head (Sukhbaatar et al. 2019, arXiv:1905.07799).

    Head ``h`` has a span ``z_h = clamp(span_frac[h], 0, 1) * max_span`` tokens; its attention
    weights are multiplied by the soft mask ``m(d) = clamp((R + z_h - |d|) / R, 0, 1)``
    (``R = span_ramp``) and renormalized — done inside the kernel (``attention(span=...)``),
    which also returns the gradient to the span and skips keys beyond it. Add
    :meth:`span_loss` to the training loss to shrink spans, and call :meth:`clamp_span_`
    after each optimizer step.

    Args:
        d_model, n_head: as :class:`MultiheadAttention` (all its keyword options are accepted;
            ``causal`` defaults to True here).
        max_span: the largest span in tokens.
        span_ramp: width ``R`` of the soft ramp, in tokens.
        span_init: initial ``span_frac`` (fraction of ``max_span``), in [0, 1].
        span_loss_coef: weight of :meth:`span_loss`.

    Shapes: ``x (B, S, d_model)`` -> ``(B, S, d_model)``.

    State dict: the :class:`MultiheadAttention` names plus ``span_frac (n_head,)``.
    The window defaults to ``(ceil(max_span + span_ramp),) * 2``: nothing past it can get a
    nonzero weight.
    """

    def __init__(self, d_model: int, n_head: int, max_span: float, *, span_ramp: float = 32.0,
                 span_init: float = 0.5, span_loss_coef: float = 2e-6, causal: bool = True,
                 window: Optional[Tuple[int, int]] = None, **kwargs):
        _check_span_args(max_span, span_ramp)
        if not 0.0 <= span_init <= 1.0:
            raise ValueError(f"span_init is a fraction of max_span in [0, 1], got {span_init}")
        if window is None:
            w = int(math.ceil(max_span + span_ramp))
            window = (w, w)
        super().__init__(d_model, n_head, causal=causal, window=window, **kwargs)
        self.max_span = float(max_span)
        self.span_ramp = float(span_ramp)
        self.span_loss_coef = float(span_loss_coef)
        self.span_frac = nn.Parameter(torch.full((n_head,), float(span_init)))

    def span(self) -> torch.Tensor:
        """Current spans in tokens, ``(n_head,)``, differentiable w.r.t. ``span_frac``.

        The value uses ``span_frac`` clamped to [0, 1]; the gradient passes straight through
        the clamp, so a span at a bound (e.g. clamped there by :meth:`clamp_span_`) can still
        move back."""
        z = self.span_frac
        z = z + (z.clamp(0.0, 1.0) - z).detach()
        return z * self.max_span

    def span_loss(self) -> torch.Tensor:
        """``span_loss_coef * mean span`` (tokens), a 0-dim tensor to add to the loss."""
        return self.span_loss_coef * self.span().mean()

    @torch.no_grad()
    def clamp_span_(self) -> None:
        """Clamp ``span_frac`` into [0, 1] in place (call after the optimizer step)."""
        self.span_frac.clamp_(0.0, 1.0)

    def forward(self, x: torch.Tensor, xa: Optional[torch.Tensor] = None, *,
                cache: Optional[Cache] = None, key_lengths: Optional[torch.Tensor] = None,
                need_weights: bool = False, average_attn_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None):
        """``x (B, S, d_model)`` -> ``(B, S, d_model)`` (with the weights and the cache as
        :class:`MultiheadAttention` returns them), attending within each head's learned span;
        ``attn_mask`` and packed input (``cu_seqlens``, ``max_seqlen``) as
        :meth:`MultiheadAttention.forward` takes them."""
        return super().forward(x, xa, cache=cache, key_lengths=key_lengths,
                               span=self.span().to(x.dtype), span_ramp=self.span_ramp,
                               need_weights=need_weights, average_attn_weights=average_attn_weights,
                               attn_mask=attn_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", max_span={self.max_span}, span_ramp={self.span_ramp}"


class HybridAttention(nn.Module):
    """Hybrid local/global attention with a predicted span, trainable end to end.

    1. global branch: ``g = attn_global(ln_global(x))``, full (optionally causal) attention;
    2. span predictor: ``span = max_span * sigmoid(span_pred(mean_s g))``, ``(B, n_head)``
       tokens — one span per sequence and head (mean over valid positions with
       ``key_lengths``);
    3. local branch: ``l = attn_local(ln_local(x))``, a sliding window whose reach follows the
       predicted span through the kernel's differentiable soft mask (``span=``, ramp
       ``span_ramp``); the static window ``ceil(max_span + span_ramp)`` only bounds it;
    4. ``out = projection(cat([l, g], -1))``.

    Nothing leaves the graph (no ``.item()`` window sizes, no Python loop over chunks): the
    predictor gets gradients through the kernel's span gradient, and the module compiles with
    ``fullgraph=True``.

    Note: the span is pooled over the whole sequence (one span per sequence), so with
    ``causal=True`` the local branch of an early position depends (through ``n_head``
    numbers) on later positions, and incremental decoding is not supported.

    Args:
        d_model, n_head: model width and heads.
        max_span: largest predicted span (tokens).
        span_ramp: soft-mask ramp (tokens).
        causal: causal masking in both branches.
        dropout: attention dropout probability in [0, 1) of both branches, in training mode
            only.
        n_kv_head, rotary, rel_bias_max_dist, alibi, ...: further keyword arguments go to both
            :class:`MultiheadAttention` branches.
        impl: ``"fused"`` or ``"reference"``.

    Shapes: ``x (B, S, d_model)`` -> ``(B, S, d_model)``; a packed batch ``x (total, d_model)``
    with ``cu_seqlens`` -> ``(total, d_model)`` (see :meth:`forward`). With ``need_weights=True`` the
    forward also returns the attention weights of both branches, ``(local, global)``, each as
    :class:`MultiheadAttention` returns them.

    State dict: ``ln_global``, ``ln_local`` (LayerNorm), ``attn_global``, ``attn_local``
    (:class:`MultiheadAttention`), ``span_pred`` (``Linear(d_model, n_head)``),
    ``projection`` (``Linear(2*d_model, d_model)``).
    """

    def __init__(self, d_model: int, n_head: int, *, max_span: float = 32.0,
                 span_ramp: float = 8.0, causal: bool = True, dropout: float = 0.0,
                 impl: str = "fused", device=None, dtype=None, **mha_kwargs):
        super().__init__()
        _check_span_args(max_span, span_ramp)
        check_positive_int("d_model", d_model)
        check_positive_int("n_head", n_head)
        for bad in ("window", "cache"):
            if bad in mha_kwargs:
                raise ValueError(f"HybridAttention sets {bad!r} itself; do not pass it")
        self.d_model = d_model
        self.n_head = n_head
        self.max_span = float(max_span)
        self.span_ramp = float(span_ramp)
        self.causal = bool(causal)
        self.dropout = check_dropout(dropout)
        self._impl = check_impl(impl)
        fk = dict(device=device, dtype=dtype)
        w = int(math.ceil(max_span + span_ramp))
        self.ln_global = nn.LayerNorm(d_model, **fk)
        self.ln_local = nn.LayerNorm(d_model, **fk)
        self.attn_global = MultiheadAttention(d_model, n_head, causal=causal, dropout=dropout,
                                              impl=impl, **fk, **mha_kwargs)
        self.attn_local = MultiheadAttention(d_model, n_head, causal=causal, window=(w, w),
                                             dropout=dropout, impl=impl, **fk, **mha_kwargs)
        self.span_pred = nn.Linear(d_model, n_head, **fk)
        self.projection = nn.Linear(2 * d_model, d_model, **fk)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        self._impl = check_impl(value)
        self.attn_global.impl = value
        self.attn_local.impl = value

    def predict_span(self, g: torch.Tensor, key_lengths: Optional[torch.Tensor] = None,
                     cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Span ``(B, n_head)`` in tokens from the global branch output ``g (B, S, d_model)``;
        of a packed batch (``g (total, d_model)`` with ``cu_seqlens``), ``(n_seq, n_head)``, one
        span per sequence from the mean over its own tokens (an empty sequence pools zeros)."""
        if cu_seqlens is not None:
            n_seq = cu_seqlens.shape[0] - 1
            token = torch.arange(g.shape[0], device=g.device)
            sequence = torch.searchsorted(cu_seqlens[1:].long(), token, right=True)
            sums = g.new_zeros(n_seq, g.shape[1]).index_add(0, sequence, g)
            counts = (cu_seqlens[1:] - cu_seqlens[:-1]).to(g.dtype).clamp(min=1.0)
            pooled = sums / counts[:, None]
        elif key_lengths is None:
            pooled = g.mean(dim=1)
        else:
            valid = (torch.arange(g.shape[1], device=g.device)[None, :] < key_lengths[:, None])
            valid = valid.to(g.dtype)[..., None]
            pooled = (g * valid).sum(1) / valid.sum(1).clamp(min=1.0)
        return self.max_span * torch.sigmoid(self.span_pred(pooled))

    def forward(self, x: torch.Tensor, *, key_lengths: Optional[torch.Tensor] = None,
                return_span: bool = False, need_weights: bool = False,
                average_attn_weights: bool = True, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None):
        """``x (B, S, d_model)`` -> ``out (B, S, d_model)``, followed by the weights
        ``(local, global)`` with ``need_weights`` and the predicted span ``(B, n_head)`` with
        ``return_span``: ``out``, ``(out, weights)``, ``(out, span)`` or ``(out, weights, span)``.

        Packed input, as :meth:`MultiheadAttention.forward` takes it: ``x (total, d_model)``
        with ``cu_seqlens`` and ``max_seqlen`` -> ``(total, d_model)``; each sequence attends to
        itself in both branches and gets its own span (``(n_seq, n_head)``), pooled over its own
        tokens. Without ``key_lengths`` or ``need_weights``."""
        packed = cu_seqlens is not None or max_seqlen is not None
        if packed:
            check_packed_input(x, self.d_model, cu_seqlens, max_seqlen, key_lengths=key_lengths,
                               need_weights=need_weights)
        else:
            check_input("x", x, self.d_model)
        wk = dict(need_weights=True, average_attn_weights=average_attn_weights) if need_weights else {}
        pk = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen) if packed else dict(key_lengths=key_lengths)
        g = self.attn_global(self.ln_global(x), **pk, **wk)
        g, w_global = g if need_weights else (g, None)
        span = self.predict_span(g, key_lengths, cu_seqlens if packed else None)
        loc = self.attn_local(self.ln_local(x), span=span.to(x.dtype), span_ramp=self.span_ramp, **pk, **wk)
        loc, w_local = loc if need_weights else (loc, None)
        result = (self.projection(torch.cat([loc, g], dim=-1)),)
        if need_weights:
            result += ((w_local, w_global),)
        if return_span:
            result += (span,)
        return result[0] if len(result) == 1 else result

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_head={self.n_head}, max_span={self.max_span}, "
                f"span_ramp={self.span_ramp}, causal={self.causal}, impl={self.impl!r}"
                + (f", dropout={self.dropout}" if self.dropout else ""))
