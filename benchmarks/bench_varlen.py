"""Packed variable-length attention, and a float attn_mask with a gradient: what they cost next to
the peers a user would write. Every comparison is forward+backward, its peers timed round-robin
in the same run.

    python benchmarks/bench_varlen.py            # CPU float32, H=8 D=64
    python benchmarks/bench_varlen.py --quick    # smoke run: short documents, S=512

Packed documents: 16 documents with lengths drawn uniformly between 64 and 2048 tokens (seeded),
causal within each document, q, k, v requiring grad:
  varlen        fastattn.attention_varlen on the packed tokens (total, H, D);
  per-document  one fastattn.attention call per document, each on its own contiguous tensors,
                one after another: the time of the calls attention_varlen makes, without it;
  padded        the batch padded to the longest document, (16, H, max_len, D), causal with
                key_lengths (what a batch without packing computes);
  SDPA          F.scaled_dot_product_attention over the packed row (1, H, total, D) with a
                block-diagonal causal boolean mask (total, total) built outside the timed region
                (a dense mask is how SDPA keeps packed documents apart).
attn_mask: S=2048, a (1, H, S, S) float mask that requires grad, non-causal: fastattn against
SDPA with the same mask (both give the mask its gradient) and against fastattn without a mask.
Decode step (reported, no target): 256 sequences of one query and 64..1024 keys, no grad:
attention_varlen (one kernel call per sequence) against one padded call with key_lengths.

On the CPU, SDPA runs its flash kernel with the boolean block mask (which it reads whole:
nothing is skipped) and its math path, with the (1, H, S, S) weights materialized, for a mask
that requires grad (its flash backward gives a mask no gradient).

Targets (benchmarks/targets.py): cpu_varlen_over_per_document, cpu_varlen_vs_padded,
cpu_varlen_vs_sdpa_block_mask, cpu_mask_grad_vs_sdpa, cpu_mask_grad_over_no_mask.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Check, Report, load_fastattn, make_parser, parse_args, run, time_many, timing  # noqa: E402
from targets import TARGETS  # noqa: E402


def document_lengths(n: int, lo: int, hi: int, seed: int) -> list:
    return torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def block_causal_mask(lengths: list, device) -> torch.Tensor:
    """(total, total) bool: True where query and key are in the same document, key not after query."""
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    pos = torch.arange(doc.shape[0], device=device)
    return (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])


def fwd_bwd(forward, leaves, grad_out):
    def f():
        torch.autograd.grad(forward(), leaves, grad_out)
    return f


def packed_documents(fastattn, args, report) -> list:
    """The packed-documents comparison; returns its checks."""
    dev, H, D = args.dev, args.H, args.D
    lengths = document_lengths(args.docs, args.min_len, args.max_len, args.seed)
    total, longest = sum(lengths), max(lengths)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, grad = (torch.randn(total, H, D, device=dev, generator=g) for _ in range(4))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    packed = [t.clone().requires_grad_() for t in (q, k, v)]
    docs = []  # each document's own contiguous (1, H, len, D) tensors
    for start, end in zip(cu.tolist(), cu.tolist()[1:]):
        own = [t[start:end].transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v, grad)]
        docs.append(([t.requires_grad_() for t in own[:3]], own[3]))
    lens = torch.tensor(lengths, device=dev)

    def padded_batch(t):
        return torch.stack([F.pad(t[s:e], (0, 0, 0, 0, 0, longest - (e - s)))
                            for s, e in zip(cu.tolist(), cu.tolist()[1:])]).transpose(1, 2).contiguous()
    padded = [padded_batch(t).requires_grad_() for t in (q, k, v)]
    padded_grad = padded_batch(grad)
    row = [t.transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for t in (q, k, v)]
    row_grad = grad.transpose(0, 1).unsqueeze(0).contiguous()
    mask = block_causal_mask(lengths, dev)

    def per_document():
        for leaves, go in docs:
            torch.autograd.grad(fastattn.attention(*leaves, causal=True), leaves, go)

    fns = {
        "varlen": fwd_bwd(lambda: fastattn.attention_varlen(*packed, cu, cu, longest, longest, causal=True),
                          packed, grad),
        "per-document": per_document,
        "padded": fwd_bwd(lambda: fastattn.attention(*padded, causal=True, key_lengths=lens), padded, padded_grad),
        "sdpa": fwd_bwd(lambda: F.scaled_dot_product_attention(*row, attn_mask=mask), row, row_grad),
    }
    t = time_many(fns, **timing(args))
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    computed = {"varlen": pairs, "per-document": pairs, "padded": args.docs * longest * (longest + 1) // 2,
                "sdpa": total * total}
    names = {"varlen": "fastattn.attention_varlen", "per-document": "per-document fastattn.attention calls",
             "padded": "padded batch, key_lengths", "sdpa": "SDPA, block-diagonal bool mask"}
    report.table(["forward+backward", "median ms", "min ms", "time / varlen", "(query, key) pairs in its work"],
                 [[names[n], f"{t[n].median_ms:.1f}", f"{t[n].min_ms:.1f}",
                   f"{t[n].median_ms / t['varlen'].median_ms:.2f}", computed[n]] for n in fns])
    report.note(f"documents: {args.docs} of {args.min_len}..{args.max_len} tokens (seed {args.seed}): "
                f"{lengths}; {total} tokens, {pairs} causal pairs")
    ratio = lambda a, b, m="median_ms": getattr(t[a], m) / getattr(t[b], m)  # noqa: E731
    return [Check(TARGETS["cpu_varlen_over_per_document"], ratio("varlen", "per-document"),
                  minimum=ratio("varlen", "per-document", "min_ms"), info=args.cuda),
            Check(TARGETS["cpu_varlen_vs_padded"], ratio("padded", "varlen"),
                  minimum=ratio("padded", "varlen", "min_ms"), info=args.cuda),
            Check(TARGETS["cpu_varlen_vs_sdpa_block_mask"], ratio("sdpa", "varlen"),
                  minimum=ratio("sdpa", "varlen", "min_ms"), info=args.cuda)]


def decode_step(fastattn, args, report) -> None:
    """A decode step of many short sequences (one query each, no grad): what attention_varlen's
    one kernel call per sequence costs next to one padded call. Reported, no target."""
    dev, H, D, n = args.dev, args.H, args.D, args.decode_seqs
    lengths = document_lengths(n, 64, 1024, args.seed + 1)
    total, longest = sum(lengths), max(lengths)
    g = torch.Generator(device=dev).manual_seed(2)
    q = torch.randn(n, H, D, device=dev, generator=g)
    k, v = (torch.randn(total, H, D, device=dev, generator=g) for _ in range(2))
    cu_q = torch.arange(n + 1, dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    bounds = cu_k.tolist()
    kp, vp = (torch.stack([F.pad(t[s:e], (0, 0, 0, 0, 0, longest - (e - s))) for s, e in zip(bounds, bounds[1:])])
              .transpose(1, 2).contiguous() for t in (k, v))
    qp, lens = q.unsqueeze(2), torch.tensor(lengths, device=dev)

    def varlen():
        with torch.no_grad():
            fastattn.attention_varlen(q, k, v, cu_q, cu_k, 1, longest)

    def padded():
        with torch.no_grad():
            fastattn.attention(qp, kp, vp, key_lengths=lens)

    t = time_many({"varlen": varlen, "padded": padded}, **timing(args))
    report.table([f"decode step, {n} sequences of 1 query and 64..1024 keys, no grad", "median ms", "min ms",
                  "us per sequence"],
                 [["fastattn.attention_varlen", f"{t['varlen'].median_ms:.2f}", f"{t['varlen'].min_ms:.2f}",
                   f"{1000 * t['varlen'].median_ms / n:.1f}"],
                  ["padded batch, key_lengths", f"{t['padded'].median_ms:.2f}", f"{t['padded'].min_ms:.2f}",
                   f"{1000 * t['padded'].median_ms / n:.1f}"]])


def float_mask(fastattn, args, report) -> list:
    """The attn_mask comparison; returns its checks."""
    dev, H, D, S = args.dev, args.H, args.D, args.S
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(1, H, S, D, device=dev, generator=g).requires_grad_() for _ in range(3))
    mask = (0.5 * torch.randn(1, H, S, S, device=dev, generator=g)).requires_grad_()
    grad = torch.randn(1, H, S, D, device=dev, generator=g)
    with_mask = (q, k, v, mask)
    t = time_many({
        "mask": fwd_bwd(lambda: fastattn.attention(q, k, v, attn_mask=mask), with_mask, grad),
        "sdpa": fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), with_mask, grad),
        "none": fwd_bwd(lambda: fastattn.attention(q, k, v), (q, k, v), grad),
    }, **timing(args))
    report.table([f"forward+backward, S={S}, (1, {H}, S, S) float mask that requires grad", "median ms", "min ms"],
                 [["fastattn, attn_mask", f"{t['mask'].median_ms:.1f}", f"{t['mask'].min_ms:.1f}"],
                  ["SDPA, the same attn_mask", f"{t['sdpa'].median_ms:.1f}", f"{t['sdpa'].min_ms:.1f}"],
                  ["fastattn, no mask", f"{t['none'].median_ms:.1f}", f"{t['none'].min_ms:.1f}"]])
    return [Check(TARGETS["cpu_mask_grad_vs_sdpa"], t["sdpa"].median_ms / t["mask"].median_ms,
                  minimum=t["sdpa"].min_ms / t["mask"].min_ms, info=args.cuda),
            Check(TARGETS["cpu_mask_grad_over_no_mask"], t["mask"].median_ms / t["none"].median_ms,
                  minimum=t["mask"].min_ms / t["none"].min_ms, info=args.cuda)]


def main(argv=None) -> int:
    p = make_parser(__doc__, warmup=2, repeats=5, quick="documents of 32..512 tokens, S=512")
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0, help="seed of the document lengths")
    p.add_argument("--S", type=int, default=2048, help="sequence length of the attn_mask comparison")
    p.add_argument("--decode-seqs", type=int, default=256, help="sequences of the decode-step comparison")
    args = parse_args(p, argv)
    if args.quick:
        args.min_len, args.max_len, args.S = 32, 512, 512
    fastattn = load_fastattn()
    report = Report("packed documents (attention_varlen) and a float attn_mask with a gradient",
                    f"H={args.H} D={args.D} float32 on {args.dev}, forward+backward", args.dev)
    checks = packed_documents(fastattn, args, report) + float_mask(fastattn, args, report)
    decode_step(fastattn, args, report)
    default = ((args.H, args.D, args.docs, args.min_len, args.max_len, args.seed, args.S)
               == (8, 64, 16, 64, 2048, 0, 2048))
    report.checks(checks, default_shape=default and not args.quick)
    report.emit(args)
    return 0


if __name__ == "__main__":
    run(main)
