"""What every exact tier shares: the typed result of a run and the protocol a tier implements.

A tier takes a batch of token sequences and returns, per item, the logits of its last positions
(at most ``keep``), computing as little as it can while staying exact; it reports its own counters.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class TierOptions:
    """What a caller may add to a batch a tier runs (every field optional)."""

    maps: Any = None  # an attached map cache (runtime.Attachment): its hits apply where it computes
    # per item: how many of its leading tokens a later input shares (0: none), from a caller that
    # sees the whole workload; None: unknown, keep what is computed
    insert: list[int] | None = None
    # per item: how many of its last positions' logits the caller reads (default ``keep``)
    needs: list[int] | None = None
    # decoder states instead of logits where the tier applies the head itself
    states: bool = False


NO_OPTIONS = TierOptions()


class Tier(Protocol):
    def run(
        self, seqs: list[list[int]], keep: int, pad_id: int, opts: TierOptions = NO_OPTIONS
    ) -> TierOutput:
        """Logits of ``seqs``' last positions (at most ``keep`` each), as ``opts`` asks."""
        ...

    def report(self) -> dict[str, float]:
        """Counters and memory, for JSON results and metrics."""
        ...
