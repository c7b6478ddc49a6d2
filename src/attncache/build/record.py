"""Capture attention maps through transformers' attention-function registry.

``attncache_record`` is registered as an attention implementation that calls the model's *own* eager
attention function (``eager_attention_forward`` of its modeling file) and keeps the weights it
returns, so what is stored is exactly ``softmax(QK^T * scale + mask)`` as the model computes it, per
query head, windows and GQA included. While a ``Recorder`` is open the model runs with that
implementation; nothing is patched and no forward is replaced.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..inputs import collate, length_batches
from ..progress import Stage
from ..runtime.adapters import Adapter
from ..runtime.features import features, spans

RECORD = "attncache_record"


@dataclass
class _Slot:
    tap: AttentionTap
    layer: int


_SLOTS: weakref.WeakKeyDictionary[nn.Module, _Slot] = weakref.WeakKeyDictionary()


def _eager_of(module: nn.Module):
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(
            f"{type(module).__name__} has no eager attention function to record from"
        )
    return fn


def _record_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    out, weights = _eager_of(module)(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    slot = _SLOTS.get(module)
    if slot is not None:
        out = slot.tap.on_weights(slot.layer, weights, value, out)
    return out, weights


AttentionInterface.register(RECORD, _record_attention)
AttentionMaskInterface.register(RECORD, eager_mask)


@dataclass
class Recorded:
    """One batch: per item ``[n_layers, H, L, L]`` float32 maps (None for unusable rows), and
    features."""

    maps: list[np.ndarray | None]
    feats: np.ndarray


class AttentionTap:
    """While open, the model runs its own eager attention and ``on_weights`` sees every layer's
    maps."""

    def __init__(self, model: nn.Module, adapter: Adapter):
        self.model, self.adapter = model, adapter
        self._modules = adapter.attention_modules(model)
        self._old_impl: str | None = None

    def on_weights(
        self, layer: int, weights: torch.Tensor, value: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """Called per layer with the maps [B, H, T, T]; returns the attention output to use."""
        return out

    def __enter__(self):
        for i, module in enumerate(self._modules):
            _SLOTS[module] = _Slot(self, i)
        self._old_impl = self.model.config._attn_implementation
        self.model.set_attn_implementation(RECORD)
        return self

    def __exit__(self, *exc) -> None:
        self.model.set_attn_implementation(self._old_impl)
        for module in self._modules:
            _SLOTS.pop(module, None)


class Recorder(AttentionTap):
    """``with Recorder(model, adapter, layers) as rec: got = rec.run(inputs)``."""

    def __init__(self, model: nn.Module, adapter: Adapter, layers: list[int]):
        super().__init__(model, adapter)
        self.layers = list(layers)
        self._maps: dict[int, torch.Tensor] = {}

    def on_weights(self, layer, weights, value, out):
        if layer in self.layers:
            self._maps[layer] = weights.detach()
        return out

    @torch.no_grad()
    def run(self, inputs: dict[str, torch.Tensor]) -> Recorded:
        """Forward one collated batch and return its maps (real-token blocks only) and features."""
        self._maps.clear()
        ids = inputs["input_ids"]
        item_spans = spans(inputs.get("attention_mask"), ids.shape[0], ids.shape[1])
        feats = features(self.model, self.adapter, ids, item_spans, inputs.get("token_type_ids"))
        self.model(**inputs, **({"logits_to_keep": 1} if self.adapter.causal else {}))
        missing = [x for x in self.layers if x not in self._maps]
        assert not missing, f"no maps were captured for layers {missing}"
        stacked = torch.stack([self._maps[x] for x in self.layers], dim=1)  # [B, n_layers, H, T, T]
        maps = [
            None if s is None else stacked[b, :, :, s[0] : s[1], s[0] : s[1]].float().cpu().numpy()
            for b, s in enumerate(item_spans)
        ]
        return Recorded(maps, feats)


@dataclass(frozen=True)
class RecordOptions:
    batch_size: int = 8
    max_batch_elems: int = 8 * 256 * 256  # a batch's padded length x width, for memory
    progress: bool = False
    desc: str = "recording maps"


@dataclass
class RecordedSeq:
    index: int  # into the recorded ``seqs``
    maps: np.ndarray  # [n_layers, H, L, L] float32
    feats: np.ndarray


def record(
    model: nn.Module,
    adapter: Adapter,
    layers: list[int],
    seqs: list[list[int]],
    opts: RecordOptions | None = None,
) -> Iterator[RecordedSeq]:
    """Each sequence's maps and features, batched by length (yielded in batch order)."""
    o = opts or RecordOptions()
    pad = 0  # padded positions are masked and cut from the maps, so the pad id does not matter
    device = next(model.parameters()).device
    with Stage(len(seqs), o.desc, o.progress) as bar, Recorder(model, adapter, layers) as rec:
        for batch in length_batches([len(s) for s in seqs], o.batch_size, o.max_batch_elems):
            got = rec.run(collate([seqs[i] for i in batch], pad, adapter.causal, device))
            for j, i in enumerate(batch):
                yield RecordedSeq(i, got.maps[j], got.feats[j])
            bar.update(len(batch))
