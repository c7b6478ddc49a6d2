"""What every exact tier shares: the typed result of a run and the protocol a tier implements.

A tier takes a batch of token sequences and returns, per item, the logits of its last positions
(at most ``keep``), computing as little as it can while staying exact; it reports its own counters.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch


class TierOutput(NamedTuple):
    # per item the logits of the positions its caller needs (its last ones), ``[n, V]``: with a
    # large vocabulary, padding them to one ``[B, keep, V]`` tensor cost as much as a forward
    logits: list[torch.Tensor]
    hits: list[Any]  # per item: the map-cache hit its lookup found (runtime.Hit), or None
    reused: list[bool]  # per item: whether it replayed any map (its answer is then approximate)
    prefix_tokens: list[int]  # per item: prefix tokens it took from the tree instead of computing
    # per item, when the caller asked for states: its tensor holds the decoder's last hidden
    # states ``[n, d]`` at those positions, for the caller to put through the tier's ``head``
    states: list[bool] | None = None


class Tier(Protocol):
    def run(self, seqs: list[list[int]], keep: int, pad_id: int, maps: Any = None) -> TierOutput:
        """Logits of ``seqs``; ``maps``: an attached map cache whose hits apply where the tier
        computes."""
        ...

    def report(self) -> dict[str, float]:
        """Counters and memory, for JSON results and metrics."""
        ...
