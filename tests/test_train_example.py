"""examples/train_lm.py: a few training steps of each attention variant make the loss fall."""

import inspect

import pytest
import torch

import fastattn
from conftest import load_example


def _fused_ops_registered() -> bool:
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        return all(has(f"fastattn::{op}", "CPU") for op in ("attention", "rotary"))
    except Exception:
        return False


# Dropout in the fused op (fastattn.attention(dropout_p=...)); without it, fused models train
# with dropout 0.
FUSED_DROPOUT = _fused_ops_registered() and "dropout_p" in inspect.signature(fastattn.attention).parameters


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train_lm():
    return load_example("train_lm")


@pytest.fixture(scope="module")
def data(train_lm):
    return train_lm.CharData()


@pytest.mark.parametrize("attn", ["mha", "gqa", "mla", "hybrid", "adaptive-span"])
def test_loss_decreases(train_lm, data, attn):
    torch.manual_seed(0)
    impl = "fused" if _fused_ops_registered() else "reference"
    model = train_lm.CharLM(data.vocab_size, attn, d_model=32, n_head=4, n_layer=1, seq_len=32,
                            impl=impl)
    losses, tps, _ = train_lm.train_steps(model, data, 30, batch_size=8, seq_len=32, lr=1e-2,
                                          progress=False)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(map(lambda v: v == v, losses)), "NaN loss"
    assert last < first - 0.4, f"{attn}: loss {first:.3f} -> {last:.3f} did not fall"
    assert tps > 0


@pytest.mark.parametrize("impl", ["reference", pytest.param("fused", marks=pytest.mark.skipif(
    not FUSED_DROPOUT, reason="fastattn.attention has no dropout_p in this build"))])
@pytest.mark.parametrize("attn", ["mha", "mla"])
def test_loss_decreases_with_dropout(train_lm, data, attn, impl):
    torch.manual_seed(0)
    model = train_lm.CharLM(data.vocab_size, attn, d_model=32, n_head=4, n_layer=1, seq_len=32,
                            impl=impl, dropout=0.1)
    x, _ = data.batch("train", 4, 32, torch.Generator().manual_seed(0), "cpu")
    assert not torch.equal(model(x), model(x)), "training mode: each call draws a new mask"
    losses, _, _ = train_lm.train_steps(model, data, 30, batch_size=8, seq_len=32, lr=1e-2,
                                        progress=False)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.4, f"{attn}: loss {first:.3f} -> {last:.3f} did not fall"
    model.eval()
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)  # no dropout in eval mode


def test_main_end_to_end(train_lm, tmp_path):
    plot = tmp_path / "curve.png"
    res = train_lm.main(["--attn", "gqa", "--steps", "6", "--eval-every", "3", "--batch-size", "4",
                         "--seq-len", "16", "--d-model", "32", "--n-layer", "1",
                         "--bench-steps", "1", "--sample-chars", "8", "--no-progress",
                         "--impl", "reference", "--plot", str(plot),
                         "--dropout", "0.1" if FUSED_DROPOUT else "0"])
    assert plot.exists() and plot.stat().st_size > 1000
    assert len(res["losses"]) == 6 and [s for s, _ in res["val"]] == [3, 6]
    assert res["throughput"]["reference"] > 0
    assert "fused" in res["throughput"]
    if _fused_ops_registered():
        assert res["throughput"]["fused"] > 0


def test_generate_with_cache_matches_without(train_lm, data):
    torch.manual_seed(0)
    for attn in ("mha", "mla"):
        model = train_lm.CharLM(data.vocab_size, attn, d_model=32, n_head=4, n_layer=2,
                                seq_len=32, impl="reference").eval()
        idx = torch.randint(data.vocab_size, (1, 12))
        full = model(idx)
        logits, caches = model(idx[:, :5], [{} for _ in model.blocks])
        steps = [logits]
        for t in range(5, 12):
            logits, caches = model(idx[:, t:t + 1], caches)
            steps.append(logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
        # sampling past seq_len rebuilds the cache instead of leaving the trained positions
        out = model.generate(idx[:, :3], 70, gen=torch.Generator().manual_seed(0))
        assert out.shape == (1, 73) and int(out.max()) < data.vocab_size
