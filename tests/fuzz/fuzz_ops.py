"""Fuzz the direct calls of torch.ops.fastattn.*: every call must return or raise a Python
exception (ValueError, TypeError, RuntimeError, NotImplementedError, IndexError), never crash,
hang or read out of bounds.

    python tests/fuzz/fuzz_ops.py --examples 100000 --asan        # a long run
    python tests/fuzz/fuzz_ops.py --seconds 600 --asan --seed 7     # or by time
    python tests/fuzz/fuzz_ops.py --replay "Call(...)" [--asan]     # one call, e.g. from a report

Every argument of every op (fastattn.OP_NAMES: rotary, rotary_, rotary_backward, attention,
attention_backward, attention_varlen, attention_varlen_backward) is drawn by Hypothesis from
its type in the op's registered schema (torch.ops.fastattn.<op>.default._schema), so an
argument added later is drawn too: tensors of rank 0-5, any dtype (float, int, bool, complex),
sizes from 0 to 2^31 and more (others 0 then: the elements of any tensor, and the work of a
call, are capped), any strides (0 included, overlapping, permuted, stepped, odd strides on
size-1 dims) and storage offset, values with NaN/inf; any int64 (the ends, and values near the
call's sizes such as 2^63 - S); any float (NaN, inf, negative); meta tensors among CPU ones;
tensors that require grad (then the call's backward runs through autograd too). Most calls
start from a consistent call of the op (so the kernels run) with up to two arguments redrawn
from their whole type range; some are drawn from the schema alone.

The calls run in worker subprocesses; this process only watches them. A worker that dies
(signal, AddressSanitizer report), stops answering (a call longer than --timeout: faulthandler
ends it) or grows past --max-rss-gib is a finding; the call in flight is in its state file,
and the run goes on in a fresh worker. --asan builds the CPU kernels with AddressSanitizer
(tests/fuzz/build_asan.py) and the workers load only that library (FASTATTN_LIBRARY), with the
ASan runtime preloaded. The run prints how many calls it made, how they ended (returned, or the
exception type) per op, and every finding with the call that caused it, as a --replay argument.
Exit status: 0 when nothing was found, 1 otherwise.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]

ALLOWED = ("ValueError", "TypeError", "RuntimeError", "NotImplementedError", "IndexError")
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
nan, inf = math.nan, math.inf  # so that a call's repr evaluates (--replay)

# Caps that keep a call's memory and time bounded (individual sizes are not capped: a size of
# 2^31 comes with another size 0).
MAX_ELEMENTS = 2 ** 22   # elements of any tensor (input, output or storage)
MAX_WORK = 2 ** 25       # multiply-adds of a call (B*Hq*Sq*Sk*D, B*H*S*D*D)

FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
OTHER_DTYPES = ("int64", "int32", "int16", "int8", "uint8", "bool", "complex64", "complex128",
                "complex32", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")


# =============================================================================================
# tensors: a spec (what --replay needs to rebuild it) and its construction
# =============================================================================================
@dataclass(frozen=True)
class T:
    """A tensor: shape, dtype, strides (None: contiguous) and storage offset, values, device,
    and whether it requires grad ("leaf", or "view": a view of a leaf that does).

    values: ("randn", seed, scale, n_special, special) -- normal * scale, n_special entries set
                to special (nan, inf, -inf, max, tiny);
            ("int", seed, lo, hi, n_extreme) -- uniform integers in [lo, hi], n_extreme entries
                set to int64 extremes;
            ("const", value);
            ("list", [ints]) -- these integers, then zeros."""
    shape: tuple
    dtype: str = "float32"
    strides: Optional[tuple] = None
    offset: int = 0
    values: tuple = ("randn", 0, 1.0, 0, "nan")
    device: str = "cpu"
    grad: str = ""

    def __repr__(self) -> str:
        parts = [repr(tuple(self.shape))]
        for name, default in (("dtype", "float32"), ("strides", None), ("offset", 0),
                              ("values", ("randn", 0, 1.0, 0, "nan")), ("device", "cpu"), ("grad", "")):
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name}={value!r}")
        return f"T({', '.join(parts)})"


def contiguous_strides(shape) -> tuple:
    """torch's contiguous strides, capped at the int64 maximum (for tensors with no elements
    whose other sizes multiply past it)."""
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(min(acc, INT64_MAX))
        acc *= max(n, 1)
    return tuple(reversed(strides))


def numel(shape) -> int:
    return math.prod(shape)


def storage_needed(shape, strides, offset) -> int:
    if numel(shape) == 0:
        return offset
    return offset + 1 + sum((n - 1) * s for n, s in zip(shape, strides))


_EXTREMES = (INT64_MIN, INT64_MAX, -1, 2 ** 31, -2 ** 31 - 1, 2 ** 32, 2 ** 62, INT64_MIN + 1, INT64_MAX - 1)
_SPECIALS = {"nan": nan, "inf": inf, "-inf": -inf, "max": 3.0e38, "tiny": 1e-45}


def make_values(values: tuple, n: int, dtype):
    import torch

    kind = values[0]
    if kind == "list":  # exact integers (e.g. cu_seqlens), then zeros to fill the storage
        exact = torch.tensor(values[1][:n], dtype=torch.int64)
        return torch.cat([exact, torch.zeros(n - len(exact), dtype=torch.int64)]).to(dtype)
    if kind == "const":
        v = values[1]
        base_dtype = torch.complex128 if dtype.is_complex else (
            torch.float64 if (dtype.is_floating_point or isinstance(v, float)) else torch.int64)
        return torch.full((n,), v, dtype=base_dtype).to(dtype)
    g = torch.Generator().manual_seed(values[1])
    if kind == "randn" and (dtype.is_floating_point or dtype.is_complex):
        _, _, scale, n_special, special = values
        wide = dtype in (torch.float64, torch.complex128) or scale > 1e30
        base = torch.randn(n, generator=g, dtype=(torch.complex128 if wide else torch.complex64) if dtype.is_complex
                           else (torch.float64 if wide else torch.float32)) * scale
        if n_special and n:
            idx = torch.randint(0, n, (min(n_special, n),), generator=g)
            base[idx] = _SPECIALS[special]
        return base.to(dtype)
    # integers ("int", or "randn" asked of an integer dtype: small integers)
    lo, hi, n_extreme = (values[2], values[3], values[4]) if kind == "int" else (-3, 8, 0)
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        base = torch.full((n,), lo, dtype=torch.int64)
    else:
        base = torch.randint(lo, hi if hi == INT64_MAX else hi + 1, (n,), generator=g, dtype=torch.int64)
    if n_extreme and n:
        idx = torch.randint(0, n, (min(n_extreme, n),), generator=g)
        pick = torch.randint(0, len(_EXTREMES), (len(idx),), generator=g)
        base[idx] = torch.tensor(_EXTREMES, dtype=torch.int64)[pick]
    if dtype == torch.bool:
        return base != 0
    return base.to(dtype)


def make_tensor(spec: T):
    import torch

    dtype = getattr(torch, spec.dtype)
    strides = spec.strides if spec.strides is not None else contiguous_strides(spec.shape)
    if spec.device == "meta":
        t = torch.empty_strided(spec.shape, strides, dtype=dtype, device="meta")
    else:
        n = storage_needed(spec.shape, strides, spec.offset)
        buf = make_values(spec.values, n, dtype)
        if spec.grad == "view" and (dtype.is_floating_point or dtype.is_complex):
            buf.requires_grad_(True)
        t = buf.as_strided(spec.shape, strides, spec.offset)
    if spec.grad == "leaf" and (dtype.is_floating_point or dtype.is_complex):
        t = t.detach().requires_grad_(True)
    return t


# =============================================================================================
# calls
# =============================================================================================
@dataclass
class Call:
    """One op call: the op, its arguments by name in schema order, the intra-op thread count;
    forward_first (attention_backward, attention_varlen_backward): replace out and lse with the
    forward op's results on the same arguments, when that forward call returns."""
    op: str
    args: dict
    threads: int = 1
    forward_first: bool = False

    def __repr__(self) -> str:
        args = ", ".join(f"{k!r}: {v!r}" for k, v in self.args.items())
        return f"Call({self.op!r}, {{{args}}}, threads={self.threads}, forward_first={self.forward_first})"


def build(value):
    if isinstance(value, T):
        return make_tensor(value)
    if isinstance(value, list):
        return [build(v) for v in value]
    return value


def tensors_in(values):
    import torch

    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from tensors_in(v)


class Outcome:
    """How one call ended, and what it ran."""

    def __init__(self):
        self.calls = []  # (op, "returned" | exception type name)
        self.messages = []  # (op, exception type, message with the numbers left out)
        self.unexpected = None  # (exception type, message) of an exception outside ALLOWED
        self.mixed_devices_returned = False


def run_call(call: Call, outcome: Outcome) -> None:
    """Run the call (and, when its outputs require grad, their backward), recording in
    `outcome` how each op call ended. Exceptions outside ALLOWED are recorded as unexpected."""
    import torch

    torch.set_num_threads(call.threads)
    op = getattr(torch.ops.fastattn, call.op).default
    try:
        args = {name: build(v) for name, v in call.args.items()}
    except Exception as e:  # the spec cannot be built (e.g. torch's size overflow): not a call
        outcome.calls.append((call.op, "unbuildable"))
        outcome.messages.append((call.op, "unbuildable " + type(e).__name__, _gist(e)))
        return
    if call.forward_first:
        forward = call.op[:-len("_backward")]
        fwd_op = getattr(torch.ops.fastattn, forward).default
        try:
            out, lse = fwd_op(*(args[a.name] for a in fwd_op._schema.arguments))
            outcome.calls.append((forward, "returned"))
            args["out"], args["lse"] = out.detach(), lse.detach()
        except Exception as e:
            if not _record_exception(forward, e, outcome):
                return
    values = list(args.values())
    try:
        result = op(*values)
    except Exception as e:
        _record_exception(call.op, e, outcome)
        return
    outcome.calls.append((call.op, "returned"))
    devices = {t.device.type for t in tensors_in(values)}
    if len(devices) > 1:
        outcome.mixed_devices_returned = True
    outputs = [r for r in (result if isinstance(result, (tuple, list)) else [result])
               if isinstance(r, torch.Tensor) and r.requires_grad]
    if outputs:
        try:
            loss = sum(o.real.to(torch.float64).nan_to_num().sum() for o in outputs)
            loss.backward()
            outcome.calls.append((call.op + " (backward through autograd)", "returned"))
        except Exception as e:
            _record_exception(call.op + " (backward through autograd)", e, outcome)


def _record_exception(op: str, e: Exception, outcome: Outcome) -> bool:
    """Record how a call ended in an exception; False when the exception is not an allowed one."""
    import builtins

    name = type(e).__name__
    if not isinstance(e, tuple(getattr(builtins, n) for n in ALLOWED)):
        outcome.unexpected = (name, str(e)[:2000], traceback.format_exc()[-3000:])
        outcome.calls.append((op, "unexpected " + name))
        return False
    outcome.calls.append((op, name))
    outcome.messages.append((op, name, _gist(e)))
    return True


def _gist(e: Exception) -> str:
    """An exception's first line with its numbers and shapes left out (to count kinds)."""
    line = (str(e).strip().splitlines() or [""])[0]
    return re.sub(r"-?\d[\d.e+-]*|\[[^\]]*\]|\([^)]*\)", "#", line)[:120]


# =============================================================================================
# known defects
# =============================================================================================
# Open defects this fuzzer finds, each with a test of a call that would hit it. With
# --skip-known, calls that match are counted and skipped instead of run, so that a run (the CI
# budget among them) explores past them. Delete an entry when its defect is fixed.
# (None open at present: every defect the fuzzer has found so far has a fix and a test.)
KNOWN: dict = {}


def known_defect(c: Call) -> Optional[str]:
    for name, (_, matches) in KNOWN.items():
        try:
            if matches(c):
                return name
        except Exception:  # a spec the predicate does not understand
            pass
    return None


# =============================================================================================
# strategies
# =============================================================================================
def strategies():
    """The Hypothesis strategies (built lazily: the watching process needs no Hypothesis)."""
    from hypothesis import strategies as st

    huge = st.one_of(st.sampled_from((2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 32 + 1, 2 ** 16, 2 ** 16 + 1,
                                      2 ** 24, 2 ** 40, 2 ** 62)),
                     st.integers(4097, 2 ** 31 + 1))
    dim = st.one_of(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4), st.integers(1, 8), st.integers(1, 8),
                    st.integers(1, 8), st.integers(9, 64), st.integers(9, 64), st.integers(65, 1024),
                    st.integers(1025, 4096), huge)

    def int_specials(*sizes):
        vals = {0, 1, -1, -2, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, 2 ** 31 - 1, 2 ** 31,
                -2 ** 31, 2 ** 32, 2 ** 62, -2 ** 62, 2 ** 62 + 2 ** 61}
        for s in sizes:
            for d in (-2, -1, 0, 1, 2):
                vals.update((s + d, -s + d, INT64_MAX - s + 1 + d, 2 ** 62 - s + d))
        return sorted(v for v in vals if INT64_MIN <= v <= INT64_MAX)

    def any_int(*sizes):
        return st.one_of(st.integers(INT64_MIN, INT64_MAX), st.sampled_from(int_specials(*sizes)),
                         st.integers(-8, 8))

    any_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                          st.sampled_from((nan, inf, -inf, 0.0, -0.0, 1.0, -1.0, 0.5, 32.0, 1e-45, 5e-324,
                                           1e308, -1e308, 3.4e38, 65504.0, 2.0 ** 63, -2.0 ** 63)))
    # Python values of the wrong type for any argument (the dispatcher's argument parsing)
    wrong_type = st.sampled_from((None, 0, 1.5, True, "x", [1, 2], [], 2 ** 63, -2 ** 63 - 1, 2 ** 64))

    def fit(draw, dims: dict, terms, keep=()):
        """Bring every product of dims in `terms` to <= its cap: either by zeroing the smallest
        size of a product that is over, other than those in `keep` where it can (so huge sizes
        survive, with another size 0), or by halving its largest (so mid-size calls stay
        non-empty)."""
        zero_smallest = draw(st.booleans())
        for _ in range(400):
            over = [t for t, c in terms if math.prod(dims[n] for n in t) > c]
            if not over:
                return
            names = [n for n in over[0] if dims[n] > 1]
            if zero_smallest:
                names = [n for n in names if n not in keep] or names
                dims[min(names, key=lambda n: dims[n])] = 0
            else:
                n = max(names, key=lambda n: dims[n])
                dims[n] //= 2
        raise AssertionError(f"fit did not converge: {dims}")

    @st.composite
    def values_for(draw, dtype: str, lo: Optional[int] = None, hi: Optional[int] = None):
        seed = draw(st.integers(0, 2 ** 32 - 1))
        floating = dtype in FLOAT_DTYPES or dtype.startswith(("complex", "float8"))
        if lo is not None and draw(st.integers(0, 5)):
            return ("int", seed, lo, hi, draw(st.sampled_from((0, 0, 0, 1, 2))))
        kinds = ("randn", "randn", "randn", "int", "const") if floating else ("int", "int", "const")
        kind = draw(st.sampled_from(kinds))
        if kind == "randn":
            return ("randn", seed, draw(st.sampled_from((1.0, 1.0, 1e-3, 1e3, 1e30, 1e300))),
                    draw(st.sampled_from((0, 0, 0, 0, 1, 2, 1000))),
                    draw(st.sampled_from(tuple(_SPECIALS))))
        if kind == "int":
            lo2 = draw(st.one_of(st.integers(-4, 4), st.sampled_from(_EXTREMES)))
            hi2 = draw(st.one_of(st.integers(-4, 16), st.sampled_from(_EXTREMES)))
            return ("int", seed, lo2, hi2, draw(st.sampled_from((0, 0, 1, 3))))
        if floating:
            return ("const", draw(any_float))
        return ("const", draw(st.sampled_from((0, 1, -1, INT64_MAX, INT64_MIN, 2 ** 31))))

    @st.composite
    def layout(draw, shape, last_dim_contiguous=True):
        """(strides, offset) for shape: contiguous, permuted, stepped, expanded (stride 0),
        strided last dim, overlapping, odd strides on size-0/1 dims."""
        rank = len(shape)
        kinds = ["contiguous"] * 4 + ["permute", "step", "expand", "size1"] + (
            ["lastdim", "overlap"] if not last_dim_contiguous or draw(st.integers(0, 9)) == 0 else [])
        kind = draw(st.sampled_from(kinds)) if rank else "contiguous"
        strides = list(contiguous_strides(shape))
        if kind == "permute":
            perm = draw(st.permutations(range(rank)))
            cs = contiguous_strides([shape[p] for p in perm])
            for i, p in enumerate(perm):
                strides[p] = cs[i]
        elif kind == "step":
            steps = [draw(st.integers(1, 3)) for _ in range(rank)]
            if last_dim_contiguous:
                steps[-1] = 1
            cs = contiguous_strides([max(n, 1) * s for n, s in zip(shape, steps)])
            strides = [c * s for c, s in zip(cs, steps)]
        elif kind == "expand":
            zero = [draw(st.booleans()) for _ in range(rank)]
            if last_dim_contiguous and shape[-1] > 1:
                zero[-1] = False
            cs = contiguous_strides([1 if z else n for n, z in zip(shape, zero)])
            strides = [0 if z else c for c, z in zip(cs, zero)]
        elif kind == "size1":
            for i, n in enumerate(shape):
                if n <= 1:
                    strides[i] = draw(st.sampled_from((0, 1, 7, 2 ** 31, 2 ** 40, 2 ** 62, INT64_MAX)))
        elif kind == "lastdim":
            cs = contiguous_strides(list(shape[:-1]) + [2 * max(shape[-1], 1)])
            strides = list(cs[:-1]) + [2]
        elif kind == "overlap":
            strides = [draw(st.integers(0, max(1, numel(shape)))) for _ in range(rank)]
        offset = draw(st.sampled_from((0, 0, 0, 0, 1, 3, 17)))
        strides = tuple(min(s, INT64_MAX) for s in strides)
        if storage_needed(shape, strides, offset) > MAX_ELEMENTS:
            strides = contiguous_strides(shape)
        if strides == contiguous_strides(shape):
            strides = None
        return strides, offset

    def device(draw, ctx) -> str:
        """meta for every tensor of a call, for some of them, or none (ctx["meta"])."""
        return "meta" if ctx["meta"] == "all" or (ctx["meta"] == "some" and draw(st.integers(0, 3)) == 0) else "cpu"

    @st.composite
    def tensor(draw, shape, dtype, ctx, last_dim_contiguous=True, lo=None, hi=None, grad_ok=True):
        strides, offset = draw(layout(tuple(shape), last_dim_contiguous))
        dev = device(draw, ctx)
        grad = ""
        if ctx["grad"] and grad_ok and (dtype in FLOAT_DTYPES or dtype.startswith("complex")):
            grad = draw(st.sampled_from(("", "leaf", "leaf", "view")))
        return T(tuple(shape), dtype, strides, offset, draw(values_for(dtype, lo, hi)), dev, grad)

    @st.composite
    def any_tensor(draw, ctx):
        rank = draw(st.integers(0, 5))
        dims = {i: draw(dim) for i in range(rank)}
        fit(draw, dims, [(tuple(range(rank)), MAX_ELEMENTS // 8)])
        dtype = draw(st.sampled_from(FLOAT_DTYPES * 2 + OTHER_DTYPES))
        return draw(tensor([dims[i] for i in range(rank)], dtype, ctx, last_dim_contiguous=False))

    @st.composite
    def any_value(draw, type_str: str, ctx, sizes=(), wrong_types=True):
        """Any value of a schema type (the whole range, None for optional types), now and then
        a Python value of another type."""
        if wrong_types and draw(st.integers(0, 60)) == 0:
            return draw(wrong_type)
        if type_str.endswith("?"):
            if draw(st.booleans()):
                return None
            type_str = type_str[:-1]
        list_match = re.fullmatch(r"(\w+)\[(\d*)\]", type_str)
        if list_match:
            elem, n = list_match.group(1), list_match.group(2)
            length = int(n) if n and draw(st.integers(0, 9)) else draw(st.integers(0, 6))
            return [draw(any_value(elem, ctx, sizes)) for _ in range(length)]
        if type_str == "Tensor":
            return draw(any_tensor(ctx))
        if type_str in ("int", "SymInt"):
            return draw(any_int(*sizes))
        if type_str == "float":
            return draw(any_float)
        if type_str == "bool":
            return draw(st.booleans())
        raise NotImplementedError(f"fuzz_ops: no strategy for schema type {type_str!r}: add one")

    float_dtype = st.sampled_from(FLOAT_DTYPES)

    # ---- consistent calls of each op (the kernels run), by argument name -------------------
    @st.composite
    def rotary_args(draw, op, ctx):
        dims = dict(B=draw(dim), H=draw(dim), S=draw(dim), D=draw(dim), R=draw(dim))
        table = draw(st.booleans())
        cover = draw(st.integers(0, 2)) > 0
        rotation = draw(st.integers(0, 3)) == 0
        # every tensor's elements (x, positions, the tables, inv_freq), and the work
        terms = [(("B", "H", "S", "D"), MAX_ELEMENTS), (("B", "S"), MAX_ELEMENTS), (("S", "D"), MAX_ELEMENTS),
                 (("R", "D"), MAX_ELEMENTS), (("S",), MAX_ELEMENTS), (("D",), MAX_ELEMENTS)]
        if rotation:
            terms += [(("D", "D"), MAX_ELEMENTS), (("B", "H", "S", "D", "D"), MAX_WORK)]
        fit(draw, dims, terms)
        B, H, S, D = dims["B"], dims["H"], dims["S"], dims["D"]
        if draw(st.integers(0, 4)):
            D -= D % 2
        R = S + draw(st.integers(0, 3)) if cover else dims["R"]
        rd = draw(st.one_of(st.just(D - D % 2), st.integers(0, max(D // 2, 0)).map(lambda h: 2 * h)))
        half = max(rd // 2, 0)
        xdt = draw(float_dtype)
        pdt = draw(st.sampled_from((xdt, "float32", "float64")))
        a = dict(x=draw(tensor((B, H, S, D), xdt, ctx, grad_ok=op != "rotary_")))
        a["inv_freq"] = None if table else draw(tensor((half,), pdt, ctx))
        a["cos"] = draw(tensor((R, half), pdt, ctx)) if table else None
        a["sin"] = draw(tensor((R, half), pdt, ctx)) if table else None
        pos = draw(st.sampled_from(("none", "none", "s", "bs")))
        top = max(R - 1, 0) if table else 2 ** 20
        if pos != "none":
            a["positions"] = draw(tensor((S,) if pos == "s" else (B, S), draw(st.sampled_from(("int64", "int32"))),
                                         ctx, lo=0, hi=top))
        else:
            a["positions"] = None
        a["rotation"] = draw(tensor((D, D), pdt, ctx, last_dim_contiguous=False)) if rotation else None
        a["offset"] = draw(st.one_of(st.integers(0, max(R - S, 0)), any_int(S, R))) if table else \
            draw(st.one_of(st.integers(0, 2 ** 20), any_int(S)))
        a["interleaved"] = draw(st.booleans())
        a["rotary_dim"] = rd if draw(st.integers(0, 7)) else draw(any_int(D, rd))
        if op == "rotary_backward":
            a["grad_out"] = draw(tensor((B, H, S, D), xdt, ctx, grad_ok=False))
            a["output_mask"] = [draw(st.booleans()) for _ in range(4)]
        return a

    @st.composite
    def attention_args(draw, op, ctx):
        dims = dict(B=draw(dim), Hkv=draw(st.one_of(st.integers(1, 4), dim)), G=draw(st.one_of(st.integers(1, 4), dim)),
                    Sq=draw(dim),
                    Sk=draw(dim), Dqk=draw(dim), Dv=draw(st.one_of(dim, st.just(-1))), M=draw(dim))
        if dims["Dv"] < 0:
            dims["Dv"] = dims["Dqk"]
        E = MAX_ELEMENTS
        fit(draw, dims, [(("B", "Hkv", "G", "Sq", "Dqk"), E), (("B", "Hkv", "Sk", "Dqk"), E),
                         (("B", "Hkv", "Sk", "Dv"), E), (("B", "Hkv", "G", "Sq", "Dv"), E),
                         (("B", "Hkv", "G", "Sq"), E), (("M", "Hkv", "G"), E // 2), (("B", "Hkv", "G"), E),
                         (("Hkv", "G"), E), (("B",), E),
                         # (softmax over Sk keys even at head dim 0: lse depends on Sk)
                         (("B", "Hkv", "G", "Sq", "Sk"), MAX_WORK),
                         (("B", "Hkv", "G", "Sq", "Sk", "Dqk"), MAX_WORK),
                         (("B", "Hkv", "G", "Sq", "Sk", "Dv"), MAX_WORK),
                         # the backward's fp32 dK/dV partials: (<= 16 chunks, B, Hkv, Sk, D)
                         (("B", "Hkv", "Sk", "Dqk"), E // 16), (("B", "Hkv", "Sk", "Dv"), E // 16)],
            keep=("Hkv",))
        B, Hkv, Sq, Sk, Dqk, Dv, M = (dims[n] for n in ("B", "Hkv", "Sq", "Sk", "Dqk", "Dv", "M"))
        Hq = Hkv * dims["G"]
        dt = draw(float_dtype)
        pdt = draw(st.sampled_from((dt, "float32", "float64")))
        a = dict(q=draw(tensor((B, Hq, Sq, Dqk), dt, ctx)), k=draw(tensor((B, Hkv, Sk, Dqk), dt, ctx)),
                 v=draw(tensor((B, Hkv, Sk, Dv), dt, ctx)))
        a["scale"] = draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from((0.5, 0.125, 2.0)), any_float))
        a["scale_tensor"] = draw(st.one_of(st.none(), st.none(), tensor((), pdt, ctx)))
        a["causal"] = draw(st.booleans())
        window = st.one_of(st.just(-1), st.just(-1), st.just(-1), st.integers(0, 2 * max(Sq, Sk) + 2),
                           st.integers(0, 2 * max(Sq, Sk) + 2), any_int(Sq, Sk, Sk - Sq))
        a["window_left"], a["window_right"] = draw(window), draw(window)
        a["rel_bias"] = draw(st.one_of(st.none(), tensor((2 * M - 1 if M else 0, Hq), pdt, ctx)))
        a["alibi_slopes"] = draw(st.one_of(st.none(), tensor((Hq,), pdt, ctx)))
        span_shape = draw(st.sampled_from((None, None, (Hq,), (B, Hq))))
        a["span"] = draw(tensor(span_shape, pdt, ctx, lo=0, hi=Sk + 4)) if span_shape else None
        a["span_ramp"] = draw(st.one_of(*[st.sampled_from((32.0, 1.0, 0.5, 4.0))] * 5, any_float))
        a["num_global"] = draw(st.one_of(st.just(0), st.just(0), st.just(0), st.integers(0, Sk), st.integers(0, Sk),
                                         any_int(Sk, Sq)))
        kl = draw(st.one_of(st.none(), st.none(), st.sampled_from(("int64", "int32"))))
        a["key_lengths"] = draw(tensor((B,), kl, ctx, lo=-2, hi=Sk + 2, grad_ok=False)) if kl else None
        a["softcap"] = draw(st.one_of(*[st.just(0.0)] * 3, st.sampled_from((2.0, 50.0)), st.sampled_from((2.0, 50.0)),
                                      any_float))
        offset = st.one_of(st.none(), st.none(), tensor((B,), draw(st.sampled_from(("int64", "int32"))), ctx,
                                                         lo=-2 * (Sq + Sk) - 2, hi=2 * (Sq + Sk) + 2, grad_ok=False),
                           tensor((B,), "int64", ctx, grad_ok=False))
        a["q_offset"], a["k_offset"] = draw(offset), draw(offset)
        # (shapes that fit the element budget: the fit above bounds the work, not the (Sq, Sk) plane)
        mask_shapes = [sh for sh in ((B, Hq, Sq, Sk), (Sq, Sk), (1, Hq, 1, Sk), (Sk,), (B, 1, Sq, 1), (2, Sq, Sk),
                                     (Sq, Sk + 1)) if math.prod(sh) <= MAX_ELEMENTS]
        mask_shape = draw(st.sampled_from([None] * max(3, len(mask_shapes) // 2) + mask_shapes))
        mask_dtype = draw(st.sampled_from(("bool", dt, "float32", "float64", "int64")))
        a["attn_mask"] = draw(tensor(mask_shape, mask_dtype, ctx)) if mask_shape else None
        a["dropout_p"] = draw(st.one_of(*[st.just(0.0)] * 3, st.sampled_from((0.1, 0.5, 0.999)), any_float))
        a["dropout_seed"] = draw(st.one_of(st.none(), tensor((2,), "int64", ctx, grad_ok=False),
                                           tensor((2,), "int64", ctx, grad_ok=False)))
        if op == "attention_backward":
            a["grad_out"] = draw(tensor((B, Hq, Sq, Dv), dt, ctx, grad_ok=False))
            a["out"] = draw(tensor((B, Hq, Sq, Dv), dt, ctx, grad_ok=False))
            a["lse"] = draw(tensor((B, Hq, Sq), "float32", ctx, grad_ok=False))
            a["grad_lse"] = draw(st.one_of(st.none(), tensor((B, Hq, Sq), "float32", ctx, grad_ok=False)))
            a["need_rel_bias_grad"] = draw(st.booleans())
            a["need_span_grad"] = draw(st.booleans())
        return a, (Sq, Sk, B, Hq, Dqk)

    @st.composite
    def cu_seqlens(draw, total: int, n_seq: int, ctx):
        """(n_seq + 1,) bounds: mostly consistent (0, sorted cuts, total), else one entry off
        (negative, past the total, out of order, an int64 extreme)."""
        cuts = sorted(draw(st.integers(0, total)) for _ in range(max(n_seq - 1, 0)))
        b = [0] + cuts + [total] if n_seq else [0]
        if draw(st.integers(0, 5)) == 0:
            b[draw(st.integers(0, len(b) - 1))] = draw(st.one_of(st.integers(-3, total + 3), any_int(total)))
        dtype = draw(st.sampled_from(("int32", "int64")))
        if dtype == "int32":
            b = [min(max(x, -2 ** 31), 2 ** 31 - 1) for x in b]
        return T((len(b),), dtype, values=("list", b), device=device(draw, ctx))

    @st.composite
    def varlen_args(draw, op, ctx):
        """attention_varlen(_backward): the options of a consistent attention call, on packed
        q (total_q, Hq, Dqk), k, v with drawn cu_seqlens."""
        fwd = "attention_backward" if op.endswith("_backward") else "attention"
        a, _ = draw(attention_args(fwd, ctx))
        q0, k0, v0 = a["q"], a["k"], a["v"]
        dims = dict(Hq=q0.shape[1], Hkv=k0.shape[1], Dqk=q0.shape[3], Dv=v0.shape[3], Tq=draw(dim), Tk=draw(dim))
        E = MAX_ELEMENTS
        fit(draw, dims, [(("Tq", "Hq", "Dqk"), E), (("Tk", "Hkv", "Dqk"), E), (("Tk", "Hkv", "Dv"), E),
                         (("Tq", "Hq", "Dv"), E), (("Tq", "Hq"), E),
                         (("Tq", "Tk", "Hq"), MAX_WORK), (("Tq", "Tk", "Hq", "Dqk"), MAX_WORK),
                         (("Tq", "Tk", "Hq", "Dv"), MAX_WORK), (("Tk", "Hkv", "Dqk"), E // 16),
                         (("Tk", "Hkv", "Dv"), E // 16)], keep=("Hkv", "Hq"))
        Hq, Hkv, Dqk, Dv, Tq, Tk = (dims[n] for n in ("Hq", "Hkv", "Dqk", "Dv", "Tq", "Tk"))
        dt = q0.dtype
        n_seq = draw(st.integers(0, 5))
        v = dict(cu_seqlens_q=draw(cu_seqlens(Tq, n_seq, ctx)), cu_seqlens_k=draw(cu_seqlens(Tk, n_seq, ctx)),
                 max_seqlen_q=draw(st.one_of(*[st.just(Tq)] * 4, st.integers(0, Tq + 1), any_int(Tq))),
                 max_seqlen_k=draw(st.one_of(*[st.just(Tk)] * 4, st.integers(0, Tk + 1), any_int(Tk))))
        a["q"] = draw(tensor((Tq, Hq, Dqk), dt, ctx))
        a["k"] = draw(tensor((Tk, Hkv, Dqk), dt, ctx))
        a["v"] = draw(tensor((Tk, Hkv, Dv), dt, ctx))
        pdt = draw(st.sampled_from((dt, "float32", "float64")))
        for name in ("alibi_slopes", "span"):  # per sequence now and then
            if a[name] is not None and draw(st.integers(0, 2)) == 0:
                a[name] = draw(tensor((n_seq, Hq), pdt, ctx, lo=0, hi=Tk + 4))
        for name in ("key_lengths", "q_offset", "k_offset", "attn_mask"):  # refused: mostly absent
            if draw(st.integers(0, 7)):
                a[name] = None
        if op.endswith("_backward"):
            for name in ("grad_out", "out"):
                a[name] = draw(tensor((Tq, Hq, Dv), dt, ctx, grad_ok=False))
            a["lse"] = draw(tensor((Hq, Tq), "float32", ctx, grad_ok=False))
            a["grad_lse"] = draw(st.one_of(st.none(), tensor((Hq, Tq), "float32", ctx, grad_ok=False)))
            a["output_mask"] = [draw(st.booleans()) for _ in range(4)]
        v.update(a)
        return v, (Tq, Tk, n_seq, Hq, Dqk)

    def schema_type(t, n=None) -> str:
        """A schema argument's type as the schema string writes it: Tensor?, bool[4], ..."""
        kind = t.kind()
        if kind == "OptionalType":
            return schema_type(t.getElementType(), n) + "?"
        if kind == "ListType":
            return schema_type(t.getElementType()) + f"[{n or ''}]"
        return {"TensorType": "Tensor", "IntType": "int", "SymIntType": "SymInt", "FloatType": "float",
                "BoolType": "bool"}.get(kind, str(t))

    @st.composite
    def call(draw, op_names):
        import torch

        op = draw(st.sampled_from(op_names))
        schema = getattr(torch.ops.fastattn, op).default._schema
        names = [a.name for a in schema.arguments]
        types = {a.name: schema_type(a.type, getattr(a, "N", None)) for a in schema.arguments}
        ctx = dict(meta=draw(st.sampled_from(("", "") * 10 + ("all", "some"))),
                   grad=draw(st.integers(0, 3)) == 0 and op != "rotary_")
        sizes: tuple = ()
        known: dict = {}
        mode = draw(st.sampled_from(("consistent",) * 9 + ("schema",)))
        if mode == "consistent" and op.startswith("rotary"):
            known = draw(rotary_args(op, ctx))
            x = known["x"]
            sizes = tuple(x.shape) + (known["cos"].shape[0] if known["cos"] is not None else 0,)
        elif mode == "consistent" and op.startswith("attention_varlen"):
            known, sizes = draw(varlen_args(op, ctx))
        elif mode == "consistent" and op.startswith("attention"):
            known, sizes = draw(attention_args(op, ctx))
        args = {}
        for n in names:
            args[n] = known[n] if n in known else draw(any_value(types[n], ctx, sizes))
        # up to two arguments redrawn over their type's whole range
        bent = draw(st.sampled_from((0, 0, 0, 1, 1, 2))) if known else 0
        for n in draw(st.lists(st.sampled_from(names), min_size=bent, max_size=bent, unique=True)):
            args[n] = draw(any_value(types[n], ctx, sizes))
        forward_first = (op in ("attention_backward", "attention_varlen_backward") and mode == "consistent"
                         and draw(st.booleans()))
        return Call(op, args, threads=draw(st.sampled_from((1, 1, 2))), forward_first=forward_first)

    return call


# =============================================================================================
# the worker: runs calls, keeps its state in a file the watcher reads
# =============================================================================================
class Worker:
    def __init__(self, state_path: str, timeout: float, skip_known: bool = False):
        self.skip_known = skip_known
        self.state_path = state_path
        self.timeout = timeout
        self.calls = 0
        self.examples = 0
        self.ends = collections.Counter()  # "op: ending" -> count
        self.messages = collections.Counter()  # "op: type: gist" -> count
        self.unexpected = []
        self.mixed = 0
        self.fd = os.open(state_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def write_state(self, current: Optional[str], done: bool = False) -> None:
        data = json.dumps(dict(calls=self.calls, examples=self.examples, ends=self.ends, messages=self.messages,
                               unexpected=self.unexpected, mixed_devices_returned=self.mixed,
                               current=current, done=done)).encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def run(self, c: Call) -> None:
        import faulthandler

        if self.skip_known:
            known = known_defect(c)
            if known:
                self.examples += 1
                self.ends[f"{c.op}: skipped (known: {known})"] += 1
                return
        self.write_state(repr(c))
        outcome = Outcome()
        faulthandler.dump_traceback_later(self.timeout, exit=True)
        try:
            run_call(c, outcome)
        finally:
            faulthandler.cancel_dump_traceback_later()
        self.examples += 1
        for op, end in outcome.calls:
            if end != "unbuildable":
                self.calls += 1
            self.ends[f"{op}: {end}"] += 1
        for op, name, gist in outcome.messages:
            self.messages[f"{op}: {name}: {gist}"] += 1
        if outcome.unexpected:
            self.unexpected.append(dict(call=repr(c), exception=outcome.unexpected[0],
                                        message=outcome.unexpected[1], traceback=outcome.unexpected[2]))
        if outcome.mixed_devices_returned:
            self.mixed += 1


def check_loaded_library(expect: Optional[str]) -> str:
    """Import fastattn; with `expect` (the ASan library), check that it is the only fastattn
    library in the process and that the ASan runtime is loaded. Returns a description."""
    import fastattn

    with open("/proc/self/maps") as f:
        maps = f.read()
    libs = sorted({line.split()[-1] for line in maps.splitlines()
                   if ("fastattn" in line.split()[-1] and line.split()[-1].endswith(".so"))})
    if expect is not None:
        assert fastattn._library_source == expect, (fastattn._library_source, expect)
        assert libs == [os.path.realpath(expect)] or libs == [expect], f"fastattn libraries loaded: {libs}"
        assert "libasan" in maps, "the ASan runtime is not loaded"
    return f"{fastattn._library_source} ({', '.join(libs) or 'no .so'})"


def worker_main(opts) -> int:
    import faulthandler
    import warnings

    faulthandler.enable()
    warnings.filterwarnings("ignore")  # (torch's warnings about the calls would bury a report)
    info = check_loaded_library(os.environ.get("FASTATTN_LIBRARY") if opts.asan else None)
    import torch

    if opts.replay:
        c = eval(opts.replay, globals())
        print(f"library: {info}\n{c!r}", flush=True)
        outcome = Outcome()
        run_call(c, outcome)
        for op, end in outcome.calls:
            print(f"{op}: {end}")
        if outcome.unexpected:
            print(outcome.unexpected[2])
        return 1 if outcome.unexpected else 0

    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    import fastattn

    w = Worker(opts.state, opts.timeout, opts.skip_known)
    call = strategies()
    op_names = list(fastattn.OP_NAMES)
    deadline = time.time() + opts.seconds if opts.seconds else None
    chunk = 200
    chunk_seed = opts.seed
    print(f"worker: library {info}, seed {opts.seed}", flush=True)
    while w.examples < opts.examples and (deadline is None or time.time() < deadline):
        n = min(chunk, opts.examples - w.examples)

        @seed(chunk_seed)
        @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=False)
        @given(st.data())
        def run(data):
            w.run(data.draw(call(op_names)))

        before = w.examples
        run()
        if w.examples == before:
            break
        chunk_seed += 1
    w.write_state(None, done=True)
    return 0


# =============================================================================================
# the watcher
# =============================================================================================
def _rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 0.0


def _read_state(path: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _report_summary(text: str) -> str:
    """The lines of a crash's stderr that say what happened (ASan's report, a fatal error)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "AddressSanitizer" in line or line.startswith("Fatal Python error") or "Timeout (" in line:
            return "\n".join(lines[i:i + 40])
    return "\n".join(lines[-40:])


def _signature(kind: str, report: str, current: str) -> str:
    op = re.match(r"Call\('(\w+)'", current or "")
    frame = re.search(r"#\d+ 0x[0-9a-f]+ in (\S+)", report or "")
    asan = re.search(r"AddressSanitizer: ([\w-]+)", report or "")
    return " / ".join(x for x in (kind, asan and asan.group(1), op and op.group(1), frame and frame.group(1)) if x)


def watch(opts) -> int:
    t_start = time.time()
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # the workers import the same fastattn package as this checkout's tests would
    import importlib.util

    spec = importlib.util.find_spec("fastattn")
    pkg_parent = str(Path(spec.origin).parent.parent) if spec and spec.origin else str(REPO_ROOT / "python")
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    library = None
    if opts.asan:
        sys.path.insert(0, str(HERE))
        import build_asan

        t0 = time.time()
        library = build_asan.build()
        print(f"ASan library: {library} (built/found in {time.time() - t0:.1f} s)", flush=True)
        env = dict(build_asan.asan_environment(library), PYTHONPATH=env["PYTHONPATH"], PYTHONUNBUFFERED="1")
    else:
        env.pop("FASTATTN_LIBRARY", None)
    if opts.replay:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--replay", opts.replay,
               "--timeout", str(opts.timeout)] + (["--asan"] if opts.asan else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(proc.stdout)
        if proc.returncode:
            print(f"worker exited with {proc.returncode}:\n{_report_summary(proc.stderr)}")
        return 0 if proc.returncode == 0 else 1

    workdir = tempfile.mkdtemp(prefix="fastattn-fuzz-")
    totals = dict(calls=0, examples=0, ends=collections.Counter(), messages=collections.Counter(), mixed=0)
    findings: list[dict] = []
    seen = collections.Counter()
    deadline = t_start + opts.seconds if opts.seconds else None
    restart = 0
    while totals["examples"] < opts.examples and (deadline is None or time.time() < deadline):
        state_path = os.path.join(workdir, f"state{restart}.json")
        log_path = os.path.join(workdir, f"worker{restart}.log")
        remaining = opts.examples - totals["examples"]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--state", state_path,
               "--examples", str(remaining), "--seed", str(opts.seed + 100003 * restart),
               "--timeout", str(opts.timeout)] + (["--asan"] if opts.asan else []) + (
            ["--skip-known"] if opts.skip_known else [])
        if deadline is not None:
            cmd += ["--seconds", str(max(1.0, deadline - time.time()))]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            killed = None
            last_progress, last_calls, last_print = time.time(), -1, time.time()
            while proc.poll() is None:
                time.sleep(0.5)
                if _rss_gib(proc.pid) > opts.max_rss_gib:
                    killed = f"memory: worker RSS above {opts.max_rss_gib} GiB"
                    proc.kill()
                    break
                st_ = _read_state(state_path)
                if st_.get("examples", -1) != last_calls:
                    last_calls, last_progress = st_.get("examples", -1), time.time()
                elif time.time() - last_progress > 3 * opts.timeout + 120:
                    killed = "hang: no progress (the in-worker timeout did not fire)"
                    proc.kill()
                    break
                if opts.progress and time.time() - last_print >= opts.progress:
                    last_print = time.time()
                    print(f"[{time.time() - t_start:.0f} s] {totals['calls'] + st_.get('calls', 0)} calls, "
                          f"{len(findings)} findings", flush=True)
            proc.wait()
        state = _read_state(state_path)
        totals["calls"] += state.get("calls", 0)
        totals["examples"] += state.get("examples", 0) + (0 if state.get("done") else 1)
        totals["ends"].update(state.get("ends", {}))
        totals["messages"].update(state.get("messages", {}))
        totals["mixed"] += state.get("mixed_devices_returned", 0)
        for u in state.get("unexpected", []):
            sig = f"unexpected {u['exception']} / " + (re.match(r"Call\('(\w+)'", u["call"]).group(1))
            seen[sig] += 1
            if seen[sig] == 1:
                findings.append(dict(kind=sig, call=u["call"], report=u["message"] + "\n" + u["traceback"]))
        log_text = Path(log_path).read_text(errors="replace")
        if proc.returncode != 0 or not state.get("done"):
            current = state.get("current")
            report = _report_summary(log_text) if not killed else "\n".join(log_text.splitlines()[-10:])
            if killed:
                kind = killed
            elif "AddressSanitizer" in log_text:
                kind = "ASan report"
            elif "Timeout (" in log_text:
                kind = f"hang: a call ran past --timeout {opts.timeout} s"
            else:
                kind = f"crash: exit status {proc.returncode}"
            if current is None and not state:
                print(f"worker failed to start:\n{log_text[-4000:]}", flush=True)
                return 2
            sig = _signature(kind, report, current)
            seen[sig] += 1
            totals["calls"] += 1  # the call in flight
            if seen[sig] == 1:
                findings.append(dict(kind=sig, call=current, report=report))
            print(f"[{time.time() - t_start:.0f} s] finding: {sig}; restarting the worker", flush=True)
            restart += 1
            continue
        break

    elapsed = time.time() - t_start
    print(f"\nfastattn fuzz: {totals['calls']} op calls ({totals['examples']} examples) in {elapsed:.0f} s, "
          f"seed {opts.seed}, library: {'ASan build ' + library if library else 'fastattn as imported'}")
    by_op: dict = collections.defaultdict(collections.Counter)
    for key, n in totals["ends"].items():
        op, end = key.split(": ", 1)
        by_op[op][end] += n
    for op in sorted(by_op):
        ends = ", ".join(f"{end} {n}" for end, n in by_op[op].most_common())
        print(f"  {op}: {ends}")
    skipped = sorted({key.split("(known: ")[1].rstrip(")") for key in totals["ends"] if "(known: " in key})
    for name in skipped:
        print(f"  skipped, known defect {name}: {KNOWN[name][0]}")
    if opts.messages:
        print(f"  the {opts.messages} most common exceptions (numbers and shapes left out):")
        for key, n in totals["messages"].most_common(opts.messages):
            print(f"    {n:6d}  {key}")
    if totals["mixed"]:
        print(f"  calls that returned although their tensors were on different devices (meta and CPU): "
              f"{totals['mixed']}")
    print(f"findings: {len(findings)}" + (f" ({sum(seen.values())} occurrences)" if findings else ""))
    for i, f in enumerate(findings, 1):
        print(f"\n--- finding {i}: {f['kind']} (seen {seen[f['kind']]} times)\n"
              f"replay: python {Path(__file__).relative_to(REPO_ROOT) if str(Path(__file__)).startswith(str(REPO_ROOT)) else __file__}"
              f" {'--asan ' if opts.asan else ''}--replay \"{f['call']}\"\n{f['report']}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(dict(calls=totals["calls"], examples=totals["examples"],
                                                   seconds=elapsed, ends=totals["ends"], findings=findings,
                                                   occurrences=seen, mixed_devices_returned=totals["mixed"]),
                                              indent=1))
    if findings:
        print(f"\nthe workers' logs and state files: {workdir}")
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if findings else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=1000, help="calls to draw (default 1000)")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0: no limit)")
    p.add_argument("--asan", action="store_true", help="run the ASan build of the CPU kernels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-known", action="store_true",
                   help="skip (and count) calls that match a known open defect (KNOWN in this file)")
    p.add_argument("--timeout", type=float, default=30, help="seconds one call may take (a hang otherwise)")
    p.add_argument("--max-rss-gib", type=float, default=4.0, help="a worker above this is a finding")
    p.add_argument("--replay", help="run one call, as printed by a finding: Call(...)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--messages", type=int, default=0, help="print the N most common exception messages")
    p.add_argument("--progress", type=int, default=0, help="print the call count every N seconds")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        return worker_main(opts)
    return watch(opts)


if __name__ == "__main__":
    sys.exit(main())
