"""Multi-head latent attention (DeepSeek-V2), expanded and absorbed paths."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ._common import (append_to_caches, attend_packed, average_weights, check_dropout, check_impl,
                      check_input, check_packed_input, check_positive_int, check_window, dropout_options,
                      first_lengths, ops, packed_positions, row_step)
from .rotary import RotaryEmbedding

Cache = Dict[str, torch.Tensor]


class MultiheadLatentAttention(nn.Module):
    """Multi-head latent attention (MLA, DeepSeek-V2, arXiv:2405.04434).

    Keys and values are compressed into one latent ``c = RMSNorm(W_dkv x)`` of
    ``kv_lora_rank`` dims, shared by all heads, and expanded per head by ``kv_b_proj``:
    ``k_nope[h] = W_uk[h] c`` (``qk_nope_head_dim``) and ``v[h] = W_uv[h] c``
    (``v_head_dim``). Position enters through a decoupled rotary key ``k_rope``
    (``qk_rope_head_dim`` dims, one head shared by all query heads) concatenated to the
    keys, and a per-head rotary query part. The score of head ``h`` is
    ``scale * (q_nope[h]·k_nope[h] + q_rope[h]·k_rope)`` with
    ``scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5``.

    Two equivalent paths (``forward(absorb=...)``):

    - expanded (default without a cache): materialize per-head ``k (B, H, Sk, dn + dr)``
      and ``v (B, H, Sk, dv)``, one attention call with ``Dqk != Dv``;
    - absorbed (default with a cache): fold ``W_uk`` into the query,
      ``q_lat[h] = W_uk[h]^T q_nope[h]`` (``kv_lora_rank`` dims), and attend with MQA
      (one KV head) directly over the latent: ``q = [q_lat, q_rope]``,
      ``k = [c, k_rope]``, ``v = c``; then ``o[h] = W_uv[h] o_lat[h]``. Only the latent
      and the rotary key are ever read, which is all the cache holds.

    Args:
        d_model: model width.
        n_head: heads.
        kv_lora_rank: latent dim ``d_c`` of the KV compression.
        q_lora_rank: if set, queries are low-rank too (``q_a_proj``, ``q_a_norm``,
            ``q_b_proj``); else one ``q_proj``.
        qk_nope_head_dim: per-head non-rotary q/k dim ``dn`` (default ``d_model // n_head``).
        qk_rope_head_dim: rotary q/k dim ``dr`` (even; default ``dn // 2``, rounded to even).
        v_head_dim: per-head value dim ``dv`` (default ``dn``).
        rope_base, interleaved: rotary options for the decoupled rotary part.
        causal, window: masking, as in :class:`MultiheadAttention`.
        dropout: attention dropout probability in [0, 1), in training mode only. The mask
            is indexed by (batch, query head, query, key), which both paths share, so for the
            same (seed, offset) they drop the same weights.
        impl: ``"fused"`` or ``"reference"``.

    Shapes: ``x (B, S, d_model)`` -> ``(B, S, d_model)``; a packed batch,
    ``forward(x, cu_seqlens=..., max_seqlen=...)`` with ``x (total, d_model)``, ->
    ``(total, d_model)`` (each sequence attends to itself, rotary positions restart at 0 in
    each; either path). With ``need_weights=True`` the forward also returns the attention
    weights as :class:`MultiheadAttention` does.

    State dict: ``q_proj`` (or ``q_a_proj``, ``q_a_norm``, ``q_b_proj``), ``kv_a_proj``
    (``d_model -> d_c + dr``), ``kv_a_norm``, ``kv_b_proj`` (``d_c -> H*(dn+dv)``, no bias:
    absorption needs a linear map), ``out_proj`` (``H*dv -> d_model``), ``rotary.inv_freq``.

    KV cache: pass ``cache={}`` to start; the module then returns ``(out, cache)`` with
    ``cache = {"latent": (B, S_past, d_c), "k_rope": (B, S_past, dr)}`` (normalized latent,
    rotated key) — nothing per head. Without autograd recording both are views of one buffer
    that holds them side by side and grows in place (see ``append_to_caches``), so a decode step
    copies neither the cache nor, on the absorbed path, their concatenation.
    """

    def __init__(self, d_model: int, n_head: int, kv_lora_rank: int, *,
                 q_lora_rank: Optional[int] = None, qk_nope_head_dim: Optional[int] = None,
                 qk_rope_head_dim: Optional[int] = None, v_head_dim: Optional[int] = None,
                 rope_base: float = 10000.0, interleaved: bool = False, causal: bool = True,
                 window: Tuple[int, int] = (-1, -1), dropout: float = 0.0, impl: str = "fused",
                 device=None, dtype=None):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_head", n_head)
        check_positive_int("kv_lora_rank", kv_lora_rank)
        if qk_nope_head_dim is None:
            if d_model % n_head != 0:
                raise ValueError(f"d_model must be divisible by n_head (or pass qk_nope_head_dim), "
                                 f"got d_model={d_model}, n_head={n_head}")
            qk_nope_head_dim = d_model // n_head
        check_positive_int("qk_nope_head_dim", qk_nope_head_dim)
        if qk_rope_head_dim is None:
            qk_rope_head_dim = max(2, (qk_nope_head_dim // 2) // 2 * 2)
        check_positive_int("qk_rope_head_dim", qk_rope_head_dim)
        if qk_rope_head_dim % 2 != 0:
            raise ValueError(f"qk_rope_head_dim must be even (rotary pairs), got {qk_rope_head_dim}")
        if v_head_dim is None:
            v_head_dim = qk_nope_head_dim
        check_positive_int("v_head_dim", v_head_dim)
        if q_lora_rank is not None:
            check_positive_int("q_lora_rank", q_lora_rank)
        self.d_model = d_model
        self.n_head = n_head
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.causal = bool(causal)
        self.window = check_window(window)
        self.dropout = check_dropout(dropout)
        self.impl = check_impl(impl)
        self.scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5
        fk = dict(device=device, dtype=dtype)
        dq = n_head * (qk_nope_head_dim + qk_rope_head_dim)
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, dq, bias=False, **fk)
        else:
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=False, **fk)
            self.q_a_norm = nn.RMSNorm(q_lora_rank, **fk)
            self.q_b_proj = nn.Linear(q_lora_rank, dq, bias=False, **fk)
        self.kv_a_proj = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False, **fk)
        self.kv_a_norm = nn.RMSNorm(kv_lora_rank, **fk)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_head * (qk_nope_head_dim + v_head_dim),
                                   bias=False, **fk)
        self.out_proj = nn.Linear(n_head * v_head_dim, d_model, bias=False, **fk)
        self.rotary = RotaryEmbedding(qk_rope_head_dim, rope_base, interleaved=interleaved, impl=impl)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))

    def absorbed_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``W_uk (H, dn, d_c)`` and ``W_uv (H, dv, d_c)``, views of ``kv_b_proj.weight``."""
        w = self.kv_b_proj.weight.view(self.n_head, self.qk_nope_head_dim + self.v_head_dim,
                                       self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def forward(self, x: torch.Tensor, *, cache: Optional[Cache] = None,
                absorb: Optional[bool] = None, key_lengths: Optional[torch.Tensor] = None,
                need_weights: bool = False, average_attn_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None):
        """``x (B, S, d_model)`` -> ``(B, S, d_model)``.

        Args:
            cache: ``{}`` to start decoding, then the returned cache (see class docstring).
            absorb: use the absorbed path; default True with a cache, False without.
            key_lengths: ``(B,)`` int, keys ``>= key_lengths[b]`` are masked. Starting a cache
                with it records per-row lengths (``cache["lengths"]``): later calls continue
                each row after its own end, as :class:`MultiheadAttention` does.
            need_weights: also return the attention weights (before dropout), ``(B, S, Sk)``
                averaged over the heads or ``(B, n_head, S, Sk)`` with
                ``average_attn_weights=False``.
            attn_mask: SDPA's mask as ``fastattn.attention`` takes it (bool: True may attend;
                float: added to the logits), broadcastable to ``(B, n_head, S, Sk)``; both
                paths apply it.
            cu_seqlens, max_seqlen: packed input ``x (total, d_model)``, as
                :meth:`MultiheadAttention.forward` takes it; returns ``(total, d_model)``.
                Without a cache, ``key_lengths``, ``attn_mask`` or ``need_weights``.

        Returns: ``out``; ``(out, weights)`` with ``need_weights``; a given ``cache`` adds the
        new cache last: ``(out, cache)`` or ``(out, weights, cache)``.
        """
        packed = cu_seqlens is not None or max_seqlen is not None
        positions = None
        if packed:
            check_packed_input(x, self.d_model, cu_seqlens, max_seqlen, cache=cache, key_lengths=key_lengths,
                               attn_mask=attn_mask, need_weights=need_weights)
            positions = packed_positions(cu_seqlens, x.shape[0])
            x = x.unsqueeze(0)  # the packed tokens as one row
        else:
            check_input("x", x, self.d_model)
        B, S, _ = x.shape
        H, dn, dr, dv, dc = (self.n_head, self.qk_nope_head_dim, self.qk_rope_head_dim,
                             self.v_head_dim, self.kv_lora_rank)
        q = self._query(x).view(B, S, H, dn + dr).transpose(1, 2)   # (B, H, S, dn+dr)
        q_nope, q_rope = q.split([dn, dr], dim=-1)
        c, k_rope = self.kv_a_proj(x).split([dc, dr], dim=-1)
        c = self.kv_a_norm(c)                                         # (B, S, dc)
        k_rope = k_rope.unsqueeze(1)                                  # (B, 1, S, dr)
        past = cache is not None and "latent" in cache
        offset = cache["latent"].shape[1] if past else 0
        step = row_step(cache, key_lengths, B, offset, S, x.device)
        q_offset = None
        if step is not None:
            positions, q_offset, key_lengths = step.positions, step.q_offset, step.key_lengths
        q_rope, k_rope = self.rotary.rotate((q_rope, k_rope), offset=offset, positions=positions, impl=self.impl)
        k_rope = k_rope.squeeze(1)                                    # (B, S, dr)
        latent_and_rope = None  # (B, Sk, dc + dr): [c, k_rope], the absorbed path's keys
        if past:
            # Read by the attention (with the query, and W_uk folded into it) or, expanded, by
            # kv_b_proj: a call autograd records when the query or kv_b_proj's weight requires grad.
            new_c, new_k_rope = c, k_rope
            (c, k_rope), latent_and_rope = append_to_caches(
                [cache["latent"], cache["k_rope"]], [c, k_rope], dim=1,
                call_inputs=(q, q_rope, self.kv_b_proj.weight))
            if step is not None:
                step.write(c, new_c, 1)
                step.write(k_rope, new_k_rope, 1)
                if latent_and_rope.data_ptr() != c.data_ptr():  # a concatenation, not a view of both
                    latent_and_rope = None
        if absorb is None:
            absorb = cache is not None
        kw = dict(scale=self.scale, causal=self.causal, window=self.window)
        if packed:
            def attention(q, k, v, **options):
                return attend_packed(ops(self.impl), q, k, v, cu_seqlens, max_seqlen, **options)
        else:
            attention = ops(self.impl).attention
            kw.update(key_lengths=key_lengths, attn_mask=attn_mask)
            if q_offset is not None:
                kw.update(q_offset=q_offset)
        drop = dropout_options(self.dropout, self.training, self.impl)
        Sk = c.shape[1]
        if absorb:
            w_uk, w_uv = self.absorbed_weights()
            q_lat = torch.einsum("bhsn,hnc->bhsc", q_nope, w_uk.to(q_nope.dtype))
            qa = torch.cat([q_lat, q_rope], dim=-1)                   # (B, H, Sq, dc+dr)
            if latent_and_rope is None:
                latent_and_rope = torch.cat([c, k_rope], dim=-1)
            ka = latent_and_rope.unsqueeze(1)                         # (B, 1, Sk, dc+dr)
            va = c.unsqueeze(1)                                       # (B, 1, Sk, dc)
            o_lat = attention(qa, ka, va, **kw, **drop)               # (B, H, Sq, dc)
            q_w, k_w = qa, ka
            o = torch.einsum("bhsc,hvc->bhsv", o_lat, w_uv.to(o_lat.dtype))
        else:
            kv = self.kv_b_proj(c).view(B, Sk, H, dn + dv).transpose(1, 2)
            k_nope, v = kv.split([dn, dv], dim=-1)                    # (B, H, Sk, dn), (.., dv)
            k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, H, Sk, dr)], dim=-1)
            qf = torch.cat([q_nope, q_rope], dim=-1)
            o = attention(qf, k, v, **kw, **drop)                     # (B, H, Sq, dv)
            q_w, k_w = qf, k
        out = self.out_proj(o.transpose(1, 2).reshape(B, S, H * dv))
        result = (out[0] if packed else out,)
        if need_weights:
            w = ops(self.impl).attention_weights(q_w, k_w, **kw)
            result += (average_weights(w, average_attn_weights),)
        if cache is not None:
            new_cache = {"latent": c, "k_rope": k_rope}
            lengths = step.key_lengths if step is not None else first_lengths(cache, key_lengths, S, past)
            if lengths is not None:
                new_cache["lengths"] = lengths
            result += (new_cache,)
        return result[0] if len(result) == 1 else result

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_head={self.n_head}, kv_lora_rank={self.kv_lora_rank}, "
                f"q_lora_rank={self.q_lora_rank}, qk_nope_head_dim={self.qk_nope_head_dim}, "
                f"qk_rope_head_dim={self.qk_rope_head_dim}, v_head_dim={self.v_head_dim}, "
                f"causal={self.causal}, impl={self.impl!r}"
                + (f", dropout={self.dropout}" if self.dropout else ""))
