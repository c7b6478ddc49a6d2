"""Counters shared by every stats class: fields are added under one lock, read as a consistent
snapshot."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


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
