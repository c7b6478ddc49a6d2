"""The ANN index (Faiss) behind a small interface, keyed by entry uid.

Vectors are added with their entry's uid (``IndexIDMap2``), so search returns uids and evicting
entries from an exact index is ``remove_ids`` instead of a rebuild and renumbering. Exact search
(``IndexFlatL2``) below ``APPROX_MIN`` entries, HNSW above it with ``efSearch`` applied on every
search (HNSW cannot remove: evicting from it rebuilds). ``APPROX_MIN`` was chosen by measurement
(docs/results.md, "Index"): at 64 dims a flat scan stays well under a millisecond per query up to
~50k entries on a 2-core machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    import faiss
except ImportError:  # a machine without faiss-cpu (e.g. a bare GPU box): exact search in numpy
    faiss = None

APPROX_MIN = 50_000
HNSW_M = 32
EF_SEARCH = 128


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _i64(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.int64)


class VectorIndex:
    def __init__(self, dim: int, approximate: bool = False, ef_search: int = EF_SEARCH):
        self.dim, self.approximate, self.ef_search = dim, approximate, ef_search
        if faiss is None:
            if approximate:
                raise RuntimeError("an approximate index needs faiss-cpu (pip install faiss-cpu)")
            self._index = _NumpyFlat(dim)
        else:
            inner = faiss.IndexHNSWFlat(dim, HNSW_M) if approximate else faiss.IndexFlatL2(dim)
            self._index = faiss.IndexIDMap2(inner)
            self._inner = inner  # the id map does not own it from Python's side: keep it alive

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray | None = None,
        approximate: bool | None = None,
        ef_search: int = EF_SEARCH,
    ) -> VectorIndex:
        n, d = vectors.shape if vectors.ndim == 2 else (0, 1)
        if approximate is None:
            approximate = n >= APPROX_MIN
        index = cls(d, approximate, ef_search)
        if n:
            index.add(vectors, np.arange(n) if ids is None else ids)
        return index

    def copy(self) -> VectorIndex:
        """An independent copy (a commit edits a copy: the live index changes only once the
        commit is published)."""
        twin = VectorIndex.__new__(VectorIndex)
        twin.dim, twin.approximate, twin.ef_search = self.dim, self.approximate, self.ef_search
        if faiss is None:
            twin._index = _NumpyFlat(self.dim)
            twin._index.add_with_ids(self._index._x.copy(), self._index._ids.copy())
        else:
            twin._index = faiss.clone_index(self._index)
        twin._inner = None
        return twin

    @property
    def can_remove(self) -> bool:
        return not self.approximate

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(vectors):
            self._index.add_with_ids(_f32(vectors), _i64(ids))

    def remove(self, ids: np.ndarray) -> None:
        """Drop the vectors of these uids (exact indexes only: see ``can_remove``)."""
        assert self.can_remove, "HNSW cannot remove vectors; rebuild instead"
        if len(ids):
            if faiss is None:
                self._index.remove_ids(_i64(ids))
            else:
                self._index.remove_ids(faiss.IDSelectorBatch(_i64(ids)))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(L2 distances [B, k], uids [B, k]); uid -1 where fewer than k entries exist."""
        q = _f32(queries)
        if len(self) == 0:
            return np.full((len(q), 1), np.inf, np.float32), np.full((len(q), 1), -1, np.int64)
        k = max(1, min(k, len(self)))
        if self.approximate:
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.ef_search, k)
            d2, ids = self._index.search(q, k, params=params)
        else:
            d2, ids = self._index.search(q, k)
        return np.sqrt(np.maximum(d2, 0.0)), ids

    def save(self, path: Path) -> None:
        if faiss is None:
            raise RuntimeError("saving an index needs faiss-cpu")
        faiss.write_index(self._index, str(path))

    @classmethod
    def load(cls, path: Path, dim: int, ef_search: int = EF_SEARCH) -> VectorIndex | None:
        """An approximate index saved by ``save``; None if the file predates uid keys (rebuild
        it)."""
        if faiss is None:
            raise RuntimeError("this DB has an approximate index, which needs faiss-cpu")
        raw = faiss.read_index(str(path))
        if raw.d != dim:
            raise ValueError(f"index dimension {raw.d} != projector dimension {dim}")
        if not isinstance(raw, faiss.IndexIDMap2):
            return None
        index = cls(dim, True, ef_search)
        index._index = raw
        index._inner = None
        return index


class _NumpyFlat:
    """The subset of faiss.IndexIDMap2(IndexFlatL2) used above, in numpy (squared L2, ascending)."""

    def __init__(self, dim: int):
        self.d = dim
        self._x = np.zeros((0, dim), np.float32)
        self._ids = np.zeros(0, np.int64)

    @property
    def ntotal(self) -> int:
        return len(self._x)

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        self._x = np.concatenate([self._x, x])
        self._ids = np.concatenate([self._ids, ids])

    def remove_ids(self, ids: np.ndarray) -> None:
        keep = ~np.isin(self._ids, ids)
        self._x, self._ids = self._x[keep], self._ids[keep]

    def search(self, q: np.ndarray, k: int):
        x = self._x
        d2 = (q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1)[None, :]
        order = np.argsort(d2, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d2, order, axis=1).astype(np.float32), self._ids[order]
