"""fastattn as a Hugging Face transformers attention backend.

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()                                   # once per process (idempotent)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastattn")

`register(name)` registers two functions under one name, as transformers' own backends do:

- `attention_mask` (AttentionMaskInterface) decides what the model hands its attention layers.
  transformers describes each mask as a pattern (a `mask_function` built by
  `transformers.masking_utils`: causal, bidirectional, sliding window, packed sequences) plus a
  2-D padding mask. When the pattern is one of those, the result is an `AttentionSpec`: a
  compact description (causal, window, query/key offsets, key padding as `key_lengths` or a
  (B, 1, 1, Sk) key mask, packed-sequence boundaries) that fastattn applies natively, with no
  (Sq, Sk) mask built. Any other pattern (a model's own `or_mask_function` /
  `and_mask_function`, chunked or block-wise attention) is evaluated into the dense bool mask
  that SDPA would get, passed to the kernels as `attn_mask`: exact whatever the pattern.
- `attention_forward` (AttentionInterface) maps the call's arguments to `fastattn.attention`
  (or `fastattn.attention_varlen` for packed sequences): scaling, dropout (training only),
  softcap, sinks (`s_aux`, through the kernel's log-sum-exp), GQA / MQA without repeating k/v,
  T5's position bias, tables attached to the modules, and `output_attentions` through
  `fastattn.attention_weights`. What it cannot map raises ValueError / TypeError naming the
  model's argument; no mask is ever dropped.

T5: `patch_t5(model)` makes T5's relative-position bias a fastattn table built from the
model's `relative_attention_bias` embedding (gradients reach the embedding), instead of the
dense (1, H, Sq, Sk) `position_bias` tensor; unpatched T5 models also work, with that tensor
added to the logits as a float `attn_mask`.

Learned biases of fastattn's own (no transformers equivalent): `add_relative_bias(model, M)`
and `add_alibi(model)` attach a `fastattn_rel_bias` table or `fastattn_alibi_slopes` to each
attention module, which `attention_forward` reads through the `module` argument.

Tested with transformers 5.24.0; `pip install fastattn[transformers]` pins the supported range.
"""
from __future__ import annotations

import inspect
import math
import types
from typing import Optional

import torch
from torch import Tensor

import transformers
from transformers import masking_utils

import fastattn
from fastattn.nn._common import alibi_slopes as _alibi_slopes

__all__ = ["register", "attention_forward", "attention_mask", "AttentionSpec", "patch_t5",
           "add_relative_bias", "add_alibi", "attention_modules", "DEFAULT_NAME"]

DEFAULT_NAME = "fastattn"
# transformers' own backends: registering under one of these names would replace it.
_RESERVED = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4",
             "flex_attention", "paged|eager")


def _fail(msg: str, exc=ValueError):
    raise exc(f"fastattn (transformers): {msg}")


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------
def register(name: str = DEFAULT_NAME) -> str:
    """Registers the attention function and its mask function with transformers under `name`
    (default "fastattn"), so that `attn_implementation=name` selects them. Calling it again is
    harmless (it re-registers the same functions). Returns the name."""
    if not isinstance(name, str):
        _fail(f"name must be a str, got {type(name).__name__}", TypeError)
    if not name or name in _RESERVED:
        _fail(f"name must be a non-empty name other than transformers' own backends {_RESERVED}, got {name!r}")
    transformers.AttentionInterface.register(name, attention_forward)
    transformers.AttentionMaskInterface.register(name, attention_mask)
    return name


# ---------------------------------------------------------------------------------------------
# the mask function
# ---------------------------------------------------------------------------------------------
class AttentionSpec:
    """Which keys each query sees, as fastattn's options (what `attention_mask` returns for the
    patterns it recognizes). Query i stands at position q_offset + i and key j at
    kv_offset + j (transformers' cache indices); the rules are fastattn's: causal keeps
    d = pos_q - pos_k >= 0, window (left, right) keeps -right <= d <= left (-1: unbounded);
    key_lengths (B,) hides keys j >= key_lengths[b] (right padding); key_mask (B, 1, 1, Sk)
    bool hides keys where it is False (any other padding); cu_seqlens (n_seq + 1,) splits the
    flattened (B * S) tokens into independent packed sequences (then the offsets are 0).

    `ndim` and `shape` ((B, 1, Sq, Sk), the dense mask it stands for) let transformers' mask
    code pass it through as it passes other prepared masks."""

    ndim = 4

    def __init__(self, batch, q_length, kv_length, q_offset, kv_offset, causal, window, key_lengths=None,
                 key_mask=None, cu_seqlens=None, max_seqlen=None, device=None):
        self.batch, self.q_length, self.kv_length = batch, q_length, kv_length
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.causal, self.window = causal, window
        self.key_lengths, self.key_mask = key_lengths, key_mask
        self.cu_seqlens, self.max_seqlen = cu_seqlens, max_seqlen
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @property
    def shape(self):
        return torch.Size((self.batch, 1, self.q_length, self.kv_length))

    def __repr__(self):
        parts = [f"causal={self.causal}", f"window={self.window}", f"q_offset={self.q_offset}",
                 f"kv_offset={self.kv_offset}"]
        if self.key_lengths is not None:
            parts.append(f"key_lengths={self.key_lengths.tolist()}")
        if self.key_mask is not None:
            parts.append("key_mask=(B, 1, 1, Sk)")
        if self.cu_seqlens is not None:
            parts.append(f"cu_seqlens={self.cu_seqlens.tolist()}")
        return f"AttentionSpec(shape={tuple(self.shape)}, {', '.join(parts)})"


def _cells(fn) -> dict:
    """A closure's free variables by name (empty for anything else)."""
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or closure is None:
        return {}
    try:
        return dict(zip(code.co_freevars, (c.cell_contents for c in closure)))
    except ValueError:  # an empty cell
        return {}


def _window_size(w) -> Optional[int]:
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        return None
    return w


def _pattern(fn):
    """(causal, left, right, packed_sequence_ids) for the mask functions that
    transformers.masking_utils builds from its own factories, in fastattn's terms; None for
    any other function (the caller then evaluates it densely)."""
    if fn is masking_utils.causal_mask_function:                    # kv <= q
        return True, -1, -1, None
    if fn is masking_utils.bidirectional_mask_function:             # q >= 0: every pair
        return False, -1, -1, None
    name, cells = getattr(fn, "__qualname__", ""), _cells(fn)
    if name == "sliding_window_overlay.<locals>.inner_mask":        # kv > q - w: d <= w - 1
        w = _window_size(cells.get("sliding_window"))
        return None if w is None else (False, w - 1, -1, None)
    if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":  # |q - kv| <= w
        w = _window_size(cells.get("sliding_window"))
        return None if w is None else (False, w, w, None)
    if name != "and_masks.<locals>.and_mask":
        return None
    parts = list(cells.get("mask_functions", ()))
    # Packed sequences: and_masks(remap(base, position_ids), packed(sequence ids)). Within one
    # sequence the positions step by 1, so base's rules on them are its rules on the indices.
    remap = [f for f in parts if getattr(f, "__qualname__", "").startswith("remap_positions_for_packed_sequence.")]
    packed = [f for f in parts if getattr(f, "__qualname__", "").startswith("packed_sequence_mask_function.")]
    packed_ids = None
    if remap or packed:
        if len(parts) != 2 or len(remap) != 1 or len(packed) != 1:
            return None
        parts = [_cells(remap[0]).get("mask_function")]
        packed_ids = _cells(packed[0]).get("packed_sequence_mask")
        if not isinstance(packed_ids, Tensor):
            return None
    causal, left, right = False, -1, -1
    for part in parts:
        p = _pattern(part)
        if p is None or p[3] is not None:
            return None
        causal = causal or p[0]
        left = p[1] if left < 0 else (left if p[1] < 0 else min(left, p[1]))
        right = p[2] if right < 0 else (right if p[2] < 0 else min(right, p[2]))
    return causal, left, right, packed_ids


def _key_padding(padding: Tensor):
    """(key_lengths, key_mask) for a (B, Sk) bool padding mask: None, None when every key is
    real; (B,) lengths when each row is a run of real keys then padding (right padding);
    otherwise a (B, 1, 1, Sk) bool mask, which the kernels read in place."""
    B, Sk = padding.shape
    if padding.numel() == 0 or bool(padding.all()):
        return None, None
    lengths = padding.sum(1)
    prefix = torch.arange(Sk, device=padding.device).unsqueeze(0) < lengths.unsqueeze(1)
    if torch.equal(prefix, padding):
        return lengths.to(torch.int64), None
    return None, padding[:, None, None, :]


def _cu_seqlens(sequence_ids: Tensor):
    """(cu_seqlens int32, max_seqlen) of the flattened (B * S) tokens from per-row sequence ids
    (masking_utils.find_packed_sequence_indices): a sequence starts where the id changes and
    at the start of every row."""
    B, S = sequence_ids.shape
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    first = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([first, first.new_tensor([B * S])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def _same_offset(a, b) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return bool(torch.all(torch.as_tensor(a) == torch.as_tensor(b)))
    return a == b


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function=masking_utils.causal_mask_function, attention_mask=None,
                   use_vmap: bool = False, device="cpu", **kwargs):
    """The mask function registered with AttentionMaskInterface (the signature of
    transformers.masking_utils.sdpa_mask). Returns an AttentionSpec for the patterns fastattn
    expresses natively, else the dense (B, 1, Sq, Sk) bool mask SDPA would get (True =
    attend), which attention_forward passes as `attn_mask`."""
    if isinstance(attention_mask, AttentionSpec):  # prepared earlier (generate with a static cache)
        spec = attention_mask
        if (spec.batch, spec.q_length, spec.kv_length) != (batch_size, q_length, kv_length) or not (
                _same_offset(spec.q_offset, q_offset) and _same_offset(spec.kv_offset, kv_offset)):
            _fail(f"attention_mask is an AttentionSpec for (B, Sq, Sk) = {(spec.batch, spec.q_length, spec.kv_length)}"
                  f" at offsets ({spec.q_offset}, {spec.kv_offset}), but this call needs "
                  f"{(batch_size, q_length, kv_length)} at ({q_offset}, {kv_offset})")
        return spec
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
        got = f"{attention_mask.dim()}-D tensor" if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        _fail(f"attention_mask must be a 2-D (batch, keys) padding mask here, got a {got}", TypeError)
    pattern = _pattern(mask_function)
    if pattern is not None and pattern[3] is not None and (
            attention_mask is not None or q_length != kv_length or not _same_offset(q_offset, 0)
            or not _same_offset(kv_offset, 0) or tuple(pattern[3].shape) != (batch_size, q_length)):
        pattern = None  # packed sequences with a cache or padding: the dense mask says it exactly
    if pattern is None:
        return masking_utils.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
            allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=use_vmap, device=device)
    causal, left, right, packed_ids = pattern
    # A static cache hands its length as a tensor that it updates in place: keep this call's value.
    q_offset = q_offset.clone() if isinstance(q_offset, Tensor) else q_offset
    kv_offset = kv_offset.clone() if isinstance(kv_offset, Tensor) else kv_offset
    key_lengths = key_mask = None
    if attention_mask is not None:
        # Key j stands at cache index kv_offset + j (masking_utils.padding_mask_function).
        padding = masking_utils.prepare_padding_mask(attention_mask.to(torch.bool), kv_length, kv_offset)
        key_lengths, key_mask = _key_padding(padding[:, kv_offset:kv_offset + kv_length].to(device))
    cu_seqlens = max_seqlen = None
    if packed_ids is not None:
        cu_seqlens, max_seqlen = _cu_seqlens(packed_ids.to(device))
    return AttentionSpec(batch_size, q_length, kv_length, q_offset, kv_offset, causal, (left, right),
                         key_lengths, key_mask, cu_seqlens, max_seqlen, device)


# ---------------------------------------------------------------------------------------------
# T5's relative position bias
# ---------------------------------------------------------------------------------------------
class T5RelativeBias:
    """What a patched T5 attention layer's `compute_bias` returns in place of the dense
    (1, H, Sq, Sk) bias: the layer whose embedding holds the buckets, and the query offset
    (past tokens) of the call. `table()` is the fastattn table of M = max_distance + 1: row
    d + M - 1 holds emb[bucket(-d)] (T5's relative position is key - query = -d); T5's buckets
    are constant for |d| >= max_distance, so fastattn's clamp of d to the table's edge gives
    T5's bias at every distance."""

    def __init__(self, layer, past_seen_tokens):
        self.layer, self.past = layer, past_seen_tokens

    def table(self) -> Tensor:
        layer = self.layer
        emb = layer.relative_attention_bias
        m = int(layer.relative_attention_max_distance) + 1
        d = torch.arange(-(m - 1), m, device=emb.weight.device)
        buckets = layer._relative_position_bucket(
            -d, bidirectional=not layer.is_decoder, num_buckets=layer.relative_attention_num_buckets,
            max_distance=layer.relative_attention_max_distance)
        return emb(buckets)  # (2M - 1, H): differentiable in the embedding


class _NoPositionBias:
    """A patched T5 layer without an embedding of its own (cross-attention): no bias, in place
    of the dense zeros T5 would build."""

    def __repr__(self):
        return "NO_POSITION_BIAS"


NO_POSITION_BIAS = _NoPositionBias()


def _is_t5_attention(m) -> bool:
    return all(hasattr(m, a) for a in ("compute_bias", "_relative_position_bucket", "has_relative_attention_bias",
                                       "relative_attention_max_distance", "relative_attention_num_buckets"))


def patch_t5(model) -> int:
    """Makes a T5-family model's relative-position bias reach fastattn as a table.

    On each T5 attention layer: `compute_bias` (the layers with a `relative_attention_bias`
    embedding) returns a `T5RelativeBias` (the table is built at each call from the embedding,
    so its gradient reaches the embedding), and `forward` (the layers without one) passes
    NO_POSITION_BIAS where T5 would build a dense zero bias. The model's
    attn_implementation must be a name `register` registered (only attention_forward reads
    these); patched layers are marked, and patching twice does nothing more. Returns the number
    of T5 attention layers (patched now or before)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl is None or transformers.AttentionInterface._global_mapping.get(impl) is not attention_forward:
        _fail(f"patch_t5 needs a model whose attn_implementation is fastattn's registered name "
              f"(register(), then attn_implementation='fastattn'), got {impl!r}")
    count = 0
    for m in model.modules():
        if not _is_t5_attention(m):
            continue
        count += 1
        if getattr(m, "_fastattn_patched", False):
            continue
        if m.has_relative_attention_bias:
            def compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
                return T5RelativeBias(self, past_seen_tokens)
            m.compute_bias = types.MethodType(compute_bias, m)
        else:
            m.forward = types.MethodType(_forward_without_bias(type(m).forward), m)
        m._fastattn_patched = True
    if count == 0:
        _fail(f"patch_t5 found no T5 attention layer in {type(model).__name__}")
    return count


def _forward_without_bias(forward):
    signature = inspect.signature(forward)

    def patched(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        if bound.arguments.get("position_bias") is None:
            bound.arguments["position_bias"] = NO_POSITION_BIAS
        return forward(*bound.args, **bound.kwargs)

    return patched


# ---------------------------------------------------------------------------------------------
# tables attached to the attention modules
# ---------------------------------------------------------------------------------------------
def attention_modules(model) -> list:
    """The modules that call the attention interface: classes named "...Attention" with a
    `config` and no "...Attention" child (BERT's BertAttention wraps BertSelfAttention, which
    is the one that calls it)."""
    found = []
    for m in model.modules():
        if not (type(m).__name__.endswith("Attention") and hasattr(m, "config")):
            continue
        if any(type(c).__name__.endswith("Attention") for c in m.children()):
            continue
        found.append(m)
    return found


def _num_heads(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    h = getattr(config, "num_attention_heads", None)
    if not isinstance(h, int) or h < 1:
        _fail(f"the model's config must give num_attention_heads (an int >= 1), got {h!r}")
    return h


def add_relative_bias(model, max_distance: int, *, std: float = 0.0, modules=None) -> list:
    """Attaches a learned relative-position table `fastattn_rel_bias` ((2 * max_distance - 1,
    H) Parameter, fastattn's rel_bias: row d + max_distance - 1 is added to the logits of
    distance d = pos_q - pos_k, clamped to the table) to each attention module (default
    `attention_modules(model)`), initialized N(0, std) (zeros for std 0). attention_forward
    adds it in every call of those modules. Returns the modules."""
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 1:
        _fail(f"max_distance must be an int >= 1, got {max_distance!r}")
    modules = attention_modules(model) if modules is None else list(modules)
    if not modules:
        _fail(f"add_relative_bias found no attention module in {type(model).__name__}")
    h = _num_heads(model)
    for m in modules:
        ref = next(m.parameters())
        table = torch.zeros(2 * max_distance - 1, h, dtype=ref.dtype, device=ref.device)
        if std > 0:
            table.normal_(0.0, std)
        m.register_parameter("fastattn_rel_bias", torch.nn.Parameter(table))
    return modules


def add_alibi(model, *, slopes: Optional[Tensor] = None, learnable: bool = False, modules=None) -> list:
    """Attaches ALiBi slopes `fastattn_alibi_slopes` ((H,) float32; default: ALiBi's geometric slopes, as `fastattn.nn` uses)
    to each attention module: a buffer, or a Parameter with learnable=True. attention_forward
    adds -slope[h] * |d| in every call of those modules. Returns the modules."""
    modules = attention_modules(model) if modules is None else list(modules)
    if not modules:
        _fail(f"add_alibi found no attention module in {type(model).__name__}")
    h = _num_heads(model)
    if slopes is None:
        slopes = _alibi_slopes(h)
    if not isinstance(slopes, Tensor) or tuple(slopes.shape) != (h,):
        got = tuple(slopes.shape) if isinstance(slopes, Tensor) else type(slopes).__name__
        _fail(f"slopes must be a ({h},) tensor (one per attention head), got {got}")
    for m in modules:
        s = slopes.detach().to(device=next(m.parameters()).device, dtype=torch.float32).clone()
        if learnable:
            m.register_parameter("fastattn_alibi_slopes", torch.nn.Parameter(s))
        else:
            m.register_buffer("fastattn_alibi_slopes", s)
    return modules


# ---------------------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------------------
def _offset_tensor(value, batch: int, device) -> Tensor:
    """An offset (int or tensor from the cache) as the (B,) int64 tensor fastattn takes."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=torch.int64).reshape(-1).expand(batch).contiguous()
    return torch.full((batch,), int(value), dtype=torch.int64, device=device)


def _packed_from_kwargs(kwargs, B, Sq, Sk):
    """cu_seq_lens_q/k and max_length_q/k (DataCollatorWithFlattening's flash-attention
    arguments) as (cu_q, cu_k, max_q, max_k), or None when they are not given."""
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    given = [kwargs.get(n) is not None for n in names]
    if not any(given):
        return None
    if not all(given):
        _fail(f"cu_seq_lens_q, cu_seq_lens_k, max_length_q and max_length_k go together, got only "
              f"{[n for n, g in zip(names, given) if g]}")
    cu_q, cu_k, max_q, max_k = (kwargs[n] for n in names)
    for cu, name, total in ((cu_q, "cu_seq_lens_q", B * Sq), (cu_k, "cu_seq_lens_k", B * Sk)):
        if not isinstance(cu, Tensor) or cu.dim() != 1:
            _fail(f"{name} must be a 1-D integer tensor, got {type(cu).__name__}", TypeError)
        if int(cu[-1]) != total:
            _fail(f"{name} must end at the number of tokens of the batch (B * S = {total}), got {int(cu[-1])}")
    return cu_q, cu_k, int(max_q), int(max_k)


def _visibility(module, mask, B, Sq, Sk, is_causal, sliding_window, device, kwargs):
    """fastattn options for which keys each query sees, from the model's attention_mask (an
    AttentionSpec, a 4-D tensor, or None), and the packed layout (cu_q, cu_k, max_q, max_k) or
    None."""
    opts = {}
    packed = _packed_from_kwargs(kwargs, B, Sq, Sk)
    if isinstance(mask, AttentionSpec):
        if (mask.q_length, mask.kv_length) != (Sq, Sk) or mask.batch != B:
            _fail(f"attention_mask describes (B, Sq, Sk) = {(mask.batch, mask.q_length, mask.kv_length)}, "
                  f"but query/key give {(B, Sq, Sk)}")
        opts.update(causal=mask.causal, window=mask.window, key_lengths=mask.key_lengths, attn_mask=mask.key_mask,
                    q_offset=_offset_tensor(mask.q_offset, B, device), k_offset=_offset_tensor(mask.kv_offset, B, device))
        if mask.cu_seqlens is not None:
            spec_packed = (mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen)
            if packed is not None and not (torch.equal(packed[0].long().cpu(), mask.cu_seqlens.long().cpu())
                                           and torch.equal(packed[1].long().cpu(), mask.cu_seqlens.long().cpu())):
                _fail(f"cu_seq_lens_q/k ({packed[0].tolist()}) disagree with the sequences that position_ids "
                      f"delimit ({mask.cu_seqlens.tolist()})")
            packed = packed or spec_packed
        elif packed is not None and (mask.key_lengths is not None or mask.key_mask is not None
                                     or not _same_offset(mask.q_offset, 0)):
            _fail("cu_seq_lens_q/k (packed sequences) cannot be combined with a padding mask or a cache")
    elif isinstance(mask, Tensor):
        if mask.dim() != 4 or mask.shape[-1] != Sk or mask.shape[-2] not in (1, Sq):
            _fail(f"attention_mask must be a 4-D (B, 1 or H, Sq, Sk) mask with Sq = {Sq}, Sk = {Sk}, "
                  f"got shape {tuple(mask.shape)}")
        if packed is not None:
            _fail("cu_seq_lens_q/k (packed sequences) cannot be combined with a 4-D attention_mask")
        opts.update(causal=False, attn_mask=mask)  # the mask says it all, as SDPA reads it
    elif mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        opts["causal"] = causal
        if sliding_window is not None:  # flash-attention's reading: sliding_window - 1 keys back
            w = _window_size(sliding_window)
            if w is None:
                _fail(f"sliding_window must be an int >= 1 or None, got {sliding_window!r}")
            opts["window"] = (w - 1, -1 if causal else w - 1)
        position_ids = kwargs.get("position_ids")
        if packed is None and isinstance(position_ids, Tensor) and position_ids.dim() == 2 and Sq == Sk:
            ids = masking_utils.find_packed_sequence_indices(position_ids.expand(B, -1))
            if ids is not None:
                cu, max_len = _cu_seqlens(ids)
                packed = (cu, cu, max_len, max_len)
    else:
        _fail(f"attention_mask must be None, a 4-D tensor or fastattn's AttentionSpec (the model's masks must "
              f"come from the mask function registered with it), got {type(mask).__name__}", TypeError)
    return opts, packed


def _merge_dense_bias(opts, bias: Tensor):
    """A float (.., Sq, Sk) bias added to the logits through attn_mask, combined with the mask
    already there (bool: -inf where it hides; float: summed)."""
    mask = opts.get("attn_mask")
    if mask is None:
        opts["attn_mask"] = bias
    elif mask.dtype == torch.bool:
        opts["attn_mask"] = bias.masked_fill(~mask, -math.inf)
    else:
        opts["attn_mask"] = mask + bias


def _biases(module, position_bias, opts, packed, B: int, device):
    """Adds the logit biases: the module's fastattn tables, T5's position bias."""
    table = getattr(module, "fastattn_rel_bias", None)
    slopes = getattr(module, "fastattn_alibi_slopes", None)
    if table is not None:
        opts["rel_bias"] = table
    if slopes is not None:
        opts["alibi_slopes"] = slopes
    if position_bias is None or position_bias is NO_POSITION_BIAS:
        return
    if isinstance(position_bias, T5RelativeBias):
        if table is not None:
            _fail("position_bias (T5's relative bias) and the module's fastattn_rel_bias cannot both be applied")
        opts["rel_bias"] = position_bias.table()
        # T5 places query i at past + i and key j at j (compute_bias).
        past = _offset_tensor(position_bias.past, B, device)
        if "q_offset" in opts and not (torch.equal(opts["q_offset"], past)
                                       and not bool(opts["k_offset"].any())):
            _fail(f"position_bias places the queries after {past.tolist()} past tokens, but attention_mask at "
                  f"q_offset {opts['q_offset'].tolist()}, k_offset {opts['k_offset'].tolist()}")
        opts["q_offset"], opts["k_offset"] = past, torch.zeros_like(past)
        return
    if not isinstance(position_bias, Tensor):
        _fail(f"position_bias must be None, a tensor or T5RelativeBias, got {type(position_bias).__name__}", TypeError)
    if not position_bias.requires_grad and not bool(position_bias.any()):
        return  # T5's zeros for layers without an embedding: nothing to add
    if packed is not None:
        _fail("a dense position_bias cannot be combined with packed sequences (cu_seq_lens / position_ids)")
    _merge_dense_bias(opts, position_bias)


def _check_inputs(query, key, value):
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if not isinstance(t, Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        if t.dim() != 4:
            _fail(f"{name} must be (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")


def _sink_factor(s_aux, lse: Tensor, Hq: int) -> Tensor:
    """exp(lse) / (exp(lse) + exp(s_aux[h])) = sigmoid(lse - s_aux): the share of the weights
    that a sink logit s_aux[h] in the softmax leaves to the keys (0 for a row with no key)."""
    if not isinstance(s_aux, Tensor) or s_aux.numel() != Hq:
        got = tuple(s_aux.shape) if isinstance(s_aux, Tensor) else type(s_aux).__name__
        _fail(f"s_aux (the attention sinks) must be a tensor of {Hq} values (one per query head), got {got}")
    return torch.sigmoid(lse - s_aux.reshape(-1, 1).float())


def _output_attentions(module, kwargs) -> bool:
    flag = kwargs.get("output_attentions")
    if flag is None:
        flag = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(flag)


def _call_packed(query, key, value, packed, opts, dropout_p):
    B, Hq, Sq, _ = query.shape
    Sk = key.shape[2]
    for name in ("key_lengths", "attn_mask"):  # (the spec's offsets are 0 for packed sequences)
        if opts.get(name) is not None:
            _fail(f"packed sequences cannot be combined with {name}")
    cu_q, cu_k, max_q, max_k = packed
    flat = [t.transpose(1, 2).reshape(B * t.shape[2], t.shape[1], t.shape[3]) for t in (query, key, value)]
    out, lse = fastattn.attention_varlen(
        *flat, cu_q, cu_k, max_q, max_k, scale=opts.get("scale"), causal=opts.get("causal", False),
        window=opts.get("window", (-1, -1)), rel_bias=opts.get("rel_bias"), alibi_slopes=opts.get("alibi_slopes"),
        softcap=opts.get("softcap", 0.0), dropout_p=dropout_p, return_lse=True)
    # (total, Hq, Dv) -> (B, Hq, Sq, Dv); lse (Hq, total) -> (B, Hq, Sq)
    out = out.reshape(B, Sq, Hq, -1).transpose(1, 2)
    lse = lse.reshape(Hq, B, Sq).transpose(0, 1)
    return out, lse


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                      scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, is_causal: Optional[bool] = None, s_aux: Optional[Tensor] = None,
                      position_bias=None, **kwargs):
    """The attention function registered with AttentionInterface (the contract of
    transformers' sdpa_attention_forward): query (B, Hq, Sq, D), key / value (B, Hkv, Sk, D)
    with Hq a multiple of Hkv (GQA / MQA read natively); returns (attn_output (B, Sq, Hq, Dv)
    contiguous, attn_weights (B, Hq, Sq, Sk) when output_attentions is asked, else None).

    attention_mask decides visibility: an AttentionSpec (from `attention_mask`, this module's
    mask function) maps to causal / window / offsets / key padding / packed sequences; a 4-D
    tensor (the dense fallback or a user's own mask: bool True = attend, or float added) is
    `attn_mask`, with nothing else (as SDPA reads it); None means the module's causality and
    `sliding_window` (flash-attention's reading: sliding_window - 1 keys back), with packing
    from cu_seq_lens_q/k or position_ids."""
    _check_inputs(query, key, value)
    B, Hq, Sq, _ = query.shape
    Sk = key.shape[2]
    opts, packed = _visibility(module, attention_mask, B, Sq, Sk, is_causal, sliding_window, query.device, kwargs)
    _biases(module, position_bias, opts, packed, B, query.device)
    if scaling is not None:
        opts["scale"] = float(scaling)
    if softcap is not None:
        opts["softcap"] = float(softcap)
    dropout_p = float(dropout) if getattr(module, "training", False) else 0.0
    need_lse = s_aux is not None
    if packed is not None:
        out, lse = _call_packed(query, key, value, packed, opts, dropout_p)
    else:
        out, lse = fastattn.attention(query, key, value, dropout_p=dropout_p, return_lse=True, **opts)
    factor = _sink_factor(s_aux, lse, Hq) if need_lse else None
    if factor is not None:
        out = out * factor.unsqueeze(-1).to(out.dtype)
    weights = None
    if _output_attentions(module, kwargs):
        if dropout_p > 0:
            _fail("output_attentions in training with attention dropout > 0 is not supported: fastattn draws its "
                  "dropout mask in the kernel and returns the undropped probabilities only; call model.eval() or "
                  "set the attention dropout to 0")
        if packed is not None:
            _fail("output_attentions with packed sequences (cu_seq_lens / position_ids) is not supported; "
                  "run the sequences padded in a batch instead")
        weights = fastattn.attention_weights(query, key, **opts)
        if factor is not None:
            weights = weights * factor.unsqueeze(-1).to(weights.dtype)
    return out.transpose(1, 2).contiguous(), weights
