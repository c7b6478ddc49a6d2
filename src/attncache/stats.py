"""Counters shared by every stats class: fields are added under one lock, read as a consistent
snapshot."""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field, fields

import numpy as np


@dataclass
class Counters:
    """Subclasses declare numeric fields (and ``derived`` metrics); ``add`` is safe across
    threads."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def _names(self) -> list[str]:
        return [f.name for f in fields(self) if not f.name.startswith("_")]

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {name: getattr(self, name) for name in self._names()}

    def reset(self) -> None:
        with self._lock:
            for f in fields(self):
                if not f.name.startswith("_"):
                    setattr(self, f.name, type(getattr(self, f.name))())

    def derived(self, counts: dict[str, float]) -> dict[str, float]:
        """Ratios computed from one snapshot (override)."""
        return {}

    def as_dict(self) -> dict[str, float]:
        counts = self.snapshot()
        return {**counts, **self.derived(counts)}


def ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


@functools.lru_cache(maxsize=4096)
def binom_upper(k: int, n: int, conf: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on p after k successes in n trials."""
    if n == 0 or k >= n:
        return 1.0
    alpha = 1.0 - conf
    i = np.arange(k + 1)
    log_coef = np.array(
        [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in i]
    )

    def cdf(p: float) -> float:  # P(X <= k; n, p)
        logs = log_coef + i * math.log(p) + (n - i) * math.log1p(-p)
        top = logs.max()
        return float(math.exp(top) * np.exp(logs - top).sum())

    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if cdf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi
