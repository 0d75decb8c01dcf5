"""What the Hugging Face transformers tests share: tiny random-weight models of each
family, one copy per attention implementation with the same weights, and the tolerance that
eager attention's own float32 error sets."""
from __future__ import annotations

import copy

import torch

ATOL_FLOOR = 2e-5


def family_configs(transformers):
    """name -> (model class, config) of tiny random-weight models (2 layers, hidden 32-64)."""
    t = transformers
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    return {
        "llama": (t.LlamaForCausalLM, t.LlamaConfig(num_key_value_heads=2, **common)),
        "mistral": (t.MistralForCausalLM, t.MistralConfig(num_key_value_heads=2, sliding_window=5, **common)),
        "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config(
            num_key_value_heads=1, use_sliding_window=True, sliding_window=4, max_window_layers=1,
            layer_types=["sliding_attention", "full_attention"], **common)),
        "gemma2": (t.Gemma2ForCausalLM, t.Gemma2Config(
            num_key_value_heads=2, head_dim=16, sliding_window=4, attn_logit_softcapping=5.0,
            final_logit_softcapping=30.0, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"], **common)),
        "gpt_oss": (t.GptOssForCausalLM, t.GptOssConfig(
            num_key_value_heads=2, head_dim=16, sliding_window=4, num_local_experts=2,
            num_experts_per_tok=1, layer_types=["sliding_attention", "full_attention"],
            **{**common, "intermediate_size": 32})),
    }


def load_like(model, impl: str):
    """A copy of `model` (same weights) running attention implementation `impl`."""
    m = copy.deepcopy(model)
    m.set_attn_implementation(impl)
    return m


def build(cls, config, impls=("eager", "sdpa", "fastattn"), seed: int = 0, dtype=torch.float32):
    """{impl: model} with identical random weights, in eval mode. Implementations the model
    does not support (sdpa for Gemma 2 and GPT-OSS) are left out."""
    torch.manual_seed(seed)
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    base = cls(config).to(dtype).eval()
    with torch.no_grad():  # sinks and the like start at 0 or 1: make them matter
        for name, p in base.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn_like(p))
    out = {}
    for impl in impls:
        if impl == "sdpa" and not getattr(cls, "_supports_sdpa", False):
            continue
        out[impl] = load_like(base, impl)
    return out


def tolerance(eager: torch.Tensor, other: torch.Tensor, floor: float = ATOL_FLOOR) -> float:
    """What eager and another implementation of the same math (SDPA, or eager in float64)
    differ by, times 4, with a small floor."""
    return max(4 * float((eager.double() - other.double()).abs().max()), floor)


def eager64(model):
    """A float64 eager copy: the yardstick of eager's float32 error where SDPA is not
    supported."""
    m = load_like(model, "eager").double()
    if hasattr(m, "set_experts_implementation"):  # (grouped_mm has no float64 kernel)
        m.set_experts_implementation("eager")
    return m
