"""Per-entry usage seen by this process (hits, last use), merged into the manifest by a writer.

Lookups count here under a lock (cheap, no file access); ``Database.save_usage`` and every commit
merge the counts into the entry table, which LRU/LFU eviction and ``inspect`` read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import numpy as np

from .segments import EntryTable


class UsageCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[int, list[float]] = {}  # uid -> [hits, last use]

    def record(self, uids: Iterable[int]) -> None:
        now = time.time()
        with self._lock:
            for uid in uids:
                seen = self._seen.setdefault(int(uid), [0, 0.0])
                seen[0] += 1
                seen[1] = now

    def take(self) -> dict[int, list[float]]:
        """The counts seen so far, forgotten here: a worker hands them to the committing process."""
        with self._lock:
            seen, self._seen = self._seen, {}
        return seen

    def add(self, seen: dict[int, list[float]]) -> None:
        """Counts another process saw (``take``), to be merged by this one's next commit."""
        with self._lock:
            for uid, (hits, last) in seen.items():
                mine = self._seen.setdefault(int(uid), [0, 0.0])
                mine[0] += int(hits)
                mine[1] = max(mine[1], float(last))

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._seen)

    def pending_hits(self, table: EntryTable) -> np.ndarray:
        """Hits per table row not yet merged."""
        out = np.zeros(len(table), np.int64)
        pos = {int(u): i for i, u in enumerate(table.uid)}
        with self._lock:
            for uid, (hits, _) in self._seen.items():
                if uid in pos:
                    out[pos[uid]] += int(hits)
        return out

    def merge_into(self, table: EntryTable) -> None:
        """Add the counts to ``table`` in place and forget them."""
        with self._lock:
            seen, self._seen = self._seen, {}
        pos = {int(u): i for i, u in enumerate(table.uid)}
        for uid, (hits, last) in seen.items():
            row = pos.get(uid)
            if row is not None:
                table.hits[row] += int(hits)
                table.last_used[row] = max(table.last_used[row], last)
