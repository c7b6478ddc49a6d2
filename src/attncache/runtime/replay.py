"""Replay one attention module for a group of items from given maps (the hit path of a layer).

Whole layers: ``out = o_proj(A @ v_proj(h))``; Q/K projections, rotary embedding and QK^T/softmax
never run. Some heads only: those heads come from maps, the others are computed exactly (their Q
rows and the K of their KV groups). Padding: only the real-token block ``[s:e, s:e]`` of a padded
item carries the map; padded rows get zero heads (no real token attends to them: the mask hides
them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..db import Shape
from .adapters import Adapter
from .features import Span
from .kernels import apply_head_maps, apply_maps, index_tensor


@dataclass
class ModuleCall:
    """One attention module's call for a group of items: their hidden states ``[b, T, D]``, each
    item's real-token span, and the call's keyword arguments (mask, rotary embeddings)."""

    module: nn.Module
    hidden: torch.Tensor
    spans: list[Span]
    kwargs: dict


def replay(
    adapter: Adapter,
    shape: Shape,
    call: ModuleCall,
    maps: list[torch.Tensor],
    heads: tuple[int, ...],
) -> torch.Tensor:
    """The module's output ``[b, T, D]`` for items whose ``heads`` replay ``maps`` (one per
    item)."""
    module, hidden, spans = call.module, call.hidden, call.spans
    v = adapter.values(module, hidden, shape)  # [b, H_kv, T, d]
    width = hidden.shape[1]
    if len(heads) < shape.n_heads:
        return _replay_heads(adapter, shape, call, v, maps, heads)
    if all(span == (0, width) for span in spans):
        out = torch.stack([apply_maps(a, v[j], shape.group) for j, a in enumerate(maps)])
    else:
        out = v.new_zeros((len(maps), shape.n_heads, width, shape.head_dim))
        for j, (a, (start, end)) in enumerate(zip(maps, spans, strict=True)):
            out[j, :, start:end] = apply_maps(a, v[j, :, start:end], shape.group)
    return adapter.output(module, out)


def _replay_heads(
    adapter: Adapter,
    shape: Shape,
    call: ModuleCall,
    v: torch.Tensor,
    maps: list[torch.Tensor],
    reused: tuple[int, ...],
) -> torch.Tensor:
    module, hidden, spans = call.module, call.hidden, call.spans
    computed = [h for h in range(shape.n_heads) if h not in set(reused)]
    width = hidden.shape[1]
    out = v.new_zeros((len(maps), shape.n_heads, width, shape.head_dim))
    exact = adapter.attend(module, hidden, v, computed, call.kwargs, shape)
    device = str(v.device)
    out[:, index_tensor(tuple(computed), device)] = exact.to(out.dtype)
    kv_of = index_tensor(tuple(h // shape.group for h in reused), device)
    sel = index_tensor(tuple(reused), device)
    for j, (a, (start, end)) in enumerate(zip(maps, spans, strict=True)):
        out[j, :, :start] = 0  # padded rows: whatever the exact path produced there is unused
        out[j, :, end:] = 0
        out[j, sel, start:end] = apply_head_maps(a.to(v.device), v[j, :, start:end], kv_of)
    return adapter.output(module, out)
