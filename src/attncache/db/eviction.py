"""Which entries leave first when an insert would exceed the byte cap. One function per policy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import UserError
from .segments import EntryTable


def lru(table: EntryTable) -> np.ndarray:
    """Least recently used first (insertion counts as a use)."""
    return np.argsort(table.last_used, kind="stable")


def lfu(table: EntryTable) -> np.ndarray:
    """Fewest hits first, then least recently used."""
    return np.lexsort((table.last_used, table.hits))


POLICIES: dict[str, Callable[[EntryTable], np.ndarray]] = {"lru": lru, "lfu": lfu}


def check(name: str) -> str:
    if name not in POLICIES:
        raise UserError(f"eviction must be one of {', '.join(POLICIES)}, got '{name}'")
    return name


def victims(table: EntryTable, policy: str, need_bytes: int) -> np.ndarray:
    """Boolean mask of the rows to evict so that at least ``need_bytes`` are freed."""
    evicted = np.zeros(len(table), dtype=bool)
    for row in POLICIES[policy](table):
        if need_bytes <= 0:
            break
        evicted[row] = True
        need_bytes -= int(table.nbytes[row])
    return evicted
