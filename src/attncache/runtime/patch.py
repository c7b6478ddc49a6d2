"""Run-time patching of an unmodified Hugging Face model, where no registry can reach.

Replaying a map skips the Q and K projections, which run *before* the attention function the
``AttentionInterface`` registry dispatches to, so the attention modules' forwards are replaced for
the duration of a ``with`` block:

- a forward pre-hook on the top-level model sees every call's inputs (``on_forward(inputs)``), used
to
  look up the cache once per batch before layer 0 runs, and may edit the call's kwargs;
- an instance-level ``forward`` on every self-attention module hands control to
  ``on_attention(layer, module, original_forward, hidden_states, args, kwargs)``.

Leaving the block restores every module exactly: an instance-level forward that was there before
(one accelerate installs on device-mapped models, say) is put back, otherwise the instance attribute
is deleted so the class's forward shows again. Nothing is set on the model object besides those
forwards; which models are patched is tracked here.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter

_PATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_MISSING = object()


@dataclass
class ForwardInputs:
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    token_type_ids: torch.Tensor | None
    has_past: bool
    wants_cache: bool = False  # the caller asked for a KV cache (the prefix tier, to insert it)


def forward_inputs(args: tuple, kwargs: dict) -> ForwardInputs:
    names = ("input_ids", "attention_mask")
    got = dict(zip(names, args, strict=False))
    got.update({k: kwargs[k] for k in names if k in kwargs})
    past = kwargs.get("cache", kwargs.get("past_key_values"))
    has_past = past is not None and getattr(past, "get_seq_length", lambda: 0)() > 0
    return ForwardInputs(
        got.get("input_ids"),
        got.get("attention_mask"),
        kwargs.get("token_type_ids"),
        has_past,
        kwargs.get("use_cache") is True,
    )


def is_patched(model: nn.Module) -> bool:
    return model in _PATCHED


@contextlib.contextmanager
def patched(
    model: nn.Module,
    adapter: Adapter,
    on_forward: Callable[[ForwardInputs], None],
    on_attention: Callable,
) -> Iterator[None]:
    if model in _PATCHED:
        raise RuntimeError("a cache is already attached to this model; detach it first")
    modules = adapter.attention_modules(model)

    def pre_hook(_mod, args, kwargs):
        inputs = forward_inputs(args, kwargs)
        # Prefill-only: a KV cache would only be filled for the rows that compute their keys, so
        # don't build one unless the caller asked (the prefix tier asks, and knows which rows are
        # whole).
        if adapter.causal and "use_cache" not in kwargs:
            kwargs["use_cache"] = False
        on_forward(inputs)
        return args, kwargs

    def make_forward(layer: int, module: nn.Module, original: Callable):
        def forward(hidden_states, *args, **kwargs):
            return on_attention(layer, module, original, hidden_states, args, kwargs)

        return forward

    saved = [m.__dict__.get("forward", _MISSING) for m in modules]
    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    _PATCHED.add(model)
    try:
        for i, m in enumerate(modules):
            m.forward = make_forward(i, m, m.forward)  # the bound method or the instance forward
        yield
    finally:
        handle.remove()
        for m, old in zip(modules, saved, strict=True):
            if old is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old
        _PATCHED.discard(model)


def slice_batch(obj, idx: torch.Tensor, batch: int):
    """Select rows ``idx`` of every tensor whose leading dim is the batch (recursing into
    containers)."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.dim() > 0 and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, tuple):
        return tuple(slice_batch(o, idx, batch) for o in obj)
    if isinstance(obj, list):
        return [slice_batch(o, idx, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: slice_batch(v, idx, batch) for k, v in obj.items()}
    return obj
