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
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..db import Database, Templates
from ..stats import Counters, ratio
from .kernels import index_tensor
from .lookup import Hit

MapKey = tuple[int, int, int]  # (entry, layer, length)


@dataclass
class DeviceCacheStats(Counters):
    hits: int = 0
    misses: int = 0  # uploads (and, for compact codecs, decodes)
    bytes: int = 0  # held now
    evictions: int = 0

    def derived(self, c: dict[str, float]) -> dict[str, float]:
        return {"device_map_hit_rate": ratio(c["hits"], c["hits"] + c["misses"])}


class DeviceMapCache:
    """The hottest maps kept on the model's device under a byte cap, least recently used out first.

    On a GPU a hit's maps then need no host-to-device copy (measured on an H200: maps fetched from
    host memory made hits slower than SDPA past ~256 tokens; resident ones were 1.4x); on a CPU the
    "device" is the host and the cache saves decoding compact codecs. Keyed by entry uid (stable
    across inserts)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._maps: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = DeviceCacheStats()

    def get(self, key: tuple[int, int, int]) -> torch.Tensor | None:
        with self._lock:
            got = self._maps.get(key)
            if got is not None:
                self._maps.move_to_end(key)
        self.stats.add(hits=int(got is not None), misses=int(got is None))
        return got

    def put(self, key: tuple[int, int, int], maps: torch.Tensor) -> None:
        size = maps.numel() * maps.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            freed, evicted = 0, 0
            while self._maps and self.stats.bytes + size - freed > self.max_bytes:
                _, old = self._maps.popitem(last=False)
                freed += old.numel() * old.element_size()
                evicted += 1
            self._maps[key] = maps
        self.stats.add(bytes=size - freed, evictions=evicted)


class StoreMaps:
    """Maps read from the DB's segments (the current generation's: inserts may replace the store),
    optionally kept on the device (``device_cache``)."""

    def __init__(self, db: Database, prefetch: bool, device_cache: DeviceMapCache | None = None):
        self.db = db
        self.prefetch = prefetch
        self.device_cache = device_cache
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

    def _uid_key(self, entry: int, layer: int, length: int) -> tuple[int, int, int]:
        return int(self.db.store.table.uid[entry]), layer, length

    def plan(self, hits: list[Hit | None], layers: list[int]) -> None:
        """Start decoding every (hit, layer) map the batch will use (with prefetch on) that is not
        already on the device."""
        self._ahead = {}
        if self._pool is None:
            return
        for layer in layers:
            for h in hits:
                key = (h.entry, layer, h.length) if h is not None else None
                if key is None or key in self._ahead:
                    continue
                if self.device_cache is not None and self._uid_key(*key) in self.device_cache._maps:
                    continue
                self._ahead[key] = self._pool.submit(self.read, *key)

    def fetch(self, hit: Hit, layer: int, device: torch.device) -> torch.Tensor:
        key = (hit.entry, layer, hit.length)
        cache = self.device_cache
        if cache is not None:
            got = cache.get(self._uid_key(*key))
            if got is not None:
                self._ahead.pop(key, None)
                return got
        ahead = self._ahead.pop(key, None)
        maps = (ahead.result() if ahead is not None else self.read(*key)).to(device)
        if cache is not None:
            cache.put(self._uid_key(*key), maps)
        return maps


def read_maps(
    db: Database, hits: Iterable[Hit | None], layers: Iterable[int]
) -> dict[MapKey, torch.Tensor]:
    """Every hit's maps of ``layers`` read into memory now (copies, not memmap views): what a
    ``PreloadedMaps`` holds."""
    layers = list(layers)
    return {
        (h.entry, x, h.length): db.store.layer(h.entry, x, h.length).clone()
        for h in hits
        if h is not None
        for x in layers
    }


class PreloadedMaps(StoreMaps):
    """Maps already in memory, keyed by (entry, layer, length); others from the store
    (benchmarks)."""

    def __init__(self, db: Database, maps: dict[MapKey, torch.Tensor]):
        super().__init__(db, prefetch=False)
        self.maps = maps

    def fetch(self, hit: Hit, layer: int, device: torch.device) -> torch.Tensor:
        got = self.maps.get((hit.entry, layer, hit.length))
        return got if got is not None else super().fetch(hit, layer, device)


@dataclass
class LayerWant:
    """The maps one layer's replay needs, per item of a group: ``heads``, of which ``fixed``
    come from templates and the others from the item's hit; ``spans``: each item's real tokens."""

    layer: int
    heads: tuple[int, ...]
    fixed: tuple[int, ...]
    hits: list[Hit | None]
    spans: list


def layer_maps(
    source: StoreMaps,
    templates: Templates | None,
    want: LayerWant,
    n_heads: int,
    device: torch.device,
    timer: list[float],
) -> list[torch.Tensor]:
    """Per item, the ``[len(heads), L, L]`` maps of ``heads``: templates for the ``fixed`` heads,
    the hit's stored maps for the others. ``timer[0]`` accumulates the seconds spent fetching."""
    layer, heads, fixed, hits, spans = want.layer, want.heads, want.fixed, want.hits, want.spans
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
