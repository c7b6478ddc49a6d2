"""What a lookup knows about an input before layer 0 runs: its real-token span and its projector
input.

The projector input ("features") is the mean over the real tokens of the layer-0 normalised token
embeddings, plus ``log(L)``: cheap (an embedding gather and one norm), available before layer 0
runs, and the same for recording and lookup.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .adapters import Adapter

Span = tuple[int, int]


def spans(attention_mask: torch.Tensor | None, batch: int, width: int) -> list[Span | None]:
    """Real-token [start, end) per item; None where the mask is not one contiguous run."""
    if attention_mask is None:
        return [(0, width)] * batch
    out: list[Span | None] = []
    real = attention_mask.bool()
    for b in range(batch):
        idx = torch.nonzero(real[b]).flatten()
        if len(idx) == 0:
            out.append(None)
            continue
        start, end = int(idx[0]), int(idx[-1]) + 1
        out.append((start, end) if end - start == len(idx) else None)
    return out


@torch.no_grad()
def features(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    item_spans: list[Span | None],
    token_type_ids: torch.Tensor | None = None,
) -> np.ndarray:
    """[B, D+1] float32 projector inputs (zeros for items without a span)."""
    tok = adapter.token_features(model, input_ids, token_type_ids=token_type_ids).float()
    out = np.zeros((input_ids.shape[0], tok.shape[-1] + 1), dtype=np.float32)
    for b, span in enumerate(item_spans):
        if span is None:
            continue
        out[b, :-1] = tok[b, span[0] : span[1]].mean(0).cpu().numpy()
        out[b, -1] = math.log(span[1] - span[0])
    return out
