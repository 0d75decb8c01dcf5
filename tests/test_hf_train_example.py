"""examples/hf_train.py: a few packed training steps of a tiny Llama with
attn_implementation="fastattn", each --bias, end to end (plot and sample)."""
import pytest
import torch

from conftest import load_example

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_train():
    return load_example("hf_train")


def test_packed_batch_layout(hf_train):
    docs = [torch.arange(5) + 10, torch.arange(3) + 20, torch.arange(7) + 30]
    b = hf_train.packed_batch(docs, 12, torch.Generator().manual_seed(0))
    ids, pos, labels = b["input_ids"][0], b["position_ids"][0], b["labels"][0]
    assert ids.shape == pos.shape == labels.shape == (12,)
    starts = (pos == 0).nonzero().flatten().tolist()
    assert starts[0] == 0 and all(labels[s] == -100 for s in starts)
    assert torch.equal(labels[pos != 0], ids[pos != 0])
    for s, e in zip(starts, starts[1:] + [12]):  # each piece is the start of one paragraph
        assert any(torch.equal(ids[s:e], d[: e - s]) for d in docs)


@pytest.mark.parametrize("bias", ["none", "table", "alibi"])
def test_main_runs_a_few_steps(hf_train, tmp_path, bias):
    plot = tmp_path / "curve.png"
    res = hf_train.main(["--steps", "3", "--tokens", "96", "--max-doc", "64", "--hidden", "32",
                         "--intermediate", "64", "--layers", "1", "--heads", "4", "--kv-heads", "2",
                         "--bias", bias, "--max-distance", "16", "--lr", "3e-3", "--plot", str(plot),
                         "--sample-bytes", "6", "--no-progress"])
    assert len(res["losses"]) == 3 and all(map(lambda v: v == v, res["losses"]))
    assert res["losses"][-1] < res["losses"][0]
    assert plot.exists() and plot.stat().st_size > 1000
    assert res["sample"].startswith("Once upon a time") and res["params"] > 0
