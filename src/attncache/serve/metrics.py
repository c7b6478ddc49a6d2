"""Prometheus text metrics: requests, latency and batch sizes, and what every tier did."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Histogram:
    buckets: tuple
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets)

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        out += [
            f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.n}',
            f"{name}_sum {self.total}",
            f"{name}_count {self.n}",
        ]
        return out


def _metric(name: str, kind: str, value: float) -> list[str]:
    return [f"# TYPE attncache_{name} {kind}", f"attncache_{name} {value}"]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)

    def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            if seconds is not None:
                self.latency.observe(seconds)

    def batch_size(self, n: int) -> None:
        with self._lock:
            self.batch.observe(n)

    def render(self, engine) -> str:
        lines = ["# TYPE attncache_requests_total counter"]
        with self._lock:
            lines += [
                f'attncache_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                for (e, c), n in sorted(self.requests.items())
            ]
            lines += self.latency.lines("attncache_request_seconds") + self.batch.lines(
                "attncache_batch_size"
            )
        cache = engine.session.cache
        if cache is not None:
            st = cache.stats.as_dict()
            for k in ("lookups", "hits", "misses", "layer_maps_reused"):
                lines += _metric(f"{k}_total", "counter", st[k])
            lines += _metric("store_bytes", "gauge", cache.store.nbytes)
            resident = engine.att.maps.device_cache if engine.att is not None else None
            if resident is not None:
                dev = resident.stats.as_dict()
                lines += _metric("device_map_hits_total", "counter", dev["hits"])
                lines += _metric("device_map_misses_total", "counter", dev["misses"])
                lines += _metric("device_map_bytes", "gauge", dev["bytes"])
            lines += _metric("store_entries", "gauge", len(cache.store))
        memo = engine.memo.stats.as_dict()
        lines += _metric("memo_lookups_total", "counter", memo["lookups"])
        lines += _metric("memo_hits_total", "counter", memo["hits"])
        lines += _metric("memo_hit_rate", "gauge", memo["memo_hit_rate"])
        lines += _metric("memo_entries", "gauge", len(engine.memo))
        if engine.prefix is not None:
            pre = engine.prefix.report()
            lines += _metric("prefix_tokens_total", "counter", pre["tokens_total"])
            lines += _metric(
                "prefix_tokens_reused_total", "counter", pre["tokens_total"] - pre["tokens_run"]
            )
            lines += _metric("prefix_bytes", "gauge", pre["prefix_bytes_used"])
        lines += _metric("learned_total", "counter", engine.learned)
        lines += _metric("queue_depth", "gauge", engine.queue_depth)
        return "\n".join(lines) + "\n"
