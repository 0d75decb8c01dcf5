"""Helpers shared by the ``fastattn.nn`` modules (not public API)."""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch

IMPLS = ("fused", "reference")


def ops(impl: str):
    """The function module that implements ``attention``/``rotary`` for ``impl``.

    ``"fused"`` -> :mod:`fastattn.functional` (the compiled kernels), ``"reference"`` ->
    :mod:`fastattn.reference` (pure PyTorch, same signatures). Imported lazily so that
    ``fastattn/__init__.py`` can import ``fastattn.nn`` without a cycle.
    """
    if impl == "reference":
        from .. import reference

        return reference
    from .. import functional

    return functional


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def check_positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} int, got {value}")
    return value


def check_window(window) -> Tuple[int, int]:
    """``window`` as a ``(left, right)`` pair of ints, checked when a module is built by the
    attention op's own checks (fastattn.functional.check_options)."""
    from .. import functional

    pair = functional._window(window)
    functional.check_options(window=pair)
    return pair


def check_dropout(dropout) -> float:
    """``dropout`` (the attention dropout probability) as a float in [0, 1)."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout must be a float in [0, 1), got {type(dropout).__name__} ({dropout!r})")
    if not 0.0 <= float(dropout) < 1.0:  # (NaN fails too)
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


def dropout_options(dropout: float, training: bool, impl: str) -> dict:
    """The attention call's dropout arguments: none outside training or at 0 (a call without
    them is the plain attention). The fused op draws its mask from torch's generator; the
    reference takes an explicit (seed, offset), drawn here from torch's default generator:
    the same distribution of masks, not the fused call's mask."""
    if not training or dropout == 0.0:
        return {}
    if impl == "reference":
        return dict(dropout_p=dropout, dropout_seed=torch.empty(2, dtype=torch.int64).random_())
    return dict(dropout_p=dropout)


def average_weights(weights: torch.Tensor, average: bool) -> torch.Tensor:
    """``(B, H, Sq, Sk)`` attention weights, or their mean over the heads ``(B, Sq, Sk)``."""
    return weights.mean(dim=1) if average else weights


def check_input(name: str, x: torch.Tensor, last_dim: int, what: str = "d_model") -> None:
    """Checks that ``x`` is a (B, S, last_dim) floating tensor; raises ValueError/TypeError."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (batch, seq, {what}={last_dim}), got a "
                         f"{x.dim()}-d tensor of shape {tuple(x.shape)}")
    if x.shape[-1] != last_dim:
        raise ValueError(f"{name} last dim must be {what}={last_dim}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_packed_input(x: torch.Tensor, d_model: int, cu_seqlens, max_seqlen, **unsupported) -> None:
    """Checks a packed batch for a module's forward: ``x (total, d_model)`` floating, with
    ``cu_seqlens`` (an int32 / int64 ``(n_seq + 1,)`` tensor) and ``max_seqlen`` given together;
    ``unsupported`` holds the forward arguments that packed input does not take (each must be
    None or False). attention_varlen checks the values of cu_seqlens and max_seqlen."""
    if cu_seqlens is None or max_seqlen is None:
        given, missing = ("cu_seqlens", "max_seqlen") if max_seqlen is None else ("max_seqlen", "cu_seqlens")
        raise ValueError(f"packed input needs both cu_seqlens and max_seqlen; got {given} without {missing}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
        raise TypeError(f"cu_seqlens must be a 1-d int32 or int64 tensor (n_seq + 1,), got a {cu_seqlens.dtype} "
                        f"tensor of shape {tuple(cu_seqlens.shape)}")
    for name, value in unsupported.items():
        if value is not None and value is not False:
            raise ValueError(f"{name} is not supported with packed input (cu_seqlens): each packed "
                             f"sequence attends to itself only; got {name}={_short(value)}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[-1] != d_model:
        raise ValueError(f"packed x must have shape (total, d_model={d_model}), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")


def _short(value) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The position of each token of a packed batch within its own sequence, ``(total,)`` int64:
    0, 1, ... restarting at every ``cu_seqlens`` boundary (rotary positions). Computed on the
    device, without reading cu_seqlens on the host."""
    cu = cu_seqlens.long()
    token = torch.arange(total, device=cu.device)
    sequence = torch.searchsorted(cu[1:], token, right=True)
    return token - cu[sequence]


def attend_packed(fns, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int, **options) -> torch.Tensor:
    """A packed batch's attention through ``fns.attention_varlen`` (``fns``: fastattn.functional
    or fastattn.reference), on the head-split tensors the modules build for it, ``(1, H, total,
    D)`` (the packed tokens as one row); returns ``(1, Hq, total, Dv)``, all views."""
    flat = [t[0].transpose(0, 1) for t in (q, k, v)]  # (total, H, D)
    out = fns.attention_varlen(*flat, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **options)
    return out.transpose(0, 1).unsqueeze(0)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi slopes (Press et al. 2022) for ``n_head`` heads, shape ``(n_head,)``.

    Geometric sequence ``2^(-8 (i+1) / n)`` for a power of two ``n``; otherwise the paper's
    interleaving of the closest power of two and the next one.
    """
    def pow2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if n_head & (n_head - 1) == 0:
        s = pow2(n_head)
    else:
        c = 2 ** math.floor(math.log2(n_head))
        s = pow2(c) + pow2(2 * c)[0::2][: n_head - c]
    return torch.tensor(s, dtype=torch.float32)


# The attribute of a cache buffer that says how many of its entries (along the cache's
# sequence dim) are in use; see append_to_caches.
_CACHE_FILLED = "_fastattn_cache_filled"


class CacheView(torch.Tensor):
    """A KV cache that ``append_to_caches`` returns: a view of the filled part of a buffer with
    room to grow. It behaves as a plain tensor (no ``__torch_function__`` layer; every op on it
    returns a plain tensor), except that pickling it (``torch.save``, ``copy.deepcopy``) writes
    only its own elements, not the whole buffer with its unused, uninitialized room; it loads
    back as a plain tensor."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def _compact(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).clone(memory_format=torch.contiguous_format)

    def __reduce_ex__(self, protocol):
        return torch.Tensor.__reduce_ex__(self._compact(), protocol)

    def __deepcopy__(self, memo):
        return self._compact()

    def __repr__(self, *, tensor_contents=None):
        return torch.Tensor.__repr__(self.as_subclass(torch.Tensor), tensor_contents=tensor_contents)


def append_to_caches(pasts: Sequence[torch.Tensor], news: Sequence[torch.Tensor], dim: int, *,
                     call_inputs: Sequence[Optional[torch.Tensor]] = ()
                     ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """``torch.cat([past, new], dim)`` for each pair of a growing KV cache, in amortized
    O(len(new)); also returns the caches' concatenation along their last dim.

    The caches it returns are views of one buffer that holds them side by side along the last
    dim (MLA's latent and rotary key; or a single tensor) and has room to grow along ``dim``
    (25% more than needed, at least 64 entries); as ``CacheView`` tensors, they pickle (torch.save,
    deepcopy) only their own elements, not that room. Appending to the most recent of them writes
    the new entries into that room instead of copying the whole cache on every decode step, and
    the joint concatenation is a view too. Anything else falls back to copies, so no tensor
    ever sees its entries change: older or sliced views (branching as in beam search, a
    rollback), torch.compile tracing, mixed dtypes or devices, and autograd recording.

    ``call_inputs`` are the other tensor inputs of the calls that read the returned caches (the
    attention's query, table, scale, span, ...; None entries are skipped). Autograd records such
    a call, and saves the caches for its backward, when grad mode is on and any of its inputs
    requires grad, even if the caches do not (only a table or a temperature trains): the caches
    are then plain concatenations, which a later step cannot change.
    """
    tensors = list(pasts) + list(news)
    if dim % pasts[0].dim() == pasts[0].dim() - 1:
        raise ValueError("append_to_caches: the caches are joined along their last dim; `dim` must be another")
    n_past, n_new = pasts[0].shape[dim], news[0].shape[dim]
    widths = [t.shape[-1] for t in pasts]
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*tensors, *call_inputs))
    if (recording or torch.compiler.is_compiling()
            or any(t.dtype != tensors[0].dtype or t.device != tensors[0].device for t in tensors)):
        parts = [torch.cat([p, n], dim) for p, n in zip(pasts, news)]
        return parts, parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def views_of(base) -> bool:  # pasts are the filled part of `base`, side by side
        if base is None or getattr(base, _CACHE_FILLED, None) != n_past or base.shape[-1] != sum(widths):
            return False
        if base.shape[dim] < n_past + n_new:
            return False
        filled = base.narrow(dim, 0, n_past)
        return all(p.data_ptr() == base.data_ptr() + off * base.element_size()
                   and p.stride() == base.stride() and p.shape == filled.narrow(-1, off, w).shape
                   for p, off, w in zip(pasts, offsets, widths))

    base = pasts[0]._base
    if not views_of(base):
        total = n_past + n_new
        shape = list(pasts[0].shape)
        shape[dim], shape[-1] = total + max(64, total // 4), sum(widths)
        base = pasts[0].new_empty(shape)
        for p, off, w in zip(pasts, offsets, widths):
            base.narrow(dim, 0, n_past).narrow(-1, off, w).copy_(p)
    for n, off, w in zip(news, offsets, widths):
        base.narrow(dim, n_past, n_new).narrow(-1, off, w).copy_(n)
    setattr(base, _CACHE_FILLED, n_past + n_new)
    joint = base.narrow(dim, 0, n_past + n_new).as_subclass(CacheView)
    return [joint.narrow(-1, off, w).as_subclass(CacheView) for off, w in zip(offsets, widths)], joint


class RowStep:
    """One call's positions when each row of a KV cache has its own length (``cache["lengths"]``:
    right-padded prompts, FlashAttention's ``cache_seqlens``). Row ``b`` holds ``lengths[b]``
    real entries; its ``S`` new tokens stand at positions ``lengths[b] .. lengths[b] + S - 1``
    and are written into the cache there (over the row's unused slots), so every rule of the
    attention (rotary, table, ALiBi, window, causal) sees each row's true positions and the
    slots past a row's end stay masked."""

    def __init__(self, lengths: torch.Tensor, n_new: int):
        steps = torch.arange(n_new, device=lengths.device)
        self.positions = lengths[:, None] + steps      # (B, S): rotary positions, and cache slots
        self.q_offset = lengths                         # query i of row b at lengths[b] + i
        self.key_lengths = lengths + n_new              # keys past the new tokens are unused slots

    def write(self, full: torch.Tensor, new: torch.Tensor, dim: int) -> None:
        """Puts ``new`` (S entries along ``dim``, batch first) at each row's positions in
        ``full``, in place: ``full`` is the cache after ``append_to_caches``, which put them at
        its end."""
        shape = [1] * full.dim()
        shape[0], shape[dim] = self.positions.shape
        index = self.positions.view(shape).expand(new.shape)
        full.scatter_(dim, index, new)


def row_step(cache: Optional[dict], key_lengths: Optional[torch.Tensor], batch: int, n_past: int,
             n_new: int, device: torch.device) -> Optional[RowStep]:
    """The RowStep of a self-attention call on ``cache`` (None when the cache holds no
    ``"lengths"``: every row then continues at ``n_past``). Checks the lengths a caller put in
    the cache; ``key_lengths`` cannot be combined with them (the lengths already say which keys
    are real)."""
    lengths = None if cache is None else cache.get("lengths")
    if lengths is None:
        return None
    if key_lengths is not None:
        raise ValueError("key_lengths must be None when the cache holds per-row lengths "
                         "(cache['lengths']): they already mark each row's real keys")
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache['lengths'] must be an int32 or int64 tensor, got {_short(lengths)}"
                        + (f" of dtype {lengths.dtype}" if isinstance(lengths, torch.Tensor) else ""))
    if tuple(lengths.shape) != (batch,) or lengths.device != device:
        raise ValueError(f"cache['lengths'] must have shape ({batch},) on {device}, got "
                         f"{tuple(lengths.shape)} on {lengths.device}")
    lengths = lengths.long()
    if batch and not torch.compiler.is_compiling():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > n_past:
            raise ValueError(f"cache['lengths'] must lie in [0, {n_past}] (the cache's filled "
                             f"entries), got values in [{lo}, {hi}]")
    return RowStep(lengths, n_new)


def first_lengths(cache: Optional[dict], key_lengths: Optional[torch.Tensor], n_new: int,
                  past: bool) -> Optional[torch.Tensor]:
    """The ``"lengths"`` a cache starts with: a call that starts a cache (``cache={}``) with
    ``key_lengths`` (right-padded prompts) records each row's real length, so that later
    calls append each row's tokens after its own end (RowStep)."""
    if cache is None or past or key_lengths is None:
        return None
    return key_lengths.long().clamp(0, n_new)
