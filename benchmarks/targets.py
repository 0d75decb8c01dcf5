"""The performance targets the benchmark scripts print next to their measurements: the one
place they are defined.

Each target is named for what it measures; `direction` says which side passes:
">=" (the measured value must be at least `threshold`) or "<=" (at most). The scripts look
targets up by name (TARGETS["cpu_fwd_vs_sdpa_bias"]) and print a PASS/FAIL line per check;
a target of one device is printed for information only when the script runs on another.

Ratios of times are "peer time / fastattn time" (above 1: fastattn is faster) unless the
description says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    threshold: float
    direction: str  # ">=" or "<="

    def passes(self, value: float) -> bool:
        return value >= self.threshold if self.direction == ">=" else value <= self.threshold

    def verdict(self, value: Optional[float]) -> str:
        """PASS, FAIL, or n/a when nothing was measured."""
        if value is None:
            return "n/a"
        return "PASS" if self.passes(value) else "FAIL"

    @property
    def needed(self) -> str:
        return f"{self.direction} {self.threshold:g}"


_ALL = [
    # ---- attention with a learned bias table (bench_attention.py) --------------------------
    # CPU: B=1 H=8 S=2048 D=64 float32, table (511, 8)
    Target("cpu_fwd_vs_sdpa_bias",
           "forward: SDPA with the materialized bias time / fastattn time", 2.5, ">="),
    Target("cpu_fwd_vs_flex",
           "forward: compiled FlexAttention (table in score_mod) time / fastattn time", 2.0, ">="),
    Target("cpu_fwd_over_sdpa_no_bias",
           "forward: fastattn (with the table) time / SDPA without bias time", 1.15, "<="),
    Target("cpu_fwd_bwd_vs_sdpa_bias",
           "forward+backward: SDPA with the materialized bias time / fastattn time", 3.0, ">="),
    Target("cpu_fwd_bwd_over_sdpa_no_bias",
           "forward+backward: fastattn (with the table) time / SDPA without bias time", 1.3, "<="),
    Target("cpu_fwd_memory_beyond_io_mb",
           "forward at S=16384 H=8 D=64 float32: MB used beyond q, k, v and the output", 64.0, "<="),
    # CUDA: B=2 H=16 S=4096 D=128 bfloat16, table (511, 16)
    Target("cuda_fwd_bwd_vs_flex",
           "forward+backward: compiled FlexAttention (table in score_mod) time / fastattn time", 1.0, ">="),
    Target("cuda_fwd_bwd_vs_sdpa_flash",
           "forward+backward: SDPA flash backend (no bias) time / fastattn time (with the table)", 0.7, ">="),
    # any device
    Target("fwd_bwd_softcap_over_no_softcap",
           "forward+backward: fastattn softcap=30 time / the same call without softcap", 1.15, "<="),

    # ---- attention dropout and attention weights (bench_dropout.py) -----------------------
    # CPU: B=1 H=8 S=2048 D=64 float32, table (255, 8)
    Target("cpu_dropout_over_no_dropout",
           "forward+backward: fastattn dropout_p=0.1 time / the same call without dropout", 1.25, "<="),
    Target("cpu_dropout_vs_sdpa_bias",
           "forward+backward with dropout_p=0.1: SDPA with the materialized bias time / fastattn time",
           3.0, ">="),
    # CPU: one head, S=4096
    Target("cpu_weights_vs_softmax",
           "attention weights of one head at S=4096: softmax(q k^T scale + bias) time / "
           "fastattn.attention_weights time", 1.0, ">="),

    # ---- packed documents and a float attn_mask (bench_varlen.py) --------------------------
    # CPU: H=8 D=64 float32, forward+backward; 16 causal documents of 64..2048 tokens (seed 0)
    Target("cpu_varlen_over_per_document",
           "packed documents: attention_varlen time / the per-document attention calls' total time",
           1.1, "<="),
    Target("cpu_varlen_vs_padded",
           "packed documents: the padded batch with key_lengths time / attention_varlen time", 1.8, ">="),
    Target("cpu_varlen_vs_sdpa_block_mask",
           "packed documents: SDPA over the packed row with a block-diagonal causal bool mask time / "
           "attention_varlen time", 5.0, ">="),
    # CPU: S=2048, a (1, H, S, S) float attn_mask that requires grad, non-causal
    Target("cpu_mask_grad_vs_sdpa",
           "float attn_mask with a gradient: SDPA with the same mask time / fastattn time", 1.5, ">="),
    Target("cpu_mask_grad_over_no_mask",
           "float attn_mask with a gradient: fastattn with the mask time / fastattn without a mask time",
           1.4, "<="),

    # ---- sliding windows and adaptive spans (bench_window.py) -----------------------------
    # CPU: B=1 H=8 D=64 float32, forward
    Target("cpu_window_vs_flex",
           "window (256, 256) at S=8192: compiled FlexAttention (sliding-window BlockMask) time "
           "/ fastattn time", 1.5, ">="),
    Target("cpu_window_vs_sdpa_bool_mask",
           "window (256, 256) at S=8192: SDPA with a boolean (S, S) mask time / fastattn time", 10.0, ">="),
    Target("cpu_window_time_per_doubling",
           "fixed window (256, 256): time at 2S / time at S (4096 -> 8192 -> 16384)", 2.3, "<="),
    Target("cpu_span_vs_span_past_s",
           "S=8192: span past S time / span 64 ramp 32 time (the kernel skips the pairs "
           "the span hides)", 10.0, ">="),
    # CUDA: B=2 H=16 D=128 bfloat16, forward
    Target("cuda_window_tflops_vs_full",
           "TFLOP/s per unmasked pair: window (1024, 0) at S=16384 / no window at S=2048", 0.9, ">="),

    # ---- rotary (bench_rotary.py) ----------------------------------------------------------
    # B=4 H=32 S=2048 D=128; the eager formula reads interleaved pairs and writes the halves
    Target("cpu_rotary_fwd_bwd_vs_eager",
           "forward+backward: eager pairs-to-halves formula time / fastattn time", 10.0, ">="),
    Target("cpu_rotary_fwd_bwd_vs_compiled",
           "forward+backward: torch.compile of the same formula time / fastattn time", 2.0, ">="),
    Target("cpu_rotary_fwd_vs_copy",
           "forward bandwidth (read x, write y) / copy_ bandwidth of the same tensor", 0.5, ">="),
    Target("cuda_rotary_fwd_vs_copy",
           "forward bandwidth (read x, write y) / copy_ bandwidth of the same tensor, calls "
           "queued back to back", 0.7, ">="),
]

TARGETS: dict[str, Target] = {t.name: t for t in _ALL}

__all__ = ["Target", "TARGETS"]
