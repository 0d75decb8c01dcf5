"""Learned relative-position bias: a table of one value per (clamped) distance and head."""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_positive_int


class RelativePositionBias(nn.Module):
    """A learned bias per (clamped) relative distance and head.

    The table ``pos_bias`` has shape ``(2 * max_dist - 1, n_head)``; the bias between a query
    at position ``pq`` and a key at ``pk`` is ``pos_bias[clamp(pq - pk, 1 - max_dist,
    max_dist - 1) + max_dist - 1, h]``. The attention modules pass the table itself to the
    kernel (``attention(..., rel_bias=module.pos_bias)``), which never materializes the
    ``(Sq, Sk)`` bias; :meth:`forward` materializes it for inspection or plain-PyTorch use.

    Args:
        max_dist: distances are clamped to ``[-(max_dist - 1), max_dist - 1]``; >= 1.
        n_head: number of heads (columns of the table).
        init_std: the table starts at ``N(0, init_std^2)``; 0 (default) gives zeros.

    State dict: ``pos_bias``.
    """

    def __init__(self, max_dist: int, n_head: int, *, init_std: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        check_positive_int("max_dist", max_dist)
        check_positive_int("n_head", n_head)
        self.max_dist = max_dist
        self.n_head = n_head
        self.pos_bias = nn.Parameter(torch.zeros(2 * max_dist - 1, n_head, device=device, dtype=dtype))
        if init_std > 0:
            nn.init.normal_(self.pos_bias, std=init_std)

    @property
    def table(self) -> torch.Tensor:
        """The ``(2 * max_dist - 1, n_head)`` table, as passed to ``attention(rel_bias=...)``."""
        return self.pos_bias

    def forward(self, seq_len_q: int, seq_len_k: int) -> torch.Tensor:
        """Materialized bias ``(1, n_head, seq_len_q, seq_len_k)``.

        Positions are bottom-right aligned like the kernel: query ``i`` stands at
        ``i + seq_len_k - seq_len_q``.
        """
        dev = self.pos_bias.device
        pq = torch.arange(seq_len_q, device=dev) + (seq_len_k - seq_len_q)
        pk = torch.arange(seq_len_k, device=dev)
        d = pq[:, None] - pk[None, :]
        idx = d.clamp(1 - self.max_dist, self.max_dist - 1) + self.max_dist - 1
        return self.pos_bias[idx].permute(2, 0, 1).unsqueeze(0)

    @torch.no_grad()
    def update_dist(self, new_dist: int) -> None:
        """Change ``max_dist`` keeping what was learned.

        Distances both tables cover keep their learned values; a larger table is extended
        with the edge values (so the bias of every distance is unchanged: the old table
        clamped there anyway); a smaller table keeps the central distances. Device, dtype and
        ``requires_grad`` are kept. The parameter object is replaced, so rebuild the
        optimizer (or its param groups) afterwards.
        """
        check_positive_int("new_dist", new_dist)
        if new_dist == self.max_dist:
            return
        old = self.pos_bias
        d = torch.arange(1 - new_dist, new_dist, device=old.device)
        idx = d.clamp(1 - self.max_dist, self.max_dist - 1) + self.max_dist - 1
        self.pos_bias = nn.Parameter(old.detach()[idx].clone(), requires_grad=old.requires_grad)
        self.max_dist = new_dist

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint saved after update_dist() has another table size: adopt it.
        key = prefix + "pos_bias"
        t = state_dict.get(key)
        if t is not None and t.dim() == 2 and t.shape[1] == self.n_head and t.shape[0] % 2 == 1 \
                and t.shape[0] != self.pos_bias.shape[0]:
            self.update_dist((t.shape[0] + 1) // 2)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"max_dist={self.max_dist}, n_head={self.n_head}"
