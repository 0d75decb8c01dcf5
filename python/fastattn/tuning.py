"""Switches of the CUDA attention kernels, for tests and profiling only.

The library reads them once per process from the environment (FASTATTN_CUDA_KV_SPLITS,
FASTATTN_CUDA_RESCALE_SLACK, FASTATTN_CUDA_UNORDERED_DQ; see csrc/common/cuda_tuning.h); within
a process, `cuda_tuning` changes them for a block of code:

    with fastattn.tuning.cuda_tuning(kv_splits=1):   # the forward without split-KV
        out = fastattn.attention(q, k, v)

kv_splits: the forward's split-KV part count (0: the library's choice, 1: no split, N: N parts).
rescale_slack: the forward's lazy-rescale slack in [0, 8] (base 2; 0 rescales whenever a row's
    max grows). unordered_dq: drop the backward's fixed dQ order (not bitwise reproducible).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

__all__ = ["cuda_tuning", "get_cuda_tuning"]


def get_cuda_tuning(ops=None) -> dict:
    """The current switches, as a dict."""
    ops = ops if ops is not None else torch.ops.fastattn
    kv_splits, rescale_slack, unordered_dq = ops._cuda_tuning()
    return dict(kv_splits=kv_splits, rescale_slack=rescale_slack, unordered_dq=unordered_dq)


@contextlib.contextmanager
def cuda_tuning(kv_splits: Optional[int] = None, rescale_slack: Optional[float] = None,
                unordered_dq: Optional[bool] = None, *, ops=None):
    """Sets the given switches for the block (the others keep their values), then restores them.
    `ops`: the op namespace whose switches to change (default torch.ops.fastattn; the CUDA
    emulator's in its tests)."""
    ops = ops if ops is not None else torch.ops.fastattn
    before = get_cuda_tuning(ops)
    after = dict(before)
    for name, value in (("kv_splits", kv_splits), ("rescale_slack", rescale_slack),
                        ("unordered_dq", unordered_dq)):
        if value is not None:
            after[name] = value
    ops._set_cuda_tuning(int(after["kv_splits"]), float(after["rescale_slack"]), bool(after["unordered_dq"]))
    try:
        yield
    finally:
        ops._set_cuda_tuning(before["kv_splits"], before["rescale_slack"], before["unordered_dq"])
