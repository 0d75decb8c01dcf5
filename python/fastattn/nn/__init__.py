"""``torch.nn`` modules of the attention family, on the fastattn kernels.

Every module takes ``impl="fused"`` (default: ``fastattn.functional``, the compiled kernels)
or ``impl="reference"`` (``fastattn.reference``, pure PyTorch with the same math);
:func:`set_impl` switches a whole model.

- :class:`RelativePositionBias` — learned bias table per relative distance and head.
- :class:`RotaryEmbedding` — RoPE, optionally with learned frequencies.
- :class:`GivensRotaryEmbedding` — learned Givens chain x learned matrix, then RoPE.
- :class:`MultiheadAttention` — MHA / GQA / MQA, self / cross, rotary, bias, ALiBi,
  learnable temperature, causal, window, KV cache.
- :class:`MultiheadLatentAttention` — DeepSeek-V2 MLA with the absorbed decode path.
- :class:`AdaptiveSpanAttention` — learned per-head span with span loss.
- :class:`HybridAttention` — global branch + predicted-span local branch.
"""

from __future__ import annotations

from torch import nn as _nn

from ._common import alibi_slopes, check_impl as _check_impl
from .attention import MultiheadAttention
from .bias import RelativePositionBias
from .latent import MultiheadLatentAttention
from .rotary import GivensRotaryEmbedding, RotaryEmbedding, givens_pairs
from .span import AdaptiveSpanAttention, HybridAttention

__all__ = [
    "RelativePositionBias",
    "RotaryEmbedding",
    "GivensRotaryEmbedding",
    "MultiheadAttention",
    "MultiheadLatentAttention",
    "AdaptiveSpanAttention",
    "HybridAttention",
    "set_impl",
    "alibi_slopes",
    "givens_pairs",
]


def set_impl(module: _nn.Module, impl: str) -> _nn.Module:
    """Set ``impl`` (``"fused"`` or ``"reference"``) on every fastattn module inside ``module``.

    Returns ``module``.
    """
    _check_impl(impl)
    for m in module.modules():
        if isinstance(m, (RotaryEmbedding, MultiheadAttention, MultiheadLatentAttention,
                          HybridAttention)):
            m.impl = impl
    return module
