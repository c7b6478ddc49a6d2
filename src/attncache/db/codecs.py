"""How one layer's attention maps ``[H, L, L]`` are stored: dense halves, 8-bit, or sparse rows.

Every codec turns a float map into bytes and back. Rows are probability distributions (non-negative,
summing to 1), which the compact codecs exploit:

- ``float16``: dense half precision; decoding is a zero-copy view of the memory map.
- ``float32``: dense single precision (tests and exactness checks).
- ``int8``: each probability ``p`` stored as ``round(255 * sqrt(p))``. The square root spends
  the 256 levels where attention mass is (relative error ~ 1/(255 sqrt p)), so no per-row scale is
  needed. For causal maps only the strict lower triangle is kept: row ``i`` stores its ``i``
  off-diagonal entries and the diagonal is recovered as ``1 - sum(row)``, which also makes every
  decoded row sum to exactly 1. That is ``L(L-1)/2`` bytes per head, under 1/8 of the ``4 L^2``
  bytes of fp32. Non-causal maps keep full rows (``L^2`` bytes, then renormalised).
- ``sparse``: per row the fewest largest entries that hold at least ``1 - eps`` of its mass,
  renormalised; stored as per-row counts (uint16), column indices (uint16) and sqrt-coded values
  (uint8).

A causal crop to the first ``l`` positions is exact for all of them: rows ``< l`` only reference
columns ``< l``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError, did_you_mean

_LEVELS = 255.0


def _sqrt_code(p: np.ndarray) -> np.ndarray:
    return np.rint(np.sqrt(np.clip(p, 0.0, 1.0)) * _LEVELS).astype(np.uint8)


_LUT32 = ((np.arange(256) / _LEVELS) ** 2).astype(np.float32)


def _sqrt_decode(q: np.ndarray) -> np.ndarray:
    x = q.astype(np.float32) / _LEVELS
    return x * x


@dataclass(frozen=True)
class Codec:
    name: str = "base"

    def encode(self, maps: np.ndarray, causal: bool) -> bytes:
        """maps: [H, L, L] float, rows summing to 1."""
        raise NotImplementedError

    def decode(
        self, buf: np.ndarray, H: int, L: int, causal: bool, length: int | None = None
    ) -> torch.Tensor:
        """[H, l, l] maps (l = ``length`` or L) from the uint8 buffer of one layer: a float16 view
        for the float16 codec, float32 for the compact codecs (replay multiplies in the maps'
        precision)."""
        raise NotImplementedError

    def rows(
        self, buf: np.ndarray, H: int, L: int, causal: bool, rows: np.ndarray, width: int
    ) -> np.ndarray:
        """[H, len(rows), width] float32: the given rows, first ``width`` columns (for
        distances)."""
        full = self.decode(buf, H, L, causal).float().numpy()
        return full[:, rows, :width]

    def layer_bytes(self, H: int, L: int, causal: bool) -> int | None:
        """Bytes of one layer if the codec's size depends only on the shape (then layers can be read
        as one array), else None."""
        return None

    def rows_stacked(
        self, body: np.ndarray, H: int, L: int, causal: bool, rows: np.ndarray, width: int
    ) -> np.ndarray:
        """[n_layers, H, len(rows), width] float32 from ``body`` [n_layers, layer_bytes] in one
        pass."""
        return np.stack([self.rows(b, H, L, causal, rows, width) for b in body])


@dataclass(frozen=True)
class Dense(Codec):
    name: str = "float16"
    dtype: str = "float16"

    def encode(self, maps, causal):
        return np.ascontiguousarray(maps, dtype=self.dtype).tobytes()

    def _view(self, buf, H, L):
        return buf.view(self.dtype).reshape(H, L, L)

    def decode(self, buf, H, L, causal, length=None):
        m = self._view(buf, H, L)
        if length is not None and length != L:
            m = m[:, :length, :length]
        return torch.from_numpy(m)  # a view of the (copy-on-write) memory map: no copy

    def layer_bytes(self, H, L, causal):
        return H * L * L * np.dtype(self.dtype).itemsize

    def rows_stacked(self, body, H, L, causal, rows, width):
        maps = body.view(self.dtype).reshape(len(body), H, L, L)
        return np.asarray(maps[:, :, rows, :width], dtype=np.float32)


def _tri_start(i: np.ndarray | int):
    """Offset of row i in a packed strict lower triangle (row i has i entries)."""
    return i * (i - 1) // 2


@dataclass(frozen=True)
class Int8(Codec):
    name: str = "int8"

    def encode(self, maps, causal):
        H, L, _ = maps.shape
        if not causal:
            return _sqrt_code(maps).tobytes()
        r, c = np.tril_indices(L, -1)  # row-major strict lower triangle
        return _sqrt_code(maps[:, r, c]).tobytes()

    def decode(self, buf, H, L, causal, length=None):
        m = L if length is None else length
        if not causal:
            q = buf.reshape(H, L, L)[:, :m, :m]
            x = np.take(_LUT32, q)
            return torch.from_numpy(x / np.maximum(x.sum(-1, keepdims=True), 1e-12))
        # A 256-entry table decodes the codes; rows are copied out of the packed triangle (measured
        # faster than a masked scatter on CPU). The diagonal is whatever mass the row lacks.
        v = np.take(_LUT32, buf.reshape(H, _tri_start(L))[:, : _tri_start(m)])
        out = np.zeros(
            (H, m, m), np.float32
        )  # float32: numpy's float16 conversion costs more than the rest
        if m > 1:
            starts = _tri_start(np.arange(1, m))
            sums = np.add.reduceat(v, starts, axis=1)  # [H, m-1]: rows 1..m-1
            for i in range(1, m):
                s0 = starts[i - 1]
                out[:, i, :i] = v[:, s0 : s0 + i]
            idx = np.arange(1, m)
            out[:, idx, idx] = np.clip(1.0 - sums, 0.0, None)
        if m > 0:
            out[:, 0, 0] = 1.0
        return torch.from_numpy(out)

    def layer_bytes(self, H, L, causal):
        return H * (_tri_start(L) if causal else L * L)

    def rows_stacked(self, body, H, L, causal, rows, width):
        """One gather for every layer and head: row i's packed off-diagonal codes, then its
        diagonal."""
        n_layers = len(body)
        rows = np.asarray(rows, dtype=np.int64)
        if not causal:
            return np.take(_LUT32, body.reshape(n_layers, H, L, L)[:, :, rows, :width])
        out = np.zeros((n_layers, H, len(rows), width), dtype=np.float32)
        if L > 1:
            cols = np.arange(width)
            valid = cols[None, :] < rows[:, None]  # [R, W]: the packed entries of each row
            idx = _tri_start(rows)[:, None] + np.minimum(
                cols[None, :], np.maximum(rows[:, None] - 1, 0)
            )
            vals = np.take(_LUT32, body.reshape(n_layers, H, _tri_start(L))[:, :, idx])
            out[:] = np.where(valid, vals, 0.0)
        has_diag = np.flatnonzero(rows < width)
        if len(has_diag):  # every off-diagonal entry of such a row was gathered above
            sums = out[:, :, has_diag].sum(-1)
            out[:, :, has_diag, rows[has_diag]] = np.clip(1.0 - sums, 0.0, None)
        return out


@dataclass(frozen=True)
class Sparse(Codec):
    name: str = "sparse"
    eps: float = 0.02

    def encode(self, maps, causal):
        H, L, _ = maps.shape
        p = np.asarray(maps, dtype=np.float32).reshape(H * L, L)
        order = np.argsort(-p, axis=1, kind="stable")
        sorted_p = np.take_along_axis(p, order, 1)
        mass = np.cumsum(sorted_p, 1)
        total = mass[:, -1:]
        # fewest entries reaching 1 - eps of the row's mass (at least one)
        k = np.minimum((mass < (1.0 - self.eps) * total).sum(1) + 1, L).astype(np.uint16)
        keep = np.arange(L)[None, :] < k[:, None]
        cols = np.where(keep, order, 0)
        vals = np.where(keep, sorted_p, 0.0)
        vals = vals / np.maximum(vals.sum(1, keepdims=True), 1e-12)
        # row-major (row, then column ascending) so a causal crop is a prefix per head
        srt = np.argsort(np.where(keep, cols, L + 1), axis=1, kind="stable")
        cols = np.take_along_axis(cols, srt, 1)
        vals = np.take_along_axis(vals, srt, 1)
        mask = np.take_along_axis(keep, srt, 1)
        return (
            k.tobytes() + cols[mask].astype(np.uint16).tobytes() + _sqrt_code(vals[mask]).tobytes()
        )

    def _parts(self, buf, H, L):
        k = buf[: 2 * H * L].view(np.uint16).astype(np.int64)
        nnz = int(k.sum())
        cols = buf[2 * H * L : 2 * H * L + 2 * nnz].view(np.uint16)
        vals = buf[2 * H * L + 2 * nnz : 2 * H * L + 3 * nnz]
        return k, cols, vals

    def decode(self, buf, H, L, causal, length=None):
        m = L if length is None else length
        k, cols, vals = self._parts(buf, H, L)
        row_of = np.repeat(np.arange(H * L), k)  # flat (head, row) of every stored value
        head, row = np.divmod(row_of, L)
        c = cols.astype(np.int64)
        sel = (row < m) & (c < m)
        out = torch.zeros(
            (H, m, m), dtype=torch.float32, device="cpu"
        )  # host memory, like the memmap
        v = torch.from_numpy(_sqrt_decode(vals[sel]))
        out[torch.from_numpy(head[sel]), torch.from_numpy(row[sel]), torch.from_numpy(c[sel])] = v
        return out.div_(
            out.sum(-1, keepdim=True).clamp_min(1e-12)
        )  # undo the 8-bit rounding of the mass


CODECS = {
    "float16": Dense(),
    "float32": Dense("float32", "float32"),
    "int8": Int8(),
    "sparse": Sparse(),
}


def get_codec(name: str, eps: float | None = None) -> Codec:
    if name not in CODECS:
        raise UserError(
            f"unknown map compression '{name}'{did_you_mean(name, CODECS)}; "
            f"choose one of {', '.join(CODECS)}"
        )
    if name == "sparse" and eps is not None:
        if not 0.0 <= eps < 1.0:
            raise UserError(f"sparse eps must be in [0, 1), got {eps}")
        return Sparse(eps=eps)
    return CODECS[name]
