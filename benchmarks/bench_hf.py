"""Hugging Face transformers Llama training steps with attn_implementation "fastattn", "sdpa"
and "eager": tokens/s and peak memory.

A small Llama (hidden 256, 2 layers, 4 query heads and 2 kv heads of 64, vocabulary 256, so
that attention is a large share of the step) runs forward + backward of the LM loss:

1. tokens/s at sequence 1024 (B=2), the three implementations timed round-robin in one run;
2. packed against padded: documents of random lengths (64..1024) either packed back to back
   in one row with position_ids restarting per document (fastattn: one attention call per
   document) or padded to the longest in a batch with attention_mask (sdpa, and fastattn for
   reference); tokens/s counts the real tokens;
3. peak memory of one forward + backward at sequence 8192 (B=1), each implementation in a
   fresh process: the peak RSS above the level before the step (VmHWM, reset before it).

    python benchmarks/bench_hf.py                 # all three parts
    python benchmarks/bench_hf.py --quick         # fewer repeats, memory at 4096
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import child_result, fresh_allocator, load_fastattn, machine, measure_in_child, peak_memory, time_many  # noqa: E402

IMPLS = ("fastattn", "sdpa", "eager")


def build(impl: str):
    import transformers

    import fastattn.integrations.transformers as fa_hf

    fa_hf.register()
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=16384)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=impl).train()


def step_fn(model, **batch):
    def step():
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()
    return step


def throughput(args) -> list:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(256, (2, args.seq), generator=g)
    models = {impl: build(impl) for impl in IMPLS}
    timings = time_many({impl: step_fn(m, input_ids=x, labels=x) for impl, m in models.items()},
                        warmup=1, repeats=args.repeats, max_seconds=args.max_seconds)
    return [(impl, x.numel() / (t.median_ms / 1e3), t.median_ms, t.min_ms, t.repeats) for impl, t in timings.items()]


def packed_vs_padded(args) -> list:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(64, 1025, (args.docs,), generator=g).tolist()
    docs = [torch.randint(256, (n,), generator=g) for n in lengths]
    total = sum(lengths)
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, (pos[0] == 0).nonzero().flatten()] = -100
    longest = max(lengths)
    padded = torch.zeros(len(docs), longest, dtype=torch.long)
    mask = torch.zeros(len(docs), longest, dtype=torch.long)
    for i, d in enumerate(docs):
        padded[i, :len(d)], mask[i, :len(d)] = d, 1
    padded_labels = padded.masked_fill(mask == 0, -100)
    fast, sdpa = build("fastattn"), build("sdpa")
    fns = {"fastattn packed": step_fn(fast, input_ids=ids, position_ids=pos, labels=labels),
           "sdpa padded": step_fn(sdpa, input_ids=padded, attention_mask=mask, labels=padded_labels),
           "fastattn padded": step_fn(fast, input_ids=padded, attention_mask=mask, labels=padded_labels)}
    timings = time_many(fns, warmup=1, repeats=args.repeats, max_seconds=args.max_seconds)
    return [(name, total / (t.median_ms / 1e3), t.median_ms, t.min_ms, t.repeats)
            for name, t in timings.items()], lengths


def memory_child(impl: str, seq: int) -> None:
    fresh_allocator()
    model = build(impl)
    x = torch.randint(256, (1, seq), generator=torch.Generator().manual_seed(0))
    step = step_fn(model, input_ids=x, labels=x)
    step()  # warm: parameters' gradients and the output buffer cache exist before the measured step
    model.zero_grad(set_to_none=False)
    child_result(peak_memory(step))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--docs", type=int, default=8, help="documents of the packed/padded comparison")
    p.add_argument("--mem-seq", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=240.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], choices=("throughput", "packed", "memory"))
    p.add_argument("--memory-child", nargs=2, metavar=("IMPL", "SEQ"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    load_fastattn()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return 0
    if args.quick:
        args.repeats, args.mem_seq = 3, 4096
    print(f"torch {torch.__version__}, {machine('cpu')}")
    if "throughput" not in args.skip:
        print(f"\n### training step, B=2 S={args.seq} (forward + backward)\n")
        print("| attn_implementation | tokens/s (median) | median ms | min ms | repeats |\n|---|---|---|---|---|")
        for impl, tps, ms, lo, n in throughput(args):
            print(f"| {impl} | {tps:,.0f} | {ms:.0f} | {lo:.0f} | {n} |")
    if "packed" not in args.skip:
        rows, lengths = packed_vs_padded(args)
        print(f"\n### {len(lengths)} documents of {lengths} tokens ({sum(lengths)} real tokens; padded: "
              f"{len(lengths)} x {max(lengths)} = {len(lengths) * max(lengths)})\n")
        print("| layout | real tokens/s (median) | median ms | min ms | repeats |\n|---|---|---|---|---|")
        for name, tps, ms, lo, n in rows:
            print(f"| {name} | {tps:,.0f} | {ms:.0f} | {lo:.0f} | {n} |")
    if "memory" not in args.skip:
        print(f"\n### peak memory of one training step, B=1 S={args.mem_seq}\n")
        print("| attn_implementation | peak RSS above the step's start, MiB |\n|---|---|")
        for impl in IMPLS:
            got = measure_in_child(__file__, ["--memory-child", impl, str(args.mem_seq)])
            print(f"| {impl} | {'n/a' if got is None else f'{got / 2 ** 20:,.0f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
