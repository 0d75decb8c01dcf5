"""Multi-head attention (MHA / GQA / MQA) on ``fastattn.attention``."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ._common import (alibi_slopes, append_to_caches, attend_packed, average_weights, check_dropout,
                      check_impl, check_input, check_packed_input, check_positive_int, check_window,
                      dropout_options, first_lengths, ops, packed_positions, row_step)
from .. import distributed, functional
from .bias import RelativePositionBias
from .rotary import GivensRotaryEmbedding, RotaryEmbedding

Cache = Dict[str, torch.Tensor]

_ROTARY_KINDS = (None, "rope", "givens")


class MultiheadAttention(nn.Module):
    """Multi-head attention with grouped / multi-query KV heads, on the fused kernel.

    ``n_kv_head`` selects the variant: ``None`` or ``n_head`` gives MHA, ``1`` MQA, anything
    dividing ``n_head`` GQA (the kernel shares each KV head among ``n_head // n_kv_head``
    query heads without copying). Called with ``xa`` it is cross-attention (keys/values from
    ``xa``), otherwise self-attention.

    Args:
        d_model: model width (last dim of ``x``).
        n_head: query heads.
        n_kv_head: key/value heads; must divide ``n_head``. Default ``n_head``.
        head_dim: per-head dim; default ``d_model // n_head`` (then ``d_model % n_head == 0``
            is required).
        kdim: last dim of ``xa`` for cross-attention; default ``d_model``.
        bias: biases in the q/k/v/out projections (the key projection has none, since a key
            bias cancels in the softmax).
        causal: mask keys after the query (bottom-right aligned, so KV-cache decoding sees
            the same mask as the full pass).
        window: ``(left, right)`` sliding window, keys with ``-right <= pq - pk <= left``;
            -1 = unbounded.
        num_global: the first ``num_global`` positions are global tokens (Longformer).
        softcap: logit soft-capping (Gemma 2): scaled scores ``s`` become
            ``softcap * tanh(s / softcap)`` before the biases; 0 turns it off.
        rotary: ``None``, ``"rope"`` (:class:`RotaryEmbedding`) or ``"givens"``
            (:class:`GivensRotaryEmbedding`), applied to q and k (self-attention only).
        rotary_base, rotary_dim, interleaved, learned_freq, n_rotations: rotary options;
            ``learned_freq`` defaults to False for ``"rope"`` and True for ``"givens"``,
            ``n_rotations`` defaults to ``head_dim``.
        rel_bias_max_dist: if set, a learned :class:`RelativePositionBias` table
            ``(2*max_dist-1, n_head)`` is added to the logits (computed in the kernel).
        alibi: add ALiBi biases ``-slope[h] * |pq - pk|``.
        learnable_temperature: learn the softmax scale (``scale = exp(log_scale)``, init
            ``head_dim ** -0.5``; ``log_scale`` has shape ``(1,)``); its gradient comes from the
            kernel.
        dropout: attention dropout probability in [0, 1), applied to the attention weights in
            training mode only (``fastattn.attention(dropout_p=...)``); not a parameter or buffer.
        impl: ``"fused"`` (``fastattn.functional``) or ``"reference"`` (``fastattn.reference``).
        context_parallel_group: a ``torch.distributed`` process group: context parallelism.
            ``forward`` then takes ``x`` as this rank's shard of a sequence split across the
            group (``fastattn.distributed.shard_sequence``) and runs
            ``fastattn.distributed.ring_attention``; rotary uses the tokens' global positions,
            ``key_lengths`` counts keys of the whole sequence. Self-attention only (no ``xa``,
            cache, packed input, ``attn_mask`` or ``need_weights``), ``impl="fused"``. The
            table, ALiBi and temperature gradients are this rank's share (``param_grads=
            "local"``), like the projections': reduce every gradient over the group, e.g. with
            DDP or FSDP over the flattened (data-parallel, context-parallel) mesh.
        context_parallel_layout: ``"contiguous"`` or ``"zigzag"`` (see ``fastattn.distributed``).

    Shapes: ``x (B, S, d_model)``, ``xa (B, Sa, kdim)`` -> ``(B, S, d_model)``; a packed batch of
    self-attention sequences, ``forward(x, cu_seqlens=..., max_seqlen=...)`` with ``x (total,
    d_model)``, -> ``(total, d_model)`` (each sequence attends to itself, rotary positions
    restart at 0 in each; ``fastattn.attention_varlen``). With
    ``need_weights=True`` the forward also returns the attention weights (as
    ``torch.nn.MultiheadAttention``): ``(B, S, Sk)`` averaged over the heads, or
    ``(B, n_head, S, Sk)`` with ``average_attn_weights=False``, from
    ``fastattn.attention_weights`` (before dropout; it materializes them).

    State dict: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (``nn.Linear``), plus
    ``rotary.*``, ``rel_bias.pos_bias``, ``alibi_slopes`` (buffer), ``log_scale`` as configured.

    KV cache: pass ``cache={}`` to start and the returned cache on the next call; with a
    cache the module returns ``(out, cache)`` instead of ``out``. For self-attention the
    cache is ``{"k": (B, n_kv_head, S_past, head_dim), "v": ...}`` (rotary already applied)
    and new keys are appended; for cross-attention it is ``{"cross_k", "cross_v"}``, computed
    from ``xa`` on the first call and reused after (``xa`` may then be None). Decoding token
    by token with ``causal=True`` gives the same outputs as one full pass. When autograd does not
    record the attention call (``torch.no_grad()``, or nothing it reads requires grad) ``k``/``v``
    are views of buffers that grow in place, so a step does not copy the whole cache (see
    ``append_to_caches``); ``torch.save`` and ``copy.deepcopy`` of them write only the filled
    part. Rows of different lengths: starting the cache with ``key_lengths`` (a right-padded
    prompt batch) records them as ``cache["lengths"]`` (``(B,)`` int64; a caller may also put
    its own there); each later call then writes row ``b``'s new tokens right after its
    ``lengths[b]`` real entries, at positions ``lengths[b] + i`` (rotary and every attention
    rule, through ``q_offset``), and never attends to the padding (FlashAttention's
    ``cache_seqlens``); ``key_lengths`` must then be None.
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: Optional[int] = None, *,
                 head_dim: Optional[int] = None, kdim: Optional[int] = None, bias: bool = True,
                 causal: bool = False, window: Tuple[int, int] = (-1, -1), num_global: int = 0,
                 softcap: float = 0.0, rotary: Optional[str] = None, rotary_base: float = 10000.0,
                 rotary_dim: Optional[int] = None, interleaved: bool = False,
                 learned_freq: Optional[bool] = None, n_rotations: Optional[int] = None,
                 rel_bias_max_dist: Optional[int] = None, alibi: bool = False,
                 learnable_temperature: bool = False, dropout: float = 0.0, impl: str = "fused",
                 context_parallel_group=None, context_parallel_layout: str = "contiguous",
                 device=None, dtype=None):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_head", n_head)
        if n_kv_head is None:
            n_kv_head = n_head
        check_positive_int("n_kv_head", n_kv_head)
        if n_head % n_kv_head != 0:
            raise ValueError(f"n_head must be divisible by n_kv_head (GQA groups), got "
                             f"n_head={n_head}, n_kv_head={n_kv_head}")
        if head_dim is None:
            if d_model % n_head != 0:
                raise ValueError(f"d_model must be divisible by n_head (or pass head_dim), got "
                                 f"d_model={d_model}, n_head={n_head}")
            head_dim = d_model // n_head
        check_positive_int("head_dim", head_dim)
        if kdim is None:
            kdim = d_model
        check_positive_int("kdim", kdim)
        if rotary not in _ROTARY_KINDS:
            raise ValueError(f"rotary must be one of {_ROTARY_KINDS}, got {rotary!r}")
        if rotary is not None and head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head_dim, got head_dim={head_dim}")
        check_positive_int("num_global", num_global, allow_zero=True)
        self.d_model = d_model
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = head_dim
        self.kdim = kdim
        self.causal = bool(causal)
        self.window = check_window(window)
        functional.check_options(softcap=softcap)
        self.softcap = float(softcap)
        self.num_global = num_global
        self.dropout = check_dropout(dropout)
        self.impl = check_impl(impl)
        if context_parallel_layout not in distributed.LAYOUTS:
            raise ValueError(f"context_parallel_layout must be one of {distributed.LAYOUTS}, got "
                             f"{context_parallel_layout!r}")
        if context_parallel_group is not None and self.impl != "fused":
            raise NotImplementedError(f"context_parallel_group runs the fused kernels (ring_attention); "
                                      f"impl={impl!r} is not implemented with it")
        self.context_parallel_group = context_parallel_group
        self.context_parallel_layout = context_parallel_layout
        fk = dict(device=device, dtype=dtype)

        self.q_proj = nn.Linear(d_model, n_head * head_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(kdim, n_kv_head * head_dim, bias=False, **fk)
        self.v_proj = nn.Linear(kdim, n_kv_head * head_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(n_head * head_dim, d_model, bias=bias, **fk)

        if rotary == "rope":
            self.rotary = RotaryEmbedding(head_dim, rotary_base, bool(learned_freq), interleaved,
                                          rotary_dim, impl=impl)
        elif rotary == "givens":
            self.rotary = GivensRotaryEmbedding(
                head_dim, head_dim if n_rotations is None else n_rotations, rotary_base,
                True if learned_freq is None else bool(learned_freq), interleaved, rotary_dim,
                impl=impl)
        else:
            self.rotary = None
        if rel_bias_max_dist is not None:
            self.rel_bias = RelativePositionBias(rel_bias_max_dist, n_head, **fk)
        else:
            self.rel_bias = None
        if alibi:
            self.register_buffer("alibi_slopes", torch.as_tensor(alibi_slopes(n_head), device=device))
        else:
            self.alibi_slopes = None
        if learnable_temperature:
            # Shape (1,), not 0-dim: FSDP2's fully_shard refuses 0-dim parameters. The op takes
            # the scale as a 0-dim tensor (_scale), and state dicts that hold a 0-dim log_scale
            # still load (_load_from_state_dict).
            self.log_scale = nn.Parameter(torch.full((1,), math.log(head_dim ** -0.5), device=device))
        else:
            self.log_scale = None

    # -- pieces -------------------------------------------------------------------------
    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        B, S, _ = t.shape
        return t.view(B, S, n, self.head_dim).transpose(1, 2)  # (B, n, S, head_dim), a view

    def _scale(self):
        return None if self.log_scale is None else self.log_scale.exp().squeeze(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # log_scale was a 0-dim parameter; such state dicts load into the (1,) one.
        key = prefix + "log_scale"
        saved = state_dict.get(key)
        if self.log_scale is not None and isinstance(saved, torch.Tensor) and saved.dim() == 0:
            state_dict[key] = saved.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _attention_inputs(self, q: torch.Tensor, span: Optional[torch.Tensor]):
        """The tensors besides k and v that ``attend`` reads, or that its scale derives from:
        autograd records the attention call when one of them requires grad."""
        return (q, self.log_scale, None if self.rel_bias is None else self.rel_bias.pos_bias,
                self.alibi_slopes, span)

    def _options(self, key_lengths: Optional[torch.Tensor], span: Optional[torch.Tensor],
                 span_ramp: float, attn_mask: Optional[torch.Tensor] = None,
                 q_offset: Optional[torch.Tensor] = None) -> dict:
        """This module's scale, mask and biases as attention / attention_weights options."""
        kw = dict(scale=self._scale(), causal=self.causal, window=self.window,
                  rel_bias=None if self.rel_bias is None else self.rel_bias.pos_bias,
                  alibi_slopes=self.alibi_slopes, num_global=self.num_global,
                  key_lengths=key_lengths, softcap=self.softcap)
        if span is not None:
            kw.update(span=span, span_ramp=span_ramp)
        if attn_mask is not None:
            kw.update(attn_mask=attn_mask)
        if q_offset is not None:
            kw.update(q_offset=q_offset)
        return kw

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               key_lengths: Optional[torch.Tensor] = None, span: Optional[torch.Tensor] = None,
               span_ramp: float = 32.0, attn_mask: Optional[torch.Tensor] = None,
               cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
               q_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention core on head-split tensors: ``q (B, n_head, Sq, head_dim)``,
        ``k, v (B, n_kv_head, Sk, head_dim)`` -> ``(B, n_head, Sq, head_dim)``, with this
        module's scale, mask, biases and (in training mode) dropout. With ``cu_seqlens`` the
        tensors hold a packed batch as one row (``B = 1``, ``Sq = Sk = total``) and each
        sequence attends to itself (``attention_varlen``). ``q_offset`` (``(B,)``) places the
        queries as ``fastattn.attention`` does (default: bottom-right)."""
        drop = dropout_options(self.dropout, self.training, self.impl)
        if cu_seqlens is not None:
            kw = self._options(None, span, span_ramp)
            del kw["key_lengths"]
            return attend_packed(ops(self.impl), q, k, v, cu_seqlens, max_seqlen, **kw, **drop)
        kw = self._options(key_lengths, span, span_ramp, attn_mask, q_offset)
        return ops(self.impl).attention(q, k, v, **kw, **drop)

    def attend_weights(self, q: torch.Tensor, k: torch.Tensor, *,
                       key_lengths: Optional[torch.Tensor] = None, span: Optional[torch.Tensor] = None,
                       span_ramp: float = 32.0, attn_mask: Optional[torch.Tensor] = None,
                       q_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention weights ``(B, n_head, Sq, Sk)`` that :meth:`attend` applies (before
        dropout), from ``fastattn.attention_weights``."""
        kw = self._options(key_lengths, span, span_ramp, attn_mask, q_offset)
        return ops(self.impl).attention_weights(q, k, **kw)

    def forward(self, x: torch.Tensor, xa: Optional[torch.Tensor] = None, *,
                cache: Optional[Cache] = None, key_lengths: Optional[torch.Tensor] = None,
                span: Optional[torch.Tensor] = None, span_ramp: float = 32.0,
                need_weights: bool = False, average_attn_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None):
        """Attention over ``x (B, S, d_model)``; keys/values from ``x`` or ``xa (B, Sa, kdim)``.

        Args:
            cache: KV cache dict (see the class docstring); when given, returns ``(out, cache)``.
            key_lengths: ``(B,)`` int, keys at positions ``>= key_lengths[b]`` are masked
                (positions count the cached keys too).
            span: ``(B, n_head)`` or ``(n_head,)`` soft attention span in tokens, with ramp
                ``span_ramp`` (differentiable; used by the adaptive-span/hybrid modules).
            need_weights: also return the attention weights (see the class docstring).
            average_attn_weights: with ``need_weights``, average the weights over the heads.
            attn_mask: SDPA's mask, as ``fastattn.attention`` takes it: bool (True may attend)
                or float (added to the logits), broadcastable to ``(B, n_head, S, Sk)`` (``Sk``
                counts the cached keys); on top of the module's own masks and biases.
            cu_seqlens, max_seqlen: packed input: ``x (total, d_model)`` holds ``n_seq``
                sequences back to back, sequence ``s`` at rows ``cu_seqlens[s]`` ..
                ``cu_seqlens[s + 1] - 1`` (``(n_seq + 1,)`` int32 / int64, on x's device), none
                longer than ``max_seqlen``; each attends to itself only
                (``fastattn.attention_varlen``; ``span`` may be ``(n_seq, n_head)``) and its
                rotary positions start at 0. Returns ``(total, d_model)``. Self-attention
                without a cache, ``key_lengths``, ``attn_mask`` or ``need_weights``.

        Returns: ``out (B, S, d_model)``; ``(out, weights)`` with ``need_weights``; a given
        ``cache`` adds the new cache last: ``(out, cache)`` or ``(out, weights, cache)``.
        """
        if self.context_parallel_group is not None:
            return self._forward_context_parallel(
                x, key_lengths, span, span_ramp, xa=xa, cache=cache, attn_mask=attn_mask,
                cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, need_weights=need_weights or None)
        packed = cu_seqlens is not None or max_seqlen is not None
        positions, q_offset = None, None
        if packed:
            check_packed_input(x, self.d_model, cu_seqlens, max_seqlen, xa=xa, cache=cache,
                               key_lengths=key_lengths, attn_mask=attn_mask, need_weights=need_weights)
            positions = packed_positions(cu_seqlens, x.shape[0])
            x = x.unsqueeze(0)  # the packed tokens as one row
        else:
            check_input("x", x, self.d_model)
        B, S, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_head)
        cross = xa is not None or (cache is not None and "cross_k" in cache)
        new_cache: Cache = {} if cache is None else dict(cache)
        if cross:
            if self.rotary is not None:
                raise ValueError("rotary embeddings are for self-attention; this module was built "
                                 "with rotary=... and called with xa (cross-attention)")
            if cache is not None and "cross_k" in cache:
                k, v = cache["cross_k"], cache["cross_v"]
            else:
                check_input("xa", xa, self.kdim, "kdim")
                if xa.shape[0] != B:
                    raise ValueError(f"xa batch {xa.shape[0]} != x batch {B}")
                k = self._heads(self.k_proj(xa), self.n_kv_head)
                v = self._heads(self.v_proj(xa), self.n_kv_head)
                new_cache["cross_k"], new_cache["cross_v"] = k, v
        else:
            k = self._heads(self.k_proj(x), self.n_kv_head)
            v = self._heads(self.v_proj(x), self.n_kv_head)
            past = cache is not None and "k" in cache
            offset = cache["k"].shape[2] if past else 0
            step = row_step(cache, key_lengths, B, offset, S, x.device)
            if step is not None:
                positions, q_offset, key_lengths = step.positions, step.q_offset, step.key_lengths
            if self.rotary is not None:
                q, k = self.rotary.rotate((q, k), offset=offset, positions=positions, impl=self.impl)
            if past:
                readers = self._attention_inputs(q, span)
                new_k, new_v = k, v
                (k,), _ = append_to_caches([cache["k"]], [k], dim=2, call_inputs=readers)
                (v,), _ = append_to_caches([cache["v"]], [v], dim=2, call_inputs=readers)
                if step is not None:
                    step.write(k, new_k, 2)
                    step.write(v, new_v, 2)
            if cache is not None:
                new_cache["k"], new_cache["v"] = k, v
                lengths = step.key_lengths if step is not None else first_lengths(cache, key_lengths, S, past)
                if lengths is not None:
                    new_cache["lengths"] = lengths
        o = self.attend(q, k, v, key_lengths=key_lengths, span=span, span_ramp=span_ramp, attn_mask=attn_mask,
                        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, q_offset=q_offset)
        out = self.out_proj(o.transpose(1, 2).reshape(B, S, self.n_head * self.head_dim))
        result = (out[0] if packed else out,)
        if need_weights:
            w = self.attend_weights(q, k, key_lengths=key_lengths, span=span, span_ramp=span_ramp,
                                    attn_mask=attn_mask, q_offset=q_offset)
            result += (average_weights(w, average_attn_weights),)
        if cache is not None:
            result += (new_cache,)
        return result[0] if len(result) == 1 else result

    def _forward_context_parallel(self, x: torch.Tensor, key_lengths, span, span_ramp, **unsupported):
        """``x (B, S_local, d_model)``, this rank's shard -> its shard of the output."""
        import torch.distributed as dist
        for name, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"MultiheadAttention with context_parallel_group does not "
                                          f"implement {name} (self-attention over the sharded x only)")
        check_input("x", x, self.d_model)
        group, layout = self.context_parallel_group, self.context_parallel_layout
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        B, S, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_head)
        k = self._heads(self.k_proj(x), self.n_kv_head)
        v = self._heads(self.v_proj(x), self.n_kv_head)
        if self.rotary is not None:  # the shard's tokens at their places in the whole sequence
            positions = distributed.shard_indices(S * world, world, rank, layout, device=x.device)
            q, k = self.rotary.rotate((q, k), positions=positions, impl=self.impl)
        o = distributed.ring_attention(q, k, v, group=group, layout=layout, param_grads="local",
                                       **self._options(key_lengths, span, span_ramp),
                                       **dropout_options(self.dropout, self.training, self.impl))
        return self.out_proj(o.transpose(1, 2).reshape(B, S, self.n_head * self.head_dim))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, "
                f"head_dim={self.head_dim}, causal={self.causal}, window={self.window}, "
                f"num_global={self.num_global}, softcap={self.softcap}, impl={self.impl!r}"
                + (f", dropout={self.dropout}" if self.dropout else ""))
