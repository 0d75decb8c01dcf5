"""fastattn as a Hugging Face transformers backend: decoder-only families against eager.

Tiny random-weight models (built here, nothing downloaded): Llama (GQA, RoPE), Mistral
(sliding window), Qwen2 (sliding and full layers), Gemma 2 (softcap, window), GPT-OSS (sinks).
Logits must equal attn_implementation="eager" within 4x what eager and SDPA (or, for the
families SDPA does not support, eager in float64) differ by on the same inputs.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastattn  # noqa: E402
import fastattn.integrations.transformers as fa_hf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_common import ATOL_FLOOR, build, eager64, family_configs, load_like, tolerance  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gpt_oss")


@pytest.fixture(autouse=True, scope="module")
def _registered():
    fa_hf.register()
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: one thread is fastest on a shared machine
    yield
    torch.set_num_threads(n)


_MODELS = {}


def models(family):
    if family not in _MODELS:
        cls, config = family_configs(transformers)[family]
        _MODELS[family] = build(cls, config)
    return _MODELS[family]


def tokens(batch=2, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def padding(kind, batch=2, length=16):
    am = torch.ones(batch, length, dtype=torch.long)
    if kind == "right":
        am[1, 11:] = 0
    elif kind == "left":
        am[1, :5] = 0
    return am


def yardstick(family, ms, x, am=None):
    """tolerance(): eager against SDPA, or against eager in float64 (on an unpadded batch:
    float64 eager turns fully masked padded rows into NaN)."""
    with torch.no_grad():
        if "sdpa" in ms:
            return tolerance(ms["eager"](x, attention_mask=am).logits, ms["sdpa"](x, attention_mask=am).logits)
        ref = eager64(ms["eager"])(x).logits
        return tolerance(ms["eager"](x).logits, ref)


# ---------------------------------------------------------------------------------------------
def test_import_fastattn_does_not_import_transformers():
    code = "import sys, fastattn; assert 'transformers' not in sys.modules, 'imported'; print('ok')"
    # the fastattn this process imported (the source tree's, or the installed package)
    where = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    env = dict(os.environ, PYTHONPATH=where + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_register_is_idempotent_and_checks_the_name():
    assert fa_hf.register() == "fastattn" and fa_hf.register() == "fastattn"
    assert transformers.AttentionInterface._global_mapping["fastattn"] is fa_hf.attention_forward
    assert transformers.AttentionMaskInterface._global_mapping["fastattn"] is fa_hf.attention_mask
    with pytest.raises(ValueError, match="sdpa"):
        fa_hf.register("sdpa")
    with pytest.raises(TypeError, match="name must be a str"):
        fa_hf.register(3)


@pytest.mark.parametrize("pad", ["none", "right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_eager(family, pad):
    ms = models(family)
    x, am = tokens(), padding(pad)
    valid = am.bool()
    with torch.no_grad():
        eager = ms["eager"](x, attention_mask=am).logits
        fast = ms["fastattn"](x, attention_mask=am).logits
    tol = yardstick(family, ms, x, am)
    err = float((eager - fast)[valid].abs().max())
    assert err <= tol, f"{family} {pad}: |eager - fastattn| = {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_window_off_by_one_would_be_seen(family):
    # The comparison above can tell a window of w from w +- 1: eager itself moves by far more.
    cls, config = family_configs(transformers)[family]
    ms = models(family)
    x = tokens()
    with torch.no_grad():
        base = ms["eager"](x).logits
        for w in (config.sliding_window - 1, config.sliding_window + 1):
            other = load_like(ms["eager"], "eager")
            other.config.sliding_window = w
            for layer in other.model.layers:
                if getattr(layer.self_attn, "sliding_window", None) is not None:
                    layer.self_attn.sliding_window = w
            assert float((other(x).logits - base).abs().max()) > 100 * yardstick(family, ms, x)


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_eager(family, cache):
    ms = models(family)
    x, am = tokens(length=8), padding("left", length=8)
    out = {impl: ms[impl].generate(x, attention_mask=am, max_new_tokens=12, do_sample=False,
                                   cache_implementation=cache, pad_token_id=0, return_dict_in_generate=True,
                                   output_logits=True)
           for impl in ("eager", "fastattn")}
    assert out["fastattn"].sequences.shape[1] == 20
    assert out["fastattn"].sequences.tolist() == out["eager"].sequences.tolist()
    # every step's logits, not just their argmax (a decode step that saw an unfilled cache slot
    # would move them)
    tol = yardstick(family, ms, x)
    for step_e, step_f in zip(out["eager"].logits, out["fastattn"].logits):
        assert float((step_e - step_f).abs().max()) <= tol


def _pack(lengths, seed=1):
    """(input_ids (1, total), position_ids (1, total), the sequences)"""
    seqs = [tokens(1, n, seed + i) for i, n in enumerate(lengths)]
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return torch.cat(seqs, 1), pos, seqs


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt_oss"])
def test_packed_matches_unpacked(family):
    ms = models(family)
    lengths = [7, 12, 5]
    ids, pos, seqs = _pack(lengths)
    with torch.no_grad():
        # (transformers detects packing only without a cache)
        packed = ms["fastattn"](ids, position_ids=pos, use_cache=False).logits[0]
        eager_packed = ms["eager"](ids, position_ids=pos, use_cache=False).logits[0]
        alone = torch.cat([ms["fastattn"](s).logits[0] for s in seqs])
        eager_alone = torch.cat([ms["eager"](s).logits[0] for s in seqs])
    tol = yardstick(family, ms, seqs[1])
    assert float((packed - eager_packed).abs().max()) <= tol
    if family != "gpt_oss":
        # (GPT-OSS's eager run itself differs packed and unpacked, by its mixture of experts)
        assert float((packed - alone).abs().max()) <= tol
        assert float((packed - eager_alone).abs().max()) <= tol
    # packing is not ignored: one unpacked causal row differs
    with torch.no_grad():
        whole = ms["fastattn"](ids, use_cache=False).logits[0]
    assert float((whole - packed).abs().max()) > 100 * tol


def test_packed_with_flash_kwargs_from_the_collator():
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)
    ms = models("llama")
    seqs = [tokens(1, n, 5 + i)[0].tolist() for i, n in enumerate([9, 4, 11])]
    batch = collator([{"input_ids": s} for s in seqs])
    assert {"cu_seq_lens_q", "max_length_q", "position_ids"} <= set(batch)
    calls = []

    def spy(module, *args, **kwargs):
        calls.append(kwargs.get("cu_seq_lens_q"))
        return fa_hf.attention_forward(module, *args, **kwargs)

    transformers.AttentionInterface.register("fastattn_spy", spy)
    transformers.AttentionMaskInterface.register("fastattn_spy", fa_hf.attention_mask)
    m = load_like(ms["fastattn"], "fastattn_spy")
    kw = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")}
    with torch.no_grad():
        packed = m(batch["input_ids"], use_cache=False, **kw).logits[0]
        alone = torch.cat([ms["eager"](torch.tensor([s])).logits[0] for s in seqs])
    assert calls and calls[0] is not None
    assert float((packed - alone).abs().max()) <= yardstick("llama", ms, tokens())
    bad = dict(kw, cu_seq_lens_q=torch.tensor([0, 10, 24], dtype=torch.int32),
               cu_seq_lens_k=torch.tensor([0, 10, 24], dtype=torch.int32))
    with torch.no_grad(), pytest.raises(ValueError, match="disagree"):
        m(batch["input_ids"], use_cache=False, **bad)


def test_torch_compile_padded_and_packed_match_eager():
    """torch.compile of a model running on fastattn (the masks' host reads break the graph
    where transformers' own code reads them; attention_varlen itself is one op): logits equal
    the uncompiled model's, padded and packed, and the packed training step's gradients too."""
    ms = models("llama")
    m = ms["fastattn"]
    ids, pos, _ = _pack([7, 12, 5])
    x, am = tokens(), padding("right")
    torch._dynamo.reset()
    compiled = torch.compile(m)
    try:
        with torch.no_grad():
            for kw in (dict(input_ids=ids, position_ids=pos, use_cache=False), dict(input_ids=x, attention_mask=am)):
                want, got = m(**kw).logits, compiled(**kw).logits
                assert float((got - want).abs().max()) <= yardstick("llama", ms, x, am)
        m.train()
        grads = []
        for model in (m, compiled):
            m.zero_grad(set_to_none=True)
            model(ids, position_ids=pos, use_cache=False, labels=ids).loss.backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        for n, g in grads[0].items():
            torch.testing.assert_close(grads[1][n], g, atol=1e-5, rtol=1e-4)
    finally:
        m.eval()
        m.zero_grad(set_to_none=True)
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
def _loss_and_grads(model, x, am=None):
    model.zero_grad(set_to_none=True)
    labels = x.masked_fill(am == 0, -100) if am is not None else x
    loss = model(x, attention_mask=am, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_tolerances(ms, x, am):
    """tolerance() of the loss and of each gradient: eager against SDPA, or eager against
    float64 eager on the unpadded batch (float64 eager turns fully masked rows into NaN)."""
    if "sdpa" in ms:
        e, r = _loss_and_grads(ms["eager"], x, am), _loss_and_grads(ms["sdpa"], x, am)
    else:
        e, r = _loss_and_grads(ms["eager"], x), _loss_and_grads(eager64(ms["eager"]).train(), x)
    return tolerance(e[0], r[0], 1e-6), {
        n: tolerance(g, r[1][n], 1e-6 + 1e-5 * float(g.abs().max())) for n, g in e[1].items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt_oss"])
def test_training_step_matches_eager(family):
    ms = {k: load_like(m, k).train() for k, m in models(family).items()}
    x, am = tokens(), padding("right")
    loss_e, g_e = _loss_and_grads(ms["eager"], x, am)
    loss_f, g_f = _loss_and_grads(ms["fastattn"], x, am)
    loss_tol, tols = _grad_tolerances(ms, x, am)
    assert g_f.keys() == g_e.keys() and len(g_f) > 0
    assert abs(float(loss_f - loss_e)) <= loss_tol
    for name in g_e:
        tol = tols[name]
        err = float((g_f[name] - g_e[name]).abs().max())
        assert err <= tol, f"{family} grad {name}: {err:.3g} > {tol:.3g}"
    if family == "gpt_oss":  # the sinks learn through the kernel's lse
        sinks = [n for n in g_f if n.endswith("sinks")]
        assert sinks and all(float(g_f[n].abs().max()) > 1e-4 for n in sinks)


def test_dropout_trains_and_differs_from_no_dropout():
    cls, config = family_configs(transformers)["llama"]
    config = config.__class__(**{**config.to_dict(), "attention_dropout": 0.3})
    torch.manual_seed(0)
    model = load_like(cls(config), "fastattn").train()
    x = tokens(4, 16)
    with torch.no_grad():
        a, b = model(x).logits, model(x).logits
    assert not torch.equal(a, b), "training mode draws a new dropout mask per call"
    _, g_drop = _loss_and_grads(model, x)
    model.config.attention_dropout = 0.0
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.0
    _, g_plain = _loss_and_grads(model, x)
    assert all(torch.isfinite(g).all() for g in g_drop.values())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert float((g_drop[name] - g_plain[name]).abs().max()) > 1e-3 * float(g_plain[name].abs().max())
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(x).logits)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])
def test_bfloat16_within_eager_error(family):
    ms = models(family)
    x, am = tokens(), padding("left")
    valid = am.bool()
    with torch.no_grad():
        exact = ms["eager"](x, attention_mask=am).logits
        errs = {}
        for impl in ("eager", "fastattn"):
            m = load_like(ms[impl], impl).to(torch.bfloat16)
            errs[impl] = float((m(x, attention_mask=am).logits.float() - exact)[valid].abs().max())
    assert errs["fastattn"] <= 2 * errs["eager"] + 1e-3, errs


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])
def test_output_attentions_match_eager(family):
    ms = models(family)
    x, am = tokens(), padding("right")
    with torch.no_grad():
        e = ms["eager"](x, attention_mask=am, output_attentions=True).attentions
        f = ms["fastattn"](x, attention_mask=am, output_attentions=True).attentions
    assert len(e) == len(f) == 2
    for we, wf in zip(e, f):
        assert wf is not None and wf.shape == we.shape
        # the real query rows (padded rows of eager spread their weight over every key)
        rows = am.bool()[:, None, :, None]
        assert float(((we - wf) * rows).abs().max()) <= 1e-5


def test_user_4d_mask_is_passed_as_attn_mask():
    ms = models("llama")
    x = tokens()
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, 16, 16, generator=g) > 0.3
    mask |= torch.eye(16, dtype=torch.bool)  # every query sees a key
    # eager adds a 4-D mask to the logits: it takes the float form (0 / dtype min); SDPA
    # reads either. fastattn passes both to the kernel as attn_mask.
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        e = ms["eager"](x, attention_mask=additive).logits
        s = ms["sdpa"](x, attention_mask=mask).logits
        f_float = ms["fastattn"](x, attention_mask=additive).logits
        f_bool = ms["fastattn"](x, attention_mask=mask).logits
        causal = ms["fastattn"](x).logits
    tol = tolerance(e, s)
    assert float((e - f_float).abs().max()) <= tol
    assert float((e - f_bool).abs().max()) <= tol
    assert float((causal - f_bool).abs().max()) > 100 * tol


def test_unknown_mask_patterns_fall_back_to_the_dense_mask():
    mu = transformers.masking_utils

    def every_other(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx % 2) == 0

    for fn in (mu.and_masks(mu.causal_mask_function, every_other),
               mu.or_masks(mu.causal_mask_function, every_other),
               mu.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long))):
        got = fa_hf.attention_mask(2, 6, 6, mask_function=fn, use_vmap=True)
        want = mu.sdpa_mask(batch_size=2, q_length=6, kv_length=6, mask_function=fn, allow_is_causal_skip=False,
                            use_vmap=True)
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)


@pytest.mark.parametrize("window", [1, 3])
def test_recognized_patterns_equal_the_dense_mask(window):
    """Each AttentionSpec, expanded by fastattn's own rules, is the mask sdpa_mask builds."""
    mu = transformers.masking_utils
    am = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]]).bool()
    cases = [(mu.causal_mask_function, 5, 8, 3, 0), (mu.sliding_window_causal_mask_function(window), 5, 8, 3, 0),
             (mu.bidirectional_mask_function, 8, 8, 0, 0),
             (mu.sliding_window_bidirectional_mask_function(window), 8, 8, 0, 0),
             (mu.sliding_window_causal_mask_function(window), 2, 6, 6, 2)]
    for fn, sq, sk, qo, ko in cases:
        pad = am[:, : sk + ko]
        spec = fa_hf.attention_mask(3, sq, sk, qo, ko, mask_function=fn, attention_mask=pad)
        assert isinstance(spec, fa_hf.AttentionSpec), spec
        want = mu.sdpa_mask(batch_size=3, q_length=sq, kv_length=sk, q_offset=qo, kv_offset=ko, mask_function=fn,
                            attention_mask=pad, allow_is_causal_skip=False)
        q = torch.randn(3, 1, sq, 4)
        k = torch.randn(3, 1, sk, 4)
        w = fastattn.attention_weights(q, k, causal=spec.causal, window=spec.window, key_lengths=spec.key_lengths,
                                       attn_mask=spec.key_mask, q_offset=qo, k_offset=ko)
        assert torch.equal(w > 0, want.expand(3, 1, sq, sk)), (fn, spec)


def test_bad_input_raises():
    ms = models("llama")
    attn = ms["fastattn"].model.layers[0].self_attn
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="4-D"):
        fa_hf.attention_forward(attn, q, k, k, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="AttentionSpec"):
        fa_hf.attention_forward(attn, q, k, k, object())
    with pytest.raises(ValueError, match="s_aux"):
        fa_hf.attention_forward(attn, q, k, k, None, s_aux=torch.zeros(3))
    spec = fa_hf.attention_mask(1, 4, 5)
    with pytest.raises(ValueError, match="describes"):
        fa_hf.attention_forward(attn, q, k, k, spec)
    with pytest.raises(ValueError, match="go together"):
        fa_hf.attention_forward(attn, q, k, k, None, cu_seq_lens_q=torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="2-D"):
        fa_hf.attention_mask(1, 5, 5, attention_mask=torch.ones(1, 1, 5, 5))
    train = load_like(ms["fastattn"], "fastattn").train()
    for layer in train.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="output_attentions"):
        train(tokens(), output_attentions=True)
    with pytest.raises(ValueError, match="patch_t5"):
        fa_hf.patch_t5(ms["eager"])


# ---------------------------------------------------------------------------------------------
def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Dense attention with the module's fastattn tables (fastattn.reference), for the tests of
    add_relative_bias / add_alibi: causal when the mask is None, else the mask alone."""
    opts = dict(scale=scaling, rel_bias=getattr(module, "fastattn_rel_bias", None),
                alibi_slopes=getattr(module, "fastattn_alibi_slopes", None))
    if attention_mask is None:
        opts["causal"] = True
    else:
        opts["attn_mask"] = attention_mask
    out = fastattn.reference.attention(query, key, value, **opts)
    return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("bias", ["table", "alibi"])
def test_attached_tables_match_the_reference(bias):
    transformers.AttentionInterface.register("fastattn_reference_test", _reference_attention)
    transformers.AttentionMaskInterface.register("fastattn_reference_test", transformers.masking_utils.sdpa_mask)
    base = load_like(models("llama")["eager"], "fastattn")
    if bias == "table":
        mods = fa_hf.add_relative_bias(base, 6, std=0.5)
    else:
        mods = fa_hf.add_alibi(base, learnable=True)
    assert len(mods) == 2
    ref = load_like(base, "fastattn_reference_test")
    x = tokens()
    _, g_f = _loss_and_grads(base, x)
    _, g_r = _loss_and_grads(ref, x)
    with torch.no_grad():
        plain = models("llama")["fastattn"](x).logits
        f, r = base(x).logits, ref(x).logits
    tol = yardstick("llama", models("llama"), x)
    assert float((f - r).abs().max()) <= tol
    assert float((f - plain).abs().max()) > 100 * tol  # the bias is applied
    name = "model.layers.0.self_attn." + ("fastattn_rel_bias" if bias == "table" else "fastattn_alibi_slopes")
    assert float(g_f[name].abs().max()) > 0
    torch.testing.assert_close(g_f[name], g_r[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_static_cache_without_attention_mask(family):
    # No padding mask to hide the cache's unfilled slots: the positions alone must (the cache's
    # length is a tensor it updates in place, during the layers).
    ms = models(family)
    x = tokens(2, 10)
    logits = {}
    for impl in ("eager", "fastattn"):
        cache = transformers.StaticCache(config=ms[impl].config, max_cache_len=24)
        with torch.no_grad():
            steps = [ms[impl](x[:, :6], cache=cache, use_cache=True).logits]
            for t in range(6, 10):
                steps.append(ms[impl](x[:, t:t + 1], cache=cache, use_cache=True).logits)
        logits[impl] = torch.cat(steps, 1)
    assert float((logits["eager"] - logits["fastattn"]).abs().max()) <= yardstick(family, ms, x)
