"""Map segments and the entry table: where each entry's encoded maps live, and zero-copy reads of
them.

A segment (``seg-NNNNNN.bin``) holds entries' encoded maps back to back; it is written once
(temporary name, fsync, rename) and only ever deleted as a whole. An entry is a header of ``n_layers
+ 1`` uint64 byte offsets followed by each stored layer's codec bytes. The entry table (committed in
the manifest) gives each entry a stable uid, its segment, offset, byte size, token length, crc32 and
usage.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .codecs import Codec, get_codec
from .files import atomic_write, safe_name

SEGMENT_BYTES = 64 << 20  # build cuts segments at this size so compaction rewrites little at a time


def seg_name(seg: int) -> str:
    return f"seg-{int(seg):06d}.bin"


def seg_number(name: str) -> int:
    return int(name[4:10])


@dataclass
class StoreLayout:
    n_heads: int
    layers: list[int]  # model layer indices that have stored maps, in storage order
    codec: str = "float16"
    eps: float | None = None  # sparse codec only
    causal: bool = True

    @property
    def coder(self) -> Codec:
        return get_codec(self.codec, self.eps)

    def fp32_bytes(self, length: int) -> int:
        """What one entry of ``length`` tokens would take as dense fp32 maps (the compression
        baseline)."""
        return len(self.layers) * self.n_heads * length * length * 4


_COLUMNS = ("uid", "seg", "offset", "nbytes", "length", "crc", "hits", "last_used")


@dataclass
class EntryTable:
    uid: np.ndarray
    seg: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray
    length: np.ndarray
    crc: np.ndarray
    hits: np.ndarray
    last_used: np.ndarray  # wall-clock seconds of the last hit (or of the insert)

    @classmethod
    def empty(cls) -> EntryTable:
        return cls(*[np.zeros(0, np.float64 if c == "last_used" else np.int64) for c in _COLUMNS])

    @classmethod
    def new(
        cls, uid0: int, seg: int, written: WrittenSegment, lengths: list[int], now: float = 0.0
    ) -> EntryTable:
        """Rows for freshly written entries (consecutive uids from ``uid0``, all ``written`` in
        segment ``seg``; ``lengths``: their token counts)."""
        n = len(written.offsets)
        if len(lengths) != n:
            raise ValueError(f"{n} entries written, {len(lengths)} lengths")
        return cls(
            np.arange(uid0, uid0 + n, dtype=np.int64),
            np.full(n, seg, np.int64),
            np.asarray(written.offsets, np.int64),
            np.asarray(written.sizes, np.int64),
            np.asarray(lengths, np.int64),
            np.asarray(written.crcs, np.int64),
            np.zeros(n, np.int64),
            np.full(n, now, np.float64),
        )

    @classmethod
    def from_json(cls, d: dict) -> EntryTable:
        try:
            cols = [
                np.asarray(d[c], dtype=np.float64 if c == "last_used" else np.int64)
                for c in _COLUMNS
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"the manifest's entry table is malformed ({e.__class__.__name__})"
            ) from None
        if len({len(c) for c in cols}) != 1:
            raise UserError(
                "the manifest's entry table is malformed (columns of different lengths)"
            )
        return cls(*cols)

    def to_json(self) -> dict:
        return {c: getattr(self, c).tolist() for c in _COLUMNS}

    def __len__(self) -> int:
        return len(self.uid)

    def take(self, rows) -> EntryTable:
        return EntryTable(*[getattr(self, c)[rows] for c in _COLUMNS])

    def concat(self, other: EntryTable) -> EntryTable:
        return EntryTable(
            *[np.concatenate([getattr(self, c), getattr(other, c)]) for c in _COLUMNS]
        )


def encode_entry(layout: StoreLayout, maps: np.ndarray) -> bytes:
    """[n_stored_layers, H, L, L] float maps -> a header of layer offsets, then each layer's codec
    bytes."""
    n_layers, n_heads, length, length2 = maps.shape
    expected = (len(layout.layers), layout.n_heads, length)
    assert (n_layers, n_heads, length2) == expected, (maps.shape, expected)
    coder = layout.coder
    parts = [coder.encode(maps[i], layout.causal) for i in range(n_layers)]
    header = 8 * (n_layers + 1)
    offsets = np.cumsum([header] + [len(p) for p in parts]).astype(np.uint64)
    return offsets.tobytes() + b"".join(parts)


@dataclass(frozen=True)
class WrittenSegment:
    """Where each blob of one segment landed: its offset, size and crc32, in order."""

    offsets: list[int]
    sizes: list[int]
    crcs: list[int]
    nbytes: int

    def tail(self, first: int) -> WrittenSegment:
        """The blobs from ``first`` on (the same segment, the same byte count)."""
        return WrittenSegment(
            self.offsets[first:], self.sizes[first:], self.crcs[first:], self.nbytes
        )


def write_segment(folder: Path, seg: int, blobs: list[bytes]) -> WrittenSegment:
    """Write one segment (temporary name, fsync, rename): each blob's offset and crc32."""
    offsets, sizes, crcs, pos = [], [], [], 0
    for blob in blobs:
        offsets.append(pos)
        sizes.append(len(blob))
        crcs.append(zlib.crc32(blob))
        pos += len(blob)

    def write(f) -> None:
        for blob in blobs:
            f.write(blob)

    atomic_write(Path(folder) / seg_name(seg), write)
    return WrittenSegment(offsets, sizes, crcs, pos)


class MapStore:
    """Zero-copy reads of entries' maps from the memory-mapped segments."""

    def __init__(
        self,
        folder: Path,
        layout: StoreLayout,
        table: EntryTable,
        segments: dict[str, int],
        checked: set[tuple[int, int, int]] | None = None,
    ):
        # (segment, offset, crc) of entries whose bytes this process found intact; a later
        # generation's store takes it over (``checked``), so each entry is checked once
        self.checked: set[tuple[int, int, int]] = checked if checked is not None else set()
        self.check_seconds = 0.0  # time spent on first-use checks, for ``bench``
        self.damaged = 0
        self.folder = Path(folder)
        self.layout = layout
        self.table = table
        self.segments = dict(segments)
        self.layer_pos = {layer: i for i, layer in enumerate(layout.layers)}
        self.coder = layout.coder
        self._mm: dict[int, np.ndarray] = {}
        for name, size in self.segments.items():
            path = self.folder / safe_name(name)
            have = (
                path.stat().st_size
            )  # FileNotFoundError: a writer replaced it; the caller re-reads
            if have < size:
                raise UserError(
                    f"{path}: truncated ({have} bytes, the manifest commits {size}); "
                    f"run 'attncache verify {self.folder}'"
                )
            # mode 'c' (copy-on-write) gives writeable views for torch.from_numpy without touching
            # the file; only the committed bytes are mapped (a crashed writer's tail is ignored)
            self._mm[seg_number(name)] = (
                np.memmap(path, dtype=np.uint8, mode="c", shape=(size,))
                if size
                else np.zeros(0, np.uint8)
            )
        sizes = {seg: len(mm) for seg, mm in self._mm.items()}
        limits = np.array([sizes.get(int(s), -1) for s in table.seg], dtype=np.int64)
        bad = np.flatnonzero(table.offset + table.nbytes > limits)
        if len(bad):
            raise UserError(
                f"{self.folder}: entry {int(bad[0])} lies outside its segment; "
                "run 'attncache verify'"
            )

    @property
    def lengths(self) -> np.ndarray:
        return self.table.length

    def __len__(self) -> int:
        return len(self.table)

    def raw(self, entry: int) -> np.ndarray:
        t = self.table
        start = int(t.offset[entry])
        return self._mm[int(t.seg[entry])][start : start + int(t.nbytes[entry])]

    def _layer_buf(self, entry: int, pos: int) -> np.ndarray:
        raw = self.raw(entry)
        offsets = raw[: 8 * (len(self.layout.layers) + 1)].view(np.uint64)
        return raw[int(offsets[pos]) : int(offsets[pos + 1])]

    def layer(self, entry: int, layer: int, length: int | None = None) -> torch.Tensor:
        """[H, l, l] maps of one layer (l = ``length``, an exact causal crop, or the entry's
        length)."""
        full = int(self.table.length[entry])
        return self.coder.decode(
            self._layer_buf(entry, self.layer_pos[layer]),
            self.layout.n_heads,
            full,
            self.layout.causal,
            length,
        )

    def rows(self, entry: int, rows: np.ndarray, width: int) -> np.ndarray:
        """[n_stored_layers, H, len(rows), width] float32: selected rows of every stored layer."""
        full = int(self.table.length[entry])
        n_layers, n_heads, causal = len(self.layout.layers), self.layout.n_heads, self.layout.causal
        size = self.coder.layer_bytes(n_heads, full, causal)
        if size is not None:  # fixed-size layers lie back to back after the header: one gather
            body = self.raw(entry)[8 * (n_layers + 1) :].reshape(n_layers, size)
            return self.coder.rows_stacked(body, n_heads, full, causal, rows, width)
        return np.stack(
            [
                self.coder.rows(self._layer_buf(entry, i), n_heads, full, causal, rows, width)
                for i in range(n_layers)
            ]
        )

    def check(self, entry: int) -> bool:
        return zlib.crc32(self.raw(entry)) == int(self.table.crc[entry])

    def intact(self, entry: int) -> bool:
        """Whether an entry's bytes match their crc32, checked on its first use in this process
        and remembered: a hit on damaged bytes is never replayed (``lookup`` skips it)."""
        t = self.table
        key = (int(t.seg[entry]), int(t.offset[entry]), int(t.crc[entry]))
        if key in self.checked:
            return True
        t0 = time.perf_counter()
        ok = self.check(entry)
        self.check_seconds += time.perf_counter() - t0
        if ok:
            self.checked.add(key)
        else:
            self.damaged += 1
        return ok

    @property
    def nbytes(self) -> int:
        """Committed bytes of every segment (what the byte cap bounds)."""
        return int(sum(self.segments.values()))

    @property
    def live_bytes(self) -> int:
        return int(self.table.nbytes.sum())


class SegmentWriter:
    """Appends encoded entries to new segments of a folder that is being built (not yet published).

    ``add`` buffers an entry; every ``SEGMENT_BYTES`` the buffer becomes one segment. ``finish``
    writes the rest and returns the entry table and the segments' committed sizes.
    """

    def __init__(
        self, folder: Path, layout: StoreLayout, max_bytes: int | None = None, first_seg: int = 0
    ):
        self.folder, self.layout, self.max_bytes = Path(folder), layout, max_bytes
        self.table = EntryTable.empty()
        self.segments: dict[str, int] = {}
        self._next_seg = first_seg
        self._blobs: list[bytes] = []
        self._lengths: list[int] = []
        self._pending = 0
        self.total = 0  # bytes of every entry added so far
        self.dropped = 0  # entries refused by the cap

    def add(self, maps: np.ndarray) -> bool:
        """Encode and buffer one entry ``[n_stored_layers, H, L, L]``; False if the cap refuses
        it."""
        blob = encode_entry(self.layout, maps)
        if self.max_bytes is not None and self.total + len(blob) > self.max_bytes:
            self.dropped += 1
            return False
        self._blobs.append(blob)
        self._lengths.append(int(maps.shape[-1]))
        self.total += len(blob)
        self._pending += len(blob)
        if self._pending >= SEGMENT_BYTES:
            self._flush()
        return True

    def _flush(self) -> None:
        if not self._blobs:
            return
        seg = self._next_seg
        written = write_segment(self.folder, seg, self._blobs)
        self.segments[seg_name(seg)] = written.nbytes
        rows = EntryTable.new(len(self.table), seg, written, self._lengths)
        self.table = self.table.concat(rows)
        self._next_seg += 1
        self._blobs, self._lengths, self._pending = [], [], 0

    def finish(self) -> tuple[EntryTable, dict[str, int]]:
        self._flush()
        return self.table, dict(self.segments)
