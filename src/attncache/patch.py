"""Run-time patching of an unmodified Hugging Face model.

``patched(model, adapter, on_forward, on_attention)`` installs, for the duration of a ``with`` block:

- a forward pre-hook on the top-level model that sees every call's inputs (``on_forward(inputs)``),
  used to look up the cache once per batch before layer 0 runs;
- an instance-level ``forward`` on every self-attention module that hands control to
  ``on_attention(layer, module, original_forward, hidden_states, args, kwargs)``.

Leaving the block removes both, restoring the modules exactly (the instance attribute is deleted so
the class's forward is visible again). Nothing is forked or copied from the modeling files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter


@dataclass
class ForwardInputs:
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    token_type_ids: torch.Tensor | None
    has_past: bool
    wants_cache: bool = False  # the caller asked for a KV cache (the prefix tier, to insert it)


def _forward_inputs(args: tuple, kwargs: dict) -> ForwardInputs:
    names = ("input_ids", "attention_mask")
    got = dict(zip(names, args))
    got.update({k: kwargs[k] for k in names if k in kwargs})
    past = kwargs.get("cache", kwargs.get("past_key_values"))
    has_past = past is not None and getattr(past, "get_seq_length", lambda: 0)() > 0
    return ForwardInputs(got.get("input_ids"), got.get("attention_mask"), kwargs.get("token_type_ids"), has_past,
                         kwargs.get("use_cache") is True)


@contextlib.contextmanager
def patched(
    model: nn.Module,
    adapter: Adapter,
    on_forward: Callable[[ForwardInputs], None],
    on_attention: Callable,
) -> Iterator[None]:
    if getattr(model, "_attncache_patched", False):
        raise RuntimeError("a cache is already attached to this model; detach it first")
    modules = adapter.attention_modules(model)

    def pre_hook(_mod, args, kwargs):
        # Prefill-only: a KV cache would only be filled for the rows that compute their keys, so
        # don't build one unless the caller asked (the prefix tier asks, and knows which rows are whole).
        inputs = _forward_inputs(args, kwargs)
        if adapter.causal and "use_cache" not in kwargs:
            kwargs["use_cache"] = False
        on_forward(inputs)
        return args, kwargs

    def make_forward(layer: int, module: nn.Module):
        original = module.forward  # the bound class method

        def forward(hidden_states, *args, **kwargs):
            return on_attention(layer, module, original, hidden_states, args, kwargs)

        return forward

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model._attncache_patched = True
    try:
        for i, m in enumerate(modules):
            m.forward = make_forward(i, m)
        yield
    finally:
        handle.remove()
        for m in modules:
            if "forward" in m.__dict__:
                del m.forward
        model._attncache_patched = False


def slice_batch(obj, idx: torch.Tensor, batch: int):
    """Select rows ``idx`` of every tensor whose leading dim is the batch (recursing into tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.dim() > 0 and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, tuple):
        return tuple(slice_batch(o, idx, batch) for o in obj)
    if isinstance(obj, list):
        return [slice_batch(o, idx, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: slice_batch(v, idx, batch) for k, v in obj.items()}
    return obj
