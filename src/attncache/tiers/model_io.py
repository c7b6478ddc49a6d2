"""What the prefix tier needs to know about a decoder: its cache keyword, whether its cache keeps
every key, its output head, and a K/V cache made of stored prefixes."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM

# transformers renamed ``past_key_values`` to ``cache`` during 5.x; use whichever this version takes
CACHE_KW = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)


def supports_prefix(model: nn.Module) -> bool:
    """Whether every layer's cache keeps all keys (no sliding window), so prefixes can be reused."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    types = getattr(cfg, "layer_types", None)
    if types:
        return not any("sliding" in str(t) for t in types)
    return (
        not getattr(cfg, "sliding_window", None)
        or getattr(cfg, "use_sliding_window", True) is False
    )


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


def stacked_cache(kvs: list[torch.Tensor | None], width: int, same: bool, config) -> DynamicCache:
    """Per row a prefix's K/V ``[n_layers, 2, H_kv, P, d]`` (None: the row has none) as one cache,
    right-aligned in ``width`` positions (zeros elsewhere: callers mask them). ``same``: every row
    holds the same prefix, which is then an expanded view, not a copy."""
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
        ddp_cache_data=[(stacked[i, 0], stacked[i, 1]) for i in range(len(stacked))],
        config=config,
    )


def span_kv(cache, row: int, at: int, n: int) -> torch.Tensor:
    """K/V of ``n`` positions of one row of a forward's cache: ``[n_layers, 2, H_kv, n, d]``."""
    return torch.stack(
        [
            torch.stack([la.keys[row, :, at : at + n], la.values[row, :, at : at + n]])
            for la in cache.layers
        ]
    )
