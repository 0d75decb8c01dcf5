#!/usr/bin/env python
"""Character-level language model on fastattn.nn modules.

Trains a small pre-LayerNorm transformer on examples/data/tales.txt (original prose shipped
with the repository) and shows that the attention modules train:

    python examples/train_lm.py                        # MHA, default run (< 5 min on 2 CPU cores)
    python examples/train_lm.py --attn mla --steps 300
    python examples/train_lm.py --attn hybrid --plot hybrid.png

--attn picks the attention: mha (rotary MHA), gqa (rotary GQA, 2 KV heads), mla
(DeepSeek-V2 latent attention), hybrid (global + predicted-span local), adaptive-span.
--dropout sets the attention dropout of every layer (training steps only; 0 turns it off).
Runs on CUDA when present, else CPU. A tqdm bar shows loss and tokens/s; at the end the script
prints train/validation loss, saves the loss curve (PNG), samples some text (with a KV cache
where the module has one), and times a few training steps of the same model with
impl="fused" (fastattn kernels) and impl="reference" (pure PyTorch) for a tokens/s
comparison in the same run.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn

try:  # a source checkout without an install: use python/ next to this file
    import fastattn  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import fastattn  # noqa: F401
from fastattn import nn as fnn

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "tales.txt")
ATTN_KINDS = ("mha", "gqa", "mla", "hybrid", "adaptive-span")


# ----------------------------------------------------------------------------------- data
class CharData:
    """Characters of a text file as int64 ids, split 90/10 into train/validation."""

    def __init__(self, path: str = DEFAULT_DATA, text: Optional[str] = None):
        if text is None:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n = int(0.9 * len(ids))
        self.train, self.val = ids[:n], ids[n:]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def batch(self, split: str, batch_size: int, seq_len: int, gen: torch.Generator, device):
        """``(x, y)``: ``(batch_size, seq_len)`` inputs and next-character targets."""
        src = self.train if split == "train" else self.val
        ix = torch.randint(len(src) - seq_len - 1, (batch_size,), generator=gen)
        off = torch.arange(seq_len + 1)
        chunk = src[ix[:, None] + off[None, :]]
        return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


# ----------------------------------------------------------------------------------- model
def make_attention(kind: str, d_model: int, n_head: int, seq_len: int, impl: str,
                   dropout: float = 0.0) -> nn.Module:
    """The attention module for ``--attn kind`` (all causal), with attention dropout."""
    if kind == "mha":
        return fnn.MultiheadAttention(d_model, n_head, causal=True, rotary="rope", dropout=dropout,
                                      impl=impl)
    if kind == "gqa":
        return fnn.MultiheadAttention(d_model, n_head, max(1, n_head // 2), causal=True,
                                      rotary="rope", dropout=dropout, impl=impl)
    if kind == "mla":
        hd = d_model // n_head
        return fnn.MultiheadLatentAttention(d_model, n_head, kv_lora_rank=max(8, d_model // 2),
                                            qk_nope_head_dim=hd, qk_rope_head_dim=max(2, hd // 2),
                                            v_head_dim=hd, causal=True, dropout=dropout, impl=impl)
    if kind == "hybrid":
        return fnn.HybridAttention(d_model, n_head, max_span=max(4, seq_len // 4),
                                   span_ramp=max(2, seq_len // 16), causal=True, rotary="rope",
                                   dropout=dropout, impl=impl)
    if kind == "adaptive-span":
        return fnn.AdaptiveSpanAttention(d_model, n_head, max_span=seq_len,
                                         span_ramp=max(2, seq_len // 8), span_init=0.5,
                                         span_loss_coef=1e-4, causal=True, rotary="rope",
                                         dropout=dropout, impl=impl)
    raise ValueError(f"--attn must be one of {ATTN_KINDS}, got {kind!r}")


class Block(nn.Module):
    def __init__(self, attn: nn.Module, d_model: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = attn
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x, cache=None):
        if cache is None:
            x = x + self.attn(self.ln1(x))
        else:
            a, cache = self.attn(self.ln1(x), cache=cache)
            x = x + a
        return x + self.mlp(self.ln2(x)), cache


class CharLM(nn.Module):
    """Token embedding -> ``n_layer`` pre-LN blocks -> LayerNorm -> tied output head.
    Positions come from the attention (rotary / MLA's decoupled rotary / span masks);
    ``dropout`` is the attention dropout of every layer (in training mode)."""

    def __init__(self, vocab_size: int, attn: str = "mha", d_model: int = 128, n_head: int = 4,
                 n_layer: int = 2, seq_len: int = 128, impl: str = "fused", dropout: float = 0.0):
        super().__init__()
        self.attn_kind = attn
        self.seq_len = seq_len
        self.emb = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            Block(make_attention(attn, d_model, n_head, seq_len, impl, dropout), d_model)
            for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.emb.weight
        nn.init.normal_(self.emb.weight, std=0.02)

    @property
    def supports_cache(self) -> bool:
        return self.attn_kind != "hybrid"

    def forward(self, idx: torch.Tensor, caches: Optional[List[Dict]] = None):
        """``idx (B, S)`` -> logits ``(B, S, vocab)`` (and the new caches if given)."""
        x = self.emb(idx)
        new = []
        for i, blk in enumerate(self.blocks):
            x, c = blk(x, None if caches is None else caches[i])
            new.append(c)
        logits = self.head(self.ln_f(x))
        return logits if caches is None else (logits, new)

    def aux_loss(self) -> torch.Tensor:
        """Span losses of the adaptive-span layers (0 otherwise)."""
        losses = [m.span_loss() for m in self.modules() if isinstance(m, fnn.AdaptiveSpanAttention)]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.emb.weight.device)

    def after_step(self) -> None:
        for m in self.modules():
            if isinstance(m, fnn.AdaptiveSpanAttention):
                m.clamp_span_()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_new: int, temperature: float = 0.8,
                 gen: Optional[torch.Generator] = None) -> torch.Tensor:
        """Samples ``n_new`` characters after ``prompt (1, S)``.

        With a KV cache (all but hybrid) one token is decoded per step; positions stay within
        the trained ``seq_len``: when the cache is full it is rebuilt from the last
        ``seq_len // 2`` characters. Hybrid re-runs the last ``seq_len`` characters."""
        was_training = self.training
        self.eval()
        out = prompt[:, -self.seq_len:]

        def prefill(ctx):
            return self(ctx, [{} for _ in self.blocks])

        if self.supports_cache:
            logits, caches = prefill(out)
        else:
            logits = self(out)
        for _ in range(n_new):
            p = torch.softmax(logits[:, -1].float() / temperature, dim=-1)
            nxt = torch.multinomial(p.cpu(), 1, generator=gen).to(prompt.device)
            out = torch.cat([out, nxt], dim=1)
            if not self.supports_cache:
                logits = self(out[:, -self.seq_len:])
            elif caches[0] and _cache_len(caches[0]) >= self.seq_len:
                logits, caches = prefill(out[:, -(self.seq_len // 2):])
            else:
                logits, caches = self(nxt, caches)
        self.train(was_training)
        return out


def _cache_len(cache: Dict) -> int:
    t = cache["latent"] if "latent" in cache else cache["k"]
    return t.shape[1] if "latent" in cache else t.shape[2]


# ----------------------------------------------------------------------------------- training
def train_steps(model: CharLM, data: CharData, steps: int, *, batch_size: int, seq_len: int,
                lr: float = 3e-3, device="cpu", seed: int = 0, progress: bool = True,
                desc: str = "train", optimizer: Optional[torch.optim.Optimizer] = None,
                eval_every: int = 0, eval_fn=None):
    """Runs ``steps`` AdamW steps (warm-up then cosine decay to lr/10) on random windows.

    Every ``eval_every`` steps (and at the end) ``eval_fn()`` is called and its value recorded.
    Returns ``(losses, tokens_per_s, evals)``: per-step train losses, the training tokens/s
    (evaluation time excluded) and ``[(step, eval_fn()), ...]``."""
    gen = torch.Generator().manual_seed(seed)
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99),
                                         weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc=desc, dynamic_ncols=True, file=sys.stdout)
    losses, evals = [], []
    model.train()
    t0 = time.perf_counter()
    ntok, t_eval = 0, 0.0
    for step in range(1, steps + 1):
        x, y = data.batch("train", batch_size, seq_len, gen, device)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        (loss + model.aux_loss()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.after_step()
        losses.append(loss.item())
        ntok += x.numel()
        if bar is not None:
            dt = time.perf_counter() - t0 - t_eval
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                            tok_s=f"{ntok / max(dt, 1e-9):,.0f}")
            bar.update(1)
        if eval_fn is not None and ((eval_every > 0 and step % eval_every == 0) or step == steps):
            te = time.perf_counter()
            evals.append((step, eval_fn()))
            t_eval += time.perf_counter() - te
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0 - t_eval
    if bar is not None:
        bar.close()
    return losses, ntok / max(dt, 1e-9), evals


@torch.no_grad()
def evaluate(model: CharLM, data: CharData, *, batch_size: int, seq_len: int, device, iters: int = 8,
             split: str = "val") -> float:
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    tot = 0.0
    for _ in range(iters):
        x, y = data.batch(split, batch_size, seq_len, gen, device)
        tot += nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item()
    model.train()
    return tot / iters


def throughput(model: CharLM, data: CharData, impl: str, *, steps: int, batch_size: int,
               seq_len: int, device) -> float:
    """Training tokens/s of a copy of ``model`` switched to ``impl`` (1 warm-up step)."""
    m = fnn.set_impl(copy.deepcopy(model), impl)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    train_steps(m, data, 1, batch_size=batch_size, seq_len=seq_len, device=device,
                progress=False, optimizer=opt)
    _, tps, _ = train_steps(m, data, steps, batch_size=batch_size, seq_len=seq_len, device=device,
                         progress=False, optimizer=opt, seed=1)
    return tps


def save_plot(losses: List[float], val_points, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.4 if len(losses) >= 100 else 1.0, label="train (per step)")
    k = len(losses) // 50
    if k > 1:
        sm = torch.tensor(losses).unfold(0, k, 1).mean(1).tolist()
        ax.plot(range(k, len(losses) + 1), sm, lw=1.5, label=f"train ({k}-step mean)")
    if val_points:
        xs, ys = zip(*val_points)
        ax.plot(xs, ys, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--attn", choices=ATTN_KINDS, default="mha")
    p.add_argument("--data", default=DEFAULT_DATA, help="text file to train on")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dropout", type=float, default=0.1,
                   help="attention dropout probability during training (0: off)")
    p.add_argument("--impl", choices=("fused", "reference"), default="fused",
                   help="attention implementation used for training")
    p.add_argument("--bench-steps", type=int, default=10,
                   help="timed training steps per impl for the fused-vs-reference tokens/s (0: skip)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--sample-chars", type=int, default=300)
    p.add_argument("--plot", default=None, help="loss-curve PNG (default examples/train_lm_<attn>.png)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = CharData(args.data)
    model = CharLM(data.vocab_size, args.attn, args.d_model, args.n_head, args.n_layer,
                   args.seq_len, impl=args.impl, dropout=args.dropout).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"fastattn char-LM: attn={args.attn} impl={args.impl} dropout={args.dropout} device={device} "
          f"params={n_params:,} vocab={data.vocab_size} train_chars={len(data.train):,} "
          f"threads={torch.get_num_threads()}")
    bs, sl = args.batch_size, args.seq_len
    print(f"initial val loss {evaluate(model, data, batch_size=bs, seq_len=sl, device=device):.3f} "
          f"(uniform: {math.log(data.vocab_size):.3f})")

    t0 = time.perf_counter()
    losses, tps, val_points = train_steps(
        model, data, args.steps, batch_size=bs, seq_len=sl, lr=args.lr, device=device,
        seed=args.seed, progress=not args.no_progress, desc=f"train {args.attn}",
        eval_every=args.eval_every,
        eval_fn=lambda: evaluate(model, data, batch_size=bs, seq_len=sl, device=device))
    train_time = time.perf_counter() - t0
    first = sum(losses[:20]) / len(losses[:20])
    last = sum(losses[-20:]) / len(losses[-20:])
    print(f"trained {args.steps} steps in {train_time:.1f}s ({tps:,.0f} tokens/s, "
          f"impl={args.impl}); train loss {first:.3f} -> {last:.3f}; "
          f"val loss {val_points[-1][1]:.3f}")
    if isinstance(model.blocks[0].attn, fnn.AdaptiveSpanAttention):
        spans = [f"{s:.1f}" for s in model.blocks[-1].attn.span().tolist()]
        print(f"learned spans (last layer, tokens): {spans}")

    plot = args.plot or os.path.join(HERE, f"train_lm_{args.attn}.png")
    save_plot(losses, val_points, plot, f"char-LM, attn={args.attn}, impl={args.impl}")
    print(f"loss curve saved to {plot}")

    if args.sample_chars > 0:
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.tensor([[data.stoi[c] for c in "The "]], device=device)
        text = data.decode(model.generate(prompt, args.sample_chars, gen=g)[0].tolist())
        print("sample" + (" (KV-cache decoding)" if model.supports_cache else "") + ":\n" + text)

    result = {"losses": losses, "val": val_points, "train_tokens_per_s": tps,
              "plot": plot, "throughput": {}}
    if args.bench_steps > 0:
        print(f"timing {args.bench_steps} training steps per impl (batch {bs} x seq {sl}):")
        for impl in ("fused", "reference"):
            try:
                tps = throughput(model, data, impl, steps=args.bench_steps, batch_size=bs,
                                 seq_len=sl, device=device)
                result["throughput"][impl] = tps
                print(f"  impl={impl:<9} {tps:>10,.0f} tokens/s")
            except Exception as e:  # e.g. the kernels are not built
                result["throughput"][impl] = None
                msg = str(e).strip().split("\n")[0]
                msg = msg if len(msg) <= 160 else msg[:157] + "..."
                print(f"  impl={impl:<9} unavailable: {type(e).__name__}: {msg}")
        f, r = result["throughput"].get("fused"), result["throughput"].get("reference")
        if f and r:
            print(f"  fused / reference: {f / r:.2f}x")
    return result


if __name__ == "__main__":
    main()
