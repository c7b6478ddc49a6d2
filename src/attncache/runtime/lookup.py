"""Lookup: projector -> index -> the nearest length-compatible entry, if within the threshold.

A map serves an input of the same length or, for causal models, a shorter input by its top-left crop
(exactly the map of the entry's prefix). The index returns the ``SEARCH_K`` nearest uids; the first
compatible one is the candidate, and it hits iff its predicted distance is within the threshold.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..db import Database

SEARCH_K = 64  # neighbours inspected per lookup to find the nearest length-compatible entry


@dataclass(frozen=True)
class Hit:
    entry: int  # row of the entry table
    length: int  # the query's length; < the entry's length means an exact causal crop
    distance: float


class HitSource(Protocol):
    """What an attachment asks for each batch's hits."""

    def find(self, feats: np.ndarray | None, lengths: Sequence[int]) -> list[Hit | None]: ...

    @property
    def needs_features(self) -> bool: ...


def fits(entry_len: int, query_len: int, allow_crop: bool) -> bool:
    """Whether an entry's maps serve a query: same length, or a longer causal entry's exact crop."""
    return entry_len == query_len or (allow_crop and entry_len > query_len)


def compatible(db: Database, entry: int, length: int) -> bool:
    return fits(int(db.store.lengths[entry]), length, db.allow_crop)


def nearest(
    db: Database, feats: np.ndarray, lengths: Sequence[int], threshold: float, k: int = SEARCH_K
) -> list[Hit | None]:
    """Per query, the nearest compatible entry within ``threshold`` (no usage counted)."""
    if len(db.store) == 0 or len(lengths) == 0:
        return [None] * len(lengths)
    dist, uids = db.index.search(db.projector.project(feats), k)
    rows = db.rows_of(np.where(uids < 0, 0, uids))
    hits: list[Hit | None] = []
    for b, length in enumerate(lengths):
        hit = None
        for d, uid, row in zip(dist[b], uids[b], rows[b], strict=True):
            if uid < 0 or length <= 0:
                break
            if compatible(db, int(row), length):
                if d > threshold:
                    break
                if not db.store.intact(int(row)):
                    _warn_damaged(db)
                    continue  # damaged bytes are never replayed: the next candidate, or a miss
                hit = Hit(int(row), int(length), float(d))
                break
        hits.append(hit)
    return hits


_WARNED: set[str] = set()


def _warn_damaged(db: Database) -> None:
    if str(db.folder) not in _WARNED:
        _WARNED.add(str(db.folder))
        warnings.warn(
            f"{db.folder}: an entry's bytes do not match their checksum; it is skipped (never "
            f"replayed). Run 'attncache verify {db.folder}'",
            stacklevel=3,
        )


class Lookup:
    """The lookup an attached cache runs per batch; counts each hit's use for eviction."""

    needs_features = True

    def __init__(self, db: Database, threshold: float):
        self.db, self.threshold = db, threshold

    def find(self, feats: np.ndarray | None, lengths: Sequence[int]) -> list[Hit | None]:
        assert feats is not None
        hits = nearest(self.db, feats, lengths, self.threshold)
        self.db.usage.record(int(self.db.store.table.uid[h.entry]) for h in hits if h is not None)
        return hits


class PresetHits:
    """Hits fixed in advance (benchmarks: the method's ceiling without retrieval)."""

    needs_features = False

    def __init__(self, hits: Sequence[Hit | None]):
        self.hits = list(hits)

    def find(self, feats: np.ndarray | None, lengths: Sequence[int]) -> list[Hit | None]:
        return list(self.hits)


class RecordingHits:
    """A hit source that keeps what the one it wraps found, batch by batch (benchmarks)."""

    def __init__(self, inner: HitSource):
        self.inner = inner
        self.batches: list[list[Hit | None]] = []

    @property
    def needs_features(self) -> bool:
        return self.inner.needs_features

    def find(self, feats: np.ndarray | None, lengths: Sequence[int]) -> list[Hit | None]:
        hits = self.inner.find(feats, lengths)
        self.batches.append(list(hits))
        return hits


class RecordedHits:
    """The hits a ``RecordingHits`` kept, handed out batch by batch in the same order, with no
    features and no search: a pass over the same batches then replays exactly those hits (a
    workload's in-RAM bound)."""

    needs_features = False

    def __init__(self, batches: Sequence[Sequence[Hit | None]]):
        self.batches = [list(b) for b in batches]
        self._next = 0

    def find(self, feats: np.ndarray | None, lengths: Sequence[int]) -> list[Hit | None]:
        if self._next >= len(self.batches) or len(self.batches[self._next]) != len(lengths):
            raise RuntimeError("recorded hits replayed over other batches than they came from")
        self._next += 1
        return list(self.batches[self._next - 1])
