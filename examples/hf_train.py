#!/usr/bin/env python
"""A Hugging Face transformers Llama trained with attn_implementation="fastattn", on packed
sequences.

Builds a Llama-style model from a config (default ~20M parameters: hidden 512, 7 layers,
8 query heads, 2 kv heads), byte-level (vocabulary 256, no tokenizer to download), and trains
it on the paragraphs of examples/data/tales.txt packed back to back: each step is one row of
--tokens tokens holding whole paragraphs, with position_ids restarting at each paragraph, as
transformers' DataCollatorWithFlattening lays them out; fastattn runs each paragraph as its
own sequence (fastattn.attention_varlen), so no token attends across a paragraph boundary and
no compute goes to padding. At the end it saves the loss curve and greedily continues a prompt.

    python examples/hf_train.py                                  # 300 steps, RoPE only
    python examples/hf_train.py --bias table --steps 200         # + a learned relative table
    python examples/hf_train.py --bias alibi --plot alibi.png    # + ALiBi slopes

--bias adds a fastattn bias on top of Llama's RoPE in every attention layer: "table" a learned
(2 * --max-distance - 1, heads) relative-position table per layer
(fastattn.integrations.transformers.add_relative_bias), "alibi" fixed ALiBi slopes (add_alibi).
Both are attributes of the attention modules that the fastattn attention function reads; eager
and SDPA attention would ignore them, so they need attn_implementation="fastattn".
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

try:  # a source checkout without an install: use python/ next to this file
    import fastattn  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import fastattn  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "tales.txt")


def paragraphs(path: str, max_len: int) -> list:
    """The text's paragraphs as byte tensors, each cut to at most max_len bytes."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    docs = [p.strip().encode("utf-8") for p in text.split("\n\n") if p.strip()]
    return [torch.tensor(list(d[:max_len]), dtype=torch.long) for d in docs]


def packed_batch(docs: list, tokens: int, gen: torch.Generator) -> dict:
    """One packed row of `tokens` tokens: random paragraphs back to back (the last one cut to
    fit), position_ids restarting at each, and labels that never predict a paragraph's first
    token from the previous paragraph (DataCollatorWithFlattening's layout)."""
    ids, pos, labels, n = [], [], [], 0
    while n < tokens:
        d = docs[int(torch.randint(len(docs), (1,), generator=gen))][: tokens - n]
        ids.append(d)
        pos.append(torch.arange(len(d)))
        lab = d.clone()
        lab[0] = -100
        labels.append(lab)
        n += len(d)
    return {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(pos)[None],
            "labels": torch.cat(labels)[None]}


def build_model(args):
    import transformers

    import fastattn.integrations.transformers as fa_hf

    fa_hf.register()
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        attention_dropout=args.dropout, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="fastattn")
    if args.bias == "table":
        fa_hf.add_relative_bias(model, args.max_distance)
    elif args.bias == "alibi":
        fa_hf.add_alibi(model)
    return model


def save_plot(losses: list, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.5, label="train (per step)")
    k = max(1, len(losses) // 20)
    if len(losses) >= 2 * k > 1:
        mean = [sum(losses[i - k:i]) / k for i in range(k, len(losses) + 1)]
        ax.plot(range(k, len(losses) + 1), mean, lw=1.5, label=f"train ({k}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per step (one packed row)")
    p.add_argument("--max-doc", type=int, default=1024, help="longest paragraph kept (bytes)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=7)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--bias", choices=("none", "table", "alibi"), default="none")
    p.add_argument("--max-distance", type=int, default=128, help="--bias table: distances the table tells apart")
    p.add_argument("--dropout", type=float, default=0.0, help="attention dropout (training steps)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--plot", default=None, help="loss-curve PNG (default examples/hf_train_<bias>.png)")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--sample-bytes", type=int, default=120)
    p.add_argument("--no-progress", action="store_true")
    return p


def train(model, docs, args) -> list:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 10)

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, desc=f"hf llama, fastattn, bias={args.bias}", dynamic_ncols=True)
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        batch = packed_batch(docs, args.tokens, gen)
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            tps = (step + 1) * args.tokens / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:,.0f}")
            bar.update()
    if bar is not None:
        bar.close()
    return losses


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("steps", "tokens", "max_doc", "max_distance"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    docs = paragraphs(args.data, args.max_doc)
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.1f}M parameters, {len(docs)} paragraphs, {args.tokens} tokens per step, "
          f"{torch.get_num_threads()} threads")
    losses = train(model, docs, args)
    plot = args.plot or os.path.join(HERE, f"hf_train_{args.bias}.png")
    save_plot(losses, plot, f"HF Llama {n_params / 1e6:.1f}M, fastattn, packed, bias={args.bias}")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; loss curve saved to {plot}")
    model.eval()
    prompt = torch.tensor([list(args.prompt.encode("utf-8"))])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=args.sample_bytes, do_sample=False)
    sample = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    print("sample:", sample)
    return {"losses": losses, "plot": plot, "sample": sample, "params": n_params}


if __name__ == "__main__":
    main()
