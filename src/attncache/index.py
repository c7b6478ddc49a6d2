"""The ANN index (Faiss) behind a small interface.

Exact search (``IndexFlatL2``) below ``APPROX_MIN`` entries, HNSW above it with ``efSearch`` applied
on every search. ``APPROX_MIN`` was chosen by measurement (docs/results.md, "Index"): at 64 dims a flat
scan stays well under a millisecond per query up to ~50k entries on this 2-core machine.
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


class VectorIndex:
    def __init__(self, dim: int, approximate: bool = False, ef_search: int = EF_SEARCH):
        self.dim, self.approximate, self.ef_search = dim, approximate, ef_search
        if faiss is None:
            if approximate:
                raise RuntimeError("an approximate index needs faiss-cpu (pip install faiss-cpu)")
            self._index = _NumpyFlat(dim)
        else:
            self._index = faiss.IndexHNSWFlat(dim, HNSW_M) if approximate else faiss.IndexFlatL2(dim)

    @classmethod
    def build(cls, vectors: np.ndarray, approximate: bool | None = None, ef_search: int = EF_SEARCH) -> VectorIndex:
        n, d = vectors.shape if vectors.ndim == 2 else (0, 1)
        if approximate is None:
            approximate = n >= APPROX_MIN
        idx = cls(d, approximate, ef_search)
        if n:
            idx.add(vectors)
        return idx

    def add(self, vectors: np.ndarray) -> None:
        self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(L2 distances [B, k], ids [B, k]); id -1 where fewer than k entries exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, len(self))) if len(self) else 1
        if len(self) == 0:
            return np.full((len(q), 1), np.inf, np.float32), np.full((len(q), 1), -1, np.int64)
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
    def load(cls, path: Path, dim: int, ef_search: int = EF_SEARCH) -> VectorIndex:
        if faiss is None:
            raise RuntimeError("this DB has an approximate index, which needs faiss-cpu")
        idx = cls(dim, True, ef_search)
        idx._index = faiss.read_index(str(path))
        if idx._index.d != dim:
            raise ValueError(f"index dimension {idx._index.d} != projector dimension {dim}")
        return idx


class _NumpyFlat:
    """The faiss.IndexFlatL2 subset used above, in numpy (squared L2, ascending)."""

    def __init__(self, dim: int):
        self.d = dim
        self._x = np.zeros((0, dim), np.float32)

    @property
    def ntotal(self) -> int:
        return len(self._x)

    def add(self, x: np.ndarray) -> None:
        self._x = np.concatenate([self._x, x])

    def search(self, q: np.ndarray, k: int):
        d2 = (q * q).sum(1)[:, None] - 2 * q @ self._x.T + (self._x * self._x).sum(1)[None, :]
        ids = np.argsort(d2, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d2, ids, axis=1).astype(np.float32), ids.astype(np.int64)
