"""Rotary position embeddings: plain (optionally learned frequencies) and Givens-rotated.

Both modules hand the whole computation to ``fastattn.rotary`` (fused kernel) or
``fastattn.reference.rotary`` (``impl="reference"``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ._common import check_impl, check_positive_int, ops


def _inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021).

    Rotates pairs of dims of ``x (B, H, S, head_dim)`` by the angle ``pos * inv_freq[t]``.
    ``interleaved=False`` pairs ``(t, t + rotary_dim/2)`` (GPT-NeoX), ``True`` pairs
    ``(2t, 2t+1)`` (GPT-J); the output keeps the input's layout. Dims past ``rotary_dim``
    pass through unchanged.

    Args:
        head_dim: last dim of the inputs; must be even.
        base: frequency base, ``inv_freq[t] = base ** (-2t / rotary_dim)``.
        learned_freq: make ``inv_freq`` a trainable parameter (it gets gradients through
            the kernel) instead of a buffer.
        interleaved: pair layout, see above.
        rotary_dim: number of rotated dims (even, <= head_dim); default head_dim.
        impl: ``"fused"`` (``fastattn.functional``) or ``"reference"``.

    State dict: ``inv_freq`` (``(rotary_dim/2,)``, a parameter or a buffer).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, learned_freq: bool = False,
                 interleaved: bool = False, rotary_dim: Optional[int] = None, *,
                 impl: str = "fused"):
        super().__init__()
        check_positive_int("head_dim", head_dim)
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head_dim, got head_dim={head_dim}")
        if rotary_dim is None:
            rotary_dim = head_dim
        check_positive_int("rotary_dim", rotary_dim)
        if rotary_dim % 2 != 0 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim must be even and <= head_dim={head_dim}, got {rotary_dim}")
        if not base > 0:
            raise ValueError(f"base must be > 0, got {base}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.base = float(base)
        self.interleaved = bool(interleaved)
        self.learned_freq = bool(learned_freq)
        self.impl = check_impl(impl)
        inv = _inv_freq(rotary_dim, self.base)
        if learned_freq:
            self.inv_freq = nn.Parameter(inv)
        else:
            self.register_buffer("inv_freq", inv)

    def collapsed_rotation(self) -> Optional[torch.Tensor]:
        """The learned ``(head_dim, head_dim)`` rotation applied before RoPE (None here)."""
        return None

    def rotate(self, xs: Sequence[torch.Tensor], *, offset: int = 0,
               positions: Optional[torch.Tensor] = None,
               impl: Optional[str] = None) -> Tuple[torch.Tensor, ...]:
        """Applies the embedding to each tensor in ``xs`` (all at the same positions),
        computing any learned rotation once. Returns a tuple in the same order.
        ``impl`` overrides ``self.impl`` (the attention modules pass their own)."""
        rot = self.collapsed_rotation()
        fn = ops(self.impl if impl is None else impl).rotary
        out = []
        for x in xs:
            if x.dim() != 4 or x.shape[-1] != self.head_dim:
                raise ValueError(f"rotary input must have shape (B, H, S, head_dim={self.head_dim}), "
                                 f"got {tuple(x.shape)}")
            r = rot
            if r is not None and r.dtype not in (x.dtype, torch.float32):
                r = r.to(x.dtype)
            out.append(fn(x, inv_freq=self.inv_freq, positions=positions, offset=offset,
                          interleaved=self.interleaved, rotary_dim=self.rotary_dim, rotation=r))
        return tuple(out)

    def forward(self, x: torch.Tensor, *, offset: int = 0,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x (B, H, S, head_dim)`` -> rotated ``(B, H, S, head_dim)``.

        Positions are ``offset + arange(S)`` unless ``positions`` ``(S,)`` or ``(B, S)`` is given.
        """
        return self.rotate((x,), offset=offset, positions=positions)[0]

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"learned_freq={self.learned_freq}, interleaved={self.interleaved}, impl={self.impl!r}")


def givens_pairs(head_dim: int, n_rotations: int) -> torch.Tensor:
    """The planes ``(i, j)``, ``i < j``, of the Givens chain, shape ``(n_rotations, 2)``.

    Planes of neighbouring dims first (``(0,1), (1,2), ...``), then distance 2, and so on:
    every plane at most once, so up to ``head_dim * (head_dim - 1) / 2`` rotations.
    """
    pairs = [(i, i + g) for g in range(1, head_dim) for i in range(head_dim - g)]
    return torch.tensor(pairs[:n_rotations], dtype=torch.long).reshape(n_rotations, 2)


class GivensRotaryEmbedding(RotaryEmbedding):
    """A learned rotation followed by RoPE, with gradients for every learned part.

    A chain of ``n_rotations`` Givens rotations with learned angles ``thetas``, followed by a
    learned matrix ``rotation_matrix`` (initialized to the identity), both collapsed into one
    ``(head_dim, head_dim)`` matrix ``M = G_0 G_1 ... G_{n-1} W`` that the kernel applies
    before RoPE: ``y = rope(x @ M)``. The angles enter through ``torch.cos``/``torch.sin`` so
    they get gradients, and ``inv_freq`` is learned by default.

    Args:
        head_dim: last dim of the inputs; must be even.
        n_rotations: number of Givens rotations, ``0 <= n <= head_dim*(head_dim-1)/2``; the
            planes are :func:`givens_pairs`.
        base, learned_freq (default True), interleaved, rotary_dim, impl: as
            :class:`RotaryEmbedding`.
        learned_matrix: learn the full ``(head_dim, head_dim)`` matrix too (default True).
        init_std: initial angles ``N(0, init_std^2)``; 0 (default) starts at the identity.

    State dict: ``inv_freq``, ``thetas (n_rotations,)``, ``rotation_matrix (head_dim, head_dim)``
    (a parameter, or a buffer when ``learned_matrix=False``), ``rotation_pairs (n_rotations, 2)``.
    """

    def __init__(self, head_dim: int, n_rotations: int, base: float = 10000.0,
                 learned_freq: bool = True, interleaved: bool = False,
                 rotary_dim: Optional[int] = None, *, learned_matrix: bool = True,
                 init_std: float = 0.0, impl: str = "fused"):
        super().__init__(head_dim, base=base, learned_freq=learned_freq, interleaved=interleaved,
                         rotary_dim=rotary_dim, impl=impl)
        check_positive_int("n_rotations", n_rotations, allow_zero=True)
        max_rot = head_dim * (head_dim - 1) // 2
        if n_rotations > max_rot:
            raise ValueError(f"n_rotations must be <= head_dim*(head_dim-1)/2 = {max_rot} "
                             f"(head_dim={head_dim}), got {n_rotations}")
        self.n_rotations = n_rotations
        self.thetas = nn.Parameter(torch.zeros(n_rotations))
        if init_std > 0:
            nn.init.normal_(self.thetas, std=init_std)
        eye = torch.eye(head_dim)
        self.learned_matrix = bool(learned_matrix)
        if learned_matrix:
            self.rotation_matrix = nn.Parameter(eye)
        else:
            self.register_buffer("rotation_matrix", eye)
        self.register_buffer("rotation_pairs", givens_pairs(head_dim, n_rotations))

    def givens_matrix(self) -> torch.Tensor:
        """The product ``G_0 G_1 ... G_{n-1}`` of the Givens rotations, ``(head_dim, head_dim)``."""
        D = self.head_dim
        th = self.thetas
        n = th.shape[0]
        eye = torch.eye(D, device=th.device, dtype=th.dtype)
        if n == 0:
            return eye
        ei = torch.nn.functional.one_hot(self.rotation_pairs[:, 0], D).to(th.dtype)
        ej = torch.nn.functional.one_hot(self.rotation_pairs[:, 1], D).to(th.dtype)
        diag = ei[:, :, None] * ei[:, None, :] + ej[:, :, None] * ej[:, None, :]
        skew = ej[:, :, None] * ei[:, None, :] - ei[:, :, None] * ej[:, None, :]
        c = torch.cos(th)[:, None, None]
        s = torch.sin(th)[:, None, None]
        # G_k = I + (cos - 1)(e_i e_i^T + e_j e_j^T) + sin(e_j e_i^T - e_i e_j^T)
        g = eye + (c - 1.0) * diag + s * skew
        # ordered product by pairwise tree reduction (static shapes: compile-friendly)
        while g.shape[0] > 1:
            if g.shape[0] % 2 == 1:
                g = torch.cat([g, eye[None]], 0)
            g = g[0::2] @ g[1::2]
        return g[0]

    def collapsed_rotation(self) -> torch.Tensor:
        """The collapsed ``(head_dim, head_dim)`` matrix ``givens_matrix() @ rotation_matrix``."""
        return self.givens_matrix() @ self.rotation_matrix.to(self.thetas.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", n_rotations={self.n_rotations}, learned_matrix={self.learned_matrix}"
