"""Capture attention maps and projector inputs during a forward.

Maps are taken from the model's own eager attention (switched on for the recording pass only), so
what is stored is exactly ``softmax(QK^T * scale + mask)`` as the model computes it, per query head.

The projector input ("features") is the mean over the real tokens of the layer-0 normalised token
embeddings, plus ``log(L)``: cheap (an embedding gather and one norm), available before layer 0
runs, and the same for recording and lookup.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .adapters import Adapter
from .patch import ForwardInputs, patched


def spans(attention_mask: torch.Tensor | None, batch: int, T: int) -> list[tuple[int, int] | None]:
    """Real-token [start, end) per item; None where the mask is not one contiguous run."""
    if attention_mask is None:
        return [(0, T)] * batch
    out: list[tuple[int, int] | None] = []
    m = attention_mask.bool()
    for b in range(batch):
        idx = torch.nonzero(m[b]).flatten()
        if len(idx) == 0:
            out.append(None)
            continue
        s, e = int(idx[0]), int(idx[-1]) + 1
        out.append((s, e) if e - s == len(idx) else None)
    return out


@torch.no_grad()
def features(model: nn.Module, adapter: Adapter, inputs: ForwardInputs) -> tuple[np.ndarray, list]:
    """[B, D+1] float32 projector inputs and the per-item spans."""
    ids = inputs.input_ids
    B, T = ids.shape
    sp = spans(inputs.attention_mask, B, T)
    tok = adapter.token_features(model, ids, token_type_ids=inputs.token_type_ids).float()
    out = np.zeros((B, tok.shape[-1] + 1), dtype=np.float32)
    for b, s in enumerate(sp):
        if s is None:
            continue
        out[b, :-1] = tok[b, s[0] : s[1]].mean(0).cpu().numpy()
        out[b, -1] = math.log(s[1] - s[0])
    return out, sp


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    old = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


class Recorder:
    """Use as ``with Recorder(model, adapter) as rec: model(...)``; then ``rec.take()``."""

    def __init__(self, model: nn.Module, adapter: Adapter, layers: list[int]):
        self.model, self.adapter, self.layers = model, adapter, layers
        self._maps: dict[int, torch.Tensor] = {}
        self._inputs: ForwardInputs | None = None
        self._stack = contextlib.ExitStack()

    def _on_forward(self, inputs: ForwardInputs) -> None:
        self._inputs = inputs
        self._maps.clear()

    def _on_attention(self, layer, module, original, hidden, args, kwargs):
        out, weights = original(hidden, *args, **kwargs)
        if layer in self.layers:
            assert weights is not None and weights.dim() == 4, "eager attention returned no weights"
            self._maps[layer] = weights.detach()
        return out, weights

    def __enter__(self) -> Recorder:
        self._stack.enter_context(eager_attention(self.model))
        self._stack.enter_context(patched(self.model, self.adapter, self._on_forward, self._on_attention))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def take(self) -> tuple[list[np.ndarray | None], np.ndarray]:
        """Per item [n_layers, H, L, L] float32 maps (None for unusable rows), and features."""
        assert self._inputs is not None, "no forward was recorded"
        feats, sp = features(self.model, self.adapter, self._inputs)
        stacked = torch.stack([self._maps[layer] for layer in self.layers], dim=1)  # [B, nl, H, T, T]
        maps = []
        for b, s in enumerate(sp):
            maps.append(None if s is None else stacked[b, :, :, s[0] : s[1], s[0] : s[1]].float().cpu().numpy())
        return maps, feats
