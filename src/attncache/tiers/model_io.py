"""What the prefix tier needs to know about a decoder: its cache keyword, how its layers attend
(all earlier keys, or a sliding window of them) and so which masks it takes, its output head, and a
K/V cache made of stored prefixes."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM

from .packing import Packed

# transformers renamed ``past_key_values`` to ``cache`` during 5.x; use whichever this version takes
CACHE_KW = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)


# the layer types whose keys a prefix cache can hold exactly, and the mask each takes
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class MaskLayout:
    """How a decoder's layers attend, as the prefix tier must mask them.

    ``window``: the sliding layers' window (a query at position ``q`` sees keys at positions
    ``k`` with ``q - k < window``, transformers' rule); None when no layer slides. ``per_type``:
    full and sliding layers both exist, so a custom mask goes in as ``{layer type: mask}``."""

    window: int | None = None
    per_type: bool = False


def mask_layout(model: nn.Module) -> MaskLayout | None:
    """The decoder's ``MaskLayout``; None where the tier cannot be exact: layer types other than
    full and sliding attention (chunked, linear, ...), or full and sliding layers in a model
    whose forward takes one mask for all of them."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    window = getattr(cfg, "sliding_window", None)
    types = set(getattr(cfg, "layer_types", None) or [])
    if not types:  # no per-layer types: every layer slides when a window is set (Mistral)
        # as the model decides: these families read ``sliding_window`` alone (configs with a
        # ``use_sliding_window`` flag clear their window themselves when it is off)
        return MaskLayout(window if window else None)
    if not types <= {FULL, SLIDING} or (SLIDING in types and not window):
        return None
    if types == {FULL}:
        return MaskLayout()
    if types == {SLIDING}:
        return MaskLayout(window)
    return MaskLayout(window, True) if _takes_mask_per_type(model) else None


def _takes_mask_per_type(model: nn.Module) -> bool:
    """Whether the decoder's forward accepts a ready ``{layer type: mask}`` (Gemma 2/3, Qwen2/3,
    Cohere2, OLMo 3 do: their forward skips building masks when handed a dict). Read from its
    source, as no attribute says so."""
    decoder = getattr(model, "get_decoder", lambda: model)()
    try:
        source = inspect.getsource(type(decoder).forward)
    except (OSError, TypeError):
        return False
    return "attention_mask, dict)" in source


def supports_prefix(model: nn.Module) -> bool:
    """Whether prefixes can be reused exactly: every layer attends to all earlier keys or to a
    sliding window of them, and the tier can hand each layer type its mask."""
    return mask_layout(model) is not None


def attention_mask(packed: Packed, layout: MaskLayout, dtype: torch.dtype):
    """The custom mask of one packed forward: one tensor, or a tensor per layer type."""
    if layout.window is None:
        return packed.mask(dtype)
    sliding = packed.mask(dtype, layout.window)
    if not layout.per_type:
        return sliding
    return {FULL: packed.mask(dtype), SLIDING: sliding}


def empty_cache() -> DynamicCache:
    """A cache whose every layer keeps all its keys. Given no cache, a model with sliding layers
    makes one that keeps only a window of them, and the tree needs every position's K/V."""
    return DynamicCache()


def plain_head(model: nn.Module) -> nn.Module | None:
    """The output projection, when logits are nothing but it applied to the decoder's last hidden
    states (no soft-capping or scaling), so the tier can apply it to exactly the positions each
    input needs; a packed forward would otherwise compute every row at every row's positions."""
    cfg = model.config
    scaled = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
    if any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in scaled):
        return None
    head, decoder = model.get_output_embeddings(), getattr(model, "get_decoder", lambda: None)()
    if not isinstance(head, nn.Linear) or decoder is None or decoder is model:
        return None
    return head


def output_cache(res):
    return getattr(res, "cache", None) if CACHE_KW == "cache" else res.past_key_values


def stacked_cache(kvs: list[torch.Tensor | None], width: int, same: bool) -> DynamicCache:
    """Per row a prefix's K/V ``[n_layers, 2, H_kv, P, d]`` (None: the row has none) as one cache,
    right-aligned in ``width`` positions (zeros elsewhere: callers mask them). ``same``: every row
    holds the same prefix, which is then an expanded view, not a copy. Every layer keeps every
    position, sliding ones too (the masks apply their windows)."""
    count = len(kvs)
    if same:
        stacked = kvs[0].unsqueeze(2).expand(-1, -1, count, -1, -1, -1)
    else:
        ref = next(kv for kv in kvs if kv is not None)
        n_layers, _, n_kv, _, d = ref.shape
        stacked = ref.new_zeros((n_layers, 2, count, n_kv, width, d))
        for r, kv in enumerate(kvs):
            if kv is not None:
                stacked[:, :, r, :, width - kv.shape[3] :] = kv
    return DynamicCache(
        ddp_cache_data=[(stacked[i, 0], stacked[i, 1]) for i in range(len(stacked))]
    )


def span_kv(cache, row: int, at: int, n: int) -> torch.Tensor:
    """K/V of ``n`` positions of one row of a forward's cache: ``[n_layers, 2, H_kv, n, d]``."""
    return torch.stack(
        [
            torch.stack([la.keys[row, :, at : at + n], la.values[row, :, at : at + n]])
            for la in cache.layers
        ]
    )


def padded_kv(
    cache, lengths: list[int], replayed: list[bool], wanted: list[bool]
) -> dict[int, torch.Tensor]:
    """K/V ``[n_layers, 2, H_kv, n, d]`` of each ``wanted`` row of a left-padded batch's cache.
    A layer where some rows replayed a map holds only the rows that computed keys, in batch order,
    so a row's index there counts the rows before it that did not replay (``wanted`` plays no part:
    a row computed but not kept still holds its place). A replayed row has no keys to give."""
    count, width = len(lengths), max(lengths)
    computed = [j for j in range(count) if not replayed[j]]
    out = {}
    for j in computed:
        if not wanted[j]:
            continue
        layers = []
        for layer in cache.layers:
            k, v = layer.keys, layer.values
            r = j if k.shape[0] == count else computed.index(j)
            at = width - lengths[j]
            layers.append(torch.stack([k[r, :, at:], v[r, :, at:]]))
        out[j] = torch.stack(layers)
    return out
