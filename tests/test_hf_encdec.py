"""fastattn as a Hugging Face transformers backend: encoders and encoder-decoders against eager.

BERT (bidirectional, padding), BART (encoder-decoder, cross-attention) and T5 (relative
position bias: the dense bias as attn_mask, and with patch_t5 a fastattn table built from the
model's embedding). Tolerances: 4x what eager and SDPA differ by on the same inputs.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastattn.integrations.transformers as fa_hf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_common import build, load_like, tolerance  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _registered():
    fa_hf.register()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def configs():
    t = transformers
    return {
        "bert": (t.BertModel, t.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=64, initializer_range=0.1)),
        "bart": (t.BartForConditionalGeneration, t.BartConfig(
            vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=1, init_std=0.1)),
        # max_distance 6 < the sequences' 20 tokens: the buckets saturate inside the call
        "t5": (t.T5ForConditionalGeneration, t.T5Config(
            vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=6, decoder_start_token_id=0,
            pad_token_id=0, initializer_factor=1.0)),
    }


_MODELS = {}


def models(name):
    if name not in _MODELS:
        cls, config = configs()[name]
        ms = build(cls, config)
        if name == "t5":
            ms["patched"] = load_like(ms["eager"], "fastattn")
            assert fa_hf.patch_t5(ms["patched"]) == 6  # 2 with an embedding, 4 without (2 self, 2 cross)
            assert fa_hf.patch_t5(ms["patched"]) == 6 and ms["patched"].encoder.block[0].layer[0].SelfAttention._fastattn_patched
        _MODELS[name] = ms
    return _MODELS[name]


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 128, (2, 20), generator=g)
    y = torch.randint(3, 128, (2, 12), generator=g)
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, 14:] = 0
    return x, am, y


def run(name, model, x, am, y, **kw):
    if name == "bert":
        return model(input_ids=x, attention_mask=am, **kw).last_hidden_state
    return model(input_ids=x, attention_mask=am, decoder_input_ids=y, **kw).logits


@pytest.mark.parametrize("name", ["bert", "bart", "t5"])
def test_outputs_match_eager(name):
    ms = models(name)
    x, am, y = inputs()
    with torch.no_grad():
        out = {impl: run(name, m, x, am, y) for impl, m in ms.items()}
    rows = am.bool() if name == "bert" else torch.ones(2, 12, dtype=torch.bool)
    tol = tolerance(out["eager"][rows], out["sdpa"][rows])
    for impl in [k for k in out if k not in ("eager", "sdpa")]:
        err = float((out[impl] - out["eager"])[rows].abs().max())
        assert err <= tol, f"{name} {impl}: {err:.3g} > {tol:.3g}"
    if name == "bart":  # cross-attention sees the encoder's padding: ignoring it would show
        with torch.no_grad():
            unmasked = ms["fastattn"](input_ids=x, decoder_input_ids=y).logits
        assert float((unmasked - out["fastattn"])[1].abs().max()) > 100 * tol


def test_t5_bias_is_applied():
    ms = models("t5")
    x, am, y = inputs()
    m = load_like(ms["patched"], "fastattn")
    fa_hf.patch_t5(m)
    with torch.no_grad():
        m.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
        m.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
        flat = run("t5", m, x, am, y)
        biased = run("t5", ms["patched"], x, am, y)
    assert float((flat - biased).abs().max()) > 1e-2


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_table_equals_compute_bias_at_every_distance(bidirectional):
    """The table with fastattn's clamp gives T5's bucketed bias for distances far past
    max_distance, at any past offset (decoding)."""
    ms = models("t5")
    stack = ms["eager"].encoder if bidirectional else ms["eager"].decoder
    layer = stack.block[0].layer[0].SelfAttention
    with torch.no_grad():
        table = fa_hf.T5RelativeBias(layer, 0).table()
        m = table.shape[0] // 2 + 1
        assert m == layer.relative_attention_max_distance + 1
        for sq, sk, past in ((30, 30, 0), (1, 41, 40), (5, 45, 40)):
            dense = layer.compute_bias(sq, sk, past_seen_tokens=past)[0]  # (H, Sq, Sk)
            d = (torch.arange(sq)[:, None] + past) - torch.arange(sk)[None, :]
            from_table = table[d.clamp(-(m - 1), m - 1) + m - 1].permute(2, 0, 1)
            assert torch.equal(from_table, dense)


@pytest.mark.parametrize("name", ["bert", "bart", "t5"])
def test_training_step_matches_eager(name):
    ms = {k: load_like(m, "fastattn" if k == "patched" else k).train() for k, m in models(name).items()}
    if "patched" in ms:
        fa_hf.patch_t5(ms["patched"])
    for m in ms.values():  # dropout off: the gradients of one function
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        if hasattr(m.config, "dropout_rate"):
            m.config.dropout_rate = 0.0
        for mod in m.modules():
            if hasattr(mod, "dropout") and isinstance(mod.dropout, float):
                mod.dropout = 0.0
    x, am, y = inputs(1)
    grads = {}
    for impl, m in ms.items():
        m.zero_grad(set_to_none=True)
        out = run(name, m, x, am, y)
        loss = (out.float() ** 2).mean() if name == "bert" else torch.nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    names = grads["eager"].keys()
    assert len(names) > 10
    if name == "t5":
        assert any("relative_attention_bias" in n for n in grads["patched"])
    for impl in [k for k in grads if k not in ("eager", "sdpa")]:
        assert grads[impl].keys() == names
        for n in names:
            ge, gs = grads["eager"][n], grads["sdpa"][n]
            tol = tolerance(ge, gs, 1e-6 + 1e-5 * float(ge.abs().max()))
            err = float((grads[impl][n] - ge).abs().max())
            assert err <= tol, f"{name} {impl} grad {n}: {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("name", ["bart", "t5"])
def test_greedy_generate_matches_eager(name, cache):
    ms = models(name)
    x, am, _ = inputs()
    out = {impl: m.generate(input_ids=x, attention_mask=am, max_new_tokens=10, do_sample=False,
                            cache_implementation=cache) for impl, m in ms.items()}
    for impl in out:
        assert out[impl].tolist() == out["eager"].tolist(), impl


def test_bert_output_attentions_match_eager():
    ms = models("bert")
    x, am, _ = inputs()
    with torch.no_grad():
        e = ms["eager"](input_ids=x, attention_mask=am, output_attentions=True).attentions
        f = ms["fastattn"](input_ids=x, attention_mask=am, output_attentions=True).attentions
    assert len(e) == len(f) == 2
    for we, wf in zip(e, f):
        assert float((we - wf).abs().max()) <= 1e-5
