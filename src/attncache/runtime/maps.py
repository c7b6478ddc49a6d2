"""Where replayed maps come from: the store (optionally prefetched), templates, or maps given in
advance.

``MapSource.fetch(hit, layer, device)`` returns a hit's ``[H, L, L]`` maps for one layer. The store
source reads a zero-copy memmap view (float16) or decodes (compact codecs); with ``prefetch`` a
background thread decodes every layer a batch will need as soon as its hits are known, so decoding
overlaps the layers that run first.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..db import Database, Templates
from .kernels import index_tensor
from .lookup import Hit

MapKey = tuple[int, int, int]  # (entry, layer, length)


class StoreMaps:
    """Maps read from the DB's segments (the current generation's: inserts may replace the
    store)."""

    def __init__(self, db: Database, prefetch: bool):
        self.db = db
        self.prefetch = prefetch
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[MapKey, Future] = {}
        self._lock = threading.Lock()

    def open(self) -> None:
        if self.prefetch and self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="attncache-prefetch")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._ahead = {}

    @property
    def pending(self) -> int:
        return len(self._ahead)

    def read(self, entry: int, layer: int, length: int) -> torch.Tensor:
        return self.db.store.layer(entry, layer, length)

    def plan(self, hits: list[Hit | None], layers: list[int]) -> None:
        """Start decoding every (hit, layer) map the batch will use (with prefetch on)."""
        self._ahead = {}
        if self._pool is None:
            return
        for layer in layers:
            for h in hits:
                key = (h.entry, layer, h.length) if h is not None else None
                if key is not None and key not in self._ahead:
                    self._ahead[key] = self._pool.submit(self.read, *key)

    def fetch(self, hit: Hit, layer: int, device: torch.device) -> torch.Tensor:
        key = (hit.entry, layer, hit.length)
        ahead = self._ahead.pop(key, None)
        maps = ahead.result() if ahead is not None else self.read(*key)
        return maps.to(device)


class PreloadedMaps(StoreMaps):
    """Maps already in memory, keyed by (entry, layer, length); others from the store
    (benchmarks)."""

    def __init__(self, db: Database, maps: dict[MapKey, torch.Tensor]):
        super().__init__(db, prefetch=False)
        self.maps = maps

    def fetch(self, hit: Hit, layer: int, device: torch.device) -> torch.Tensor:
        got = self.maps.get((hit.entry, layer, hit.length))
        return got if got is not None else super().fetch(hit, layer, device)


def layer_maps(
    source: StoreMaps,
    templates: Templates | None,
    layer: int,
    heads: tuple[int, ...],
    fixed: tuple[int, ...],
    hits: list[Hit | None],
    spans,
    n_heads: int,
    device: torch.device,
    timer: list[float],
) -> list[torch.Tensor]:
    """Per item, the ``[len(heads), L, L]`` maps of ``heads``: templates for the ``fixed`` heads,
    the hit's stored maps for the others. ``timer[0]`` accumulates the seconds spent fetching."""
    t_heads = tuple(h for h in heads if h in fixed)
    r_heads = tuple(h for h in heads if h not in fixed)
    t0 = time.perf_counter()
    fetched = [source.fetch(h, layer, device) for h in hits] if r_heads else [None] * len(hits)
    timer[0] += time.perf_counter() - t0
    out = []
    r_idx = None
    for (start, end), maps in zip(spans, fetched, strict=True):
        if maps is not None and len(r_heads) < n_heads:
            if r_idx is None:
                r_idx = index_tensor(r_heads, str(maps.device))
            maps = maps.index_select(0, r_idx)
        if not t_heads:  # all from the hit (a zero-copy view when the layer is whole)
            out.append(maps)
            continue
        tmpl = templates.get(layer, t_heads, end - start).to(device)
        if not r_heads:
            out.append(tmpl)
            continue
        both = tmpl.new_empty((len(heads), end - start, end - start))
        both[[heads.index(h) for h in t_heads]] = tmpl
        both[[heads.index(h) for h in r_heads]] = maps.to(tmpl.dtype)
        out.append(both)
    return out
