"""The memory-mapped map store: append-only segments, an entry table, and the manifest that commits them.

Layout of a DB folder::

    manifest.json              the commit point (written last, atomically): format version, model identity,
                               store layout and codec, the entry table, the segments with their committed
                               sizes, the generation's small files with size and sha256, threshold, policy
    seg-000000.bin ...         entries' encoded maps back to back; a segment is written once (to a temporary
                               name, fsynced, renamed) and only ever deleted as a whole
    features-<g>.npy           [N, F] float32 projector inputs (kept so the projector can be retrained)
    vectors-<g>.npy            [N, P] float32 projected vectors (what the index holds)
    projector-<g>.safetensors  projector weights
    index-<g>.faiss            the ANN index (approximate indexes only; exact ones are rebuilt at open)
    templates-<g>.npy          template maps of the heads calibration chose (templates.py; optional)
    .lock                      held (flock) by the one process allowed to write

Entry ``e`` is ``entries[...][e]``: its uid (stable across evictions), segment, offset, byte size, token
length, crc32 of its bytes, and usage (hits, last use) for eviction. Row ``e`` of the vectors is entry ``e``.

Writers (build, insert, evict, retrain, calibrate) hold ``.lock`` and commit by writing new files under new
names, then the manifest, then deleting what the new manifest no longer references. A crash at any point
leaves the previous manifest and every file it references intact; files left over by a crash are never
referenced, are ignored by readers and removed by the next writer. Readers never lock: a reader keeps the
segments it mapped even after a writer deletes them (POSIX unlink semantics).

Nothing here is read with pickle: ``np.load(allow_pickle=False)``, safetensors, JSON and raw memmaps only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .codecs import Codec, get_codec
from .errors import UserError

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LOCK = ".lock"
READERS = ".readers"  # shared-locked by readers while they open; a writer deletes old files only when it is free
SEGMENT_BYTES = 64 << 20  # build cuts segments at this size so compaction rewrites little at a time
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# files a crashed writer may leave behind: ours by name, unreferenced by the manifest
_OURS = re.compile(r"^(seg-\d+\.bin|(features|vectors|projector|index|templates)-\d+\.(npy|safetensors|faiss)"
                   r"|\..+\.tmp(\.npy)?)$")


# -- atomic file writes ---------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Any], None], tmp_suffix: str = ".tmp") -> None:
    """``write(file)`` into a temporary name, fsync, rename over ``path``; on any OS error nothing changes."""
    tmp = path.with_name(f".{path.name}{tmp_suffix}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _disk_error(path, e) from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def save_npy(path: Path, arr: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False), ".tmp.npy")


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def _disk_error(path: Path, e: OSError) -> UserError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on the device writing {path.name}; the cache is unchanged")
    return UserError(f"could not write {path}: {e.strerror or e}; the cache is unchanged")


def safe_name(name: str) -> str:
    """A file name from a manifest: refused if it could leave the DB folder."""
    if not isinstance(name, str) or not _NAME_OK.match(name) or ".." in name or name == MANIFEST:
        raise UserError(f"manifest names a file '{name}' outside the cache folder: refusing to read it")
    return name


def seg_name(seg: int) -> str:
    return f"seg-{int(seg):06d}.bin"


# -- layout and entry table -----------------------------------------------------------------------
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
    def from_json(cls, d: dict) -> EntryTable:
        try:
            cols = [np.asarray(d[c], dtype=np.float64 if c == "last_used" else np.int64) for c in _COLUMNS]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the manifest's entry table is malformed ({e.__class__.__name__})") from None
        if len({len(c) for c in cols}) != 1:
            raise UserError("the manifest's entry table is malformed (columns of different lengths)")
        return cls(*cols)

    def to_json(self) -> dict:
        return {c: getattr(self, c).tolist() for c in _COLUMNS}

    def __len__(self) -> int:
        return len(self.uid)

    def take(self, idx) -> EntryTable:
        return EntryTable(*[getattr(self, c)[idx] for c in _COLUMNS])

    def concat(self, other: EntryTable) -> EntryTable:
        return EntryTable(*[np.concatenate([getattr(self, c), getattr(other, c)]) for c in _COLUMNS])


def encode_entry(layout: StoreLayout, maps: np.ndarray) -> bytes:
    """[n_stored_layers, H, L, L] float maps -> bytes: a header of layer offsets, then each layer's codec bytes."""
    nl, h, L, L2 = maps.shape
    assert (nl, h, L) == (len(layout.layers), layout.n_heads, L2), maps.shape
    coder = layout.coder
    parts = [coder.encode(maps[i], layout.causal) for i in range(nl)]
    head = 8 * (nl + 1)
    offs = np.cumsum([head] + [len(p) for p in parts]).astype(np.uint64)
    return offs.tobytes() + b"".join(parts)


def write_segment(folder: Path, seg: int, blobs: list[bytes]) -> tuple[list[int], list[int]]:
    """Write one segment (temporary name, fsync, rename). Returns each blob's offset and crc32."""
    offsets, crcs, pos = [], [], 0
    for b in blobs:
        offsets.append(pos)
        crcs.append(zlib.crc32(b))
        pos += len(b)
    _atomic_write(folder / seg_name(seg), lambda f: [f.write(b) for b in blobs])
    return offsets, crcs


# -- read side ------------------------------------------------------------------------------------
class MapStore:
    """Zero-copy reads of entries' maps from the memory-mapped segments."""

    def __init__(self, folder: Path, layout: StoreLayout, table: EntryTable, segments: dict[str, int]):
        self.folder = Path(folder)
        self.layout = layout
        self.table = table
        self.segments = dict(segments)
        self.layer_pos = {layer: i for i, layer in enumerate(layout.layers)}
        self.coder = layout.coder
        self._mm: dict[int, np.ndarray] = {}
        for name, size in self.segments.items():
            path = self.folder / safe_name(name)
            have = path.stat().st_size  # FileNotFoundError: a writer replaced it; the caller re-reads
            if have < size:
                raise UserError(f"{path}: truncated ({have} bytes, the manifest commits {size}); "
                                f"run 'attncache verify {self.folder}'")
            # mode 'c' (copy-on-write) gives writeable views for torch.from_numpy without touching the file;
            # only the committed bytes are mapped (a crashed writer's tail is ignored)
            seg = int(name[4:10])
            self._mm[seg] = np.memmap(path, dtype=np.uint8, mode="c", shape=(size,)) if size else np.zeros(0, np.uint8)
        # every entry inside a committed segment
        sizes = {g: len(mm) for g, mm in self._mm.items()}
        limits = np.array([sizes.get(int(g), -1) for g in table.seg], dtype=np.int64)
        bad = np.flatnonzero(table.offset + table.nbytes > limits)
        if len(bad):
            raise UserError(f"{self.folder}: entry {int(bad[0])} lies outside its segment; run 'attncache verify'")

    @property
    def lengths(self) -> np.ndarray:
        return self.table.length

    def __len__(self) -> int:
        return len(self.table)

    def raw(self, e: int) -> np.ndarray:
        t = self.table
        off = int(t.offset[e])
        return self._mm[int(t.seg[e])][off: off + int(t.nbytes[e])]

    def _layer_buf(self, e: int, pos: int) -> np.ndarray:
        raw = self.raw(e)
        nl = len(self.layout.layers)
        offs = raw[: 8 * (nl + 1)].view(np.uint64)
        return raw[int(offs[pos]): int(offs[pos + 1])]

    def layer(self, e: int, layer: int, length: int | None = None) -> torch.Tensor:
        """[H, l, l] maps of one layer (l = ``length``, an exact causal crop, or the entry's length)."""
        L = int(self.table.length[e])
        return self.coder.decode(self._layer_buf(e, self.layer_pos[layer]), self.layout.n_heads, L,
                                 self.layout.causal, length)

    def rows(self, e: int, rows: np.ndarray, width: int) -> np.ndarray:
        """[n_stored_layers, H, len(rows), width] float32: selected rows of every stored layer."""
        L = int(self.table.length[e])
        return np.stack([self.coder.rows(self._layer_buf(e, i), self.layout.n_heads, L, self.layout.causal, rows, width)
                         for i in range(len(self.layout.layers))])

    def check(self, e: int) -> bool:
        return zlib.crc32(self.raw(e)) == int(self.table.crc[e])

    @property
    def nbytes(self) -> int:
        return int(sum(self.segments.values()))

    @property
    def live_bytes(self) -> int:
        return int(self.table.nbytes.sum())


# -- integrity ------------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_files(folder: Path, names: list[str]) -> dict:
    """{name: {size, sha256}} of the generation's small files, recorded in the manifest at commit."""
    return {n: {"size": (folder / n).stat().st_size, "sha256": file_digest(folder / n)} for n in names}


def referenced(m: dict) -> set[str]:
    return set(m.get("segments", {})) | set(m.get("files", {}))


def check_files(folder: Path, m: dict, full: bool = False) -> list[str]:
    """Problems with the data files: missing, short, (full) corrupted entries or files, unexpected extras."""
    problems: list[str] = []
    for name, meta in m.get("files", {}).items():
        p = folder / safe_name(name)
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != meta["size"]:
            problems.append(f"{name} has {p.stat().st_size} bytes, the manifest says {meta['size']}")
        elif full and file_digest(p) != meta["sha256"]:
            problems.append(f"{name} does not match its checksum (corrupted)")
    for name, size in m.get("segments", {}).items():
        p = folder / safe_name(name)
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size < size:
            problems.append(f"{name} has {p.stat().st_size} bytes, the manifest commits {size} (truncated)")
    if full and not problems:
        table = EntryTable.from_json(m["entries"])
        for seg_id in np.unique(table.seg):
            data = np.memmap(folder / seg_name(seg_id), dtype=np.uint8, mode="r")  # not read whole: segments can be GBs
            for e in np.flatnonzero(table.seg == seg_id):
                off, n = int(table.offset[e]), int(table.nbytes[e])
                if zlib.crc32(data[off: off + n]) != int(table.crc[e]):
                    problems.append(f"entry {e} (uid {int(table.uid[e])}) in {seg_name(seg_id)} is corrupted")
    refs = referenced(m)
    extra = sorted(p.name for p in folder.iterdir()
                   if p.name not in refs and p.name not in (MANIFEST, LOCK, READERS) and not _OURS.match(p.name))
    problems += [f"unexpected file {n}" for n in extra]
    return problems


def remove_unreferenced(folder: Path, m: dict) -> int:
    """Delete our files that the manifest does not reference (old generations, a crashed writer's leftovers).
    Only call while holding the write lock. Skipped (left for a later commit) while a reader is opening."""
    try:
        fd = os.open(Path(folder) / READERS, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0
        refs, n = referenced(m), 0
        for p in folder.iterdir():
            if p.name not in refs and _OURS.match(p.name):
                p.unlink(missing_ok=True)
                n += 1
        return n
    finally:
        os.close(fd)


@contextlib.contextmanager
def opening(folder: Path) -> Iterator[None]:
    """Held by a reader while it reads one generation's files, so no writer deletes them meanwhile."""
    try:
        fd = os.open(Path(folder) / READERS, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only folder: no writer can delete anything either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if folder.is_file():
        raise UserError(f"'{folder}' is a file, not a cache DB folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"'{folder}' is not a cache DB (no {MANIFEST}); create one with 'attncache build'")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({e.__class__.__name__})") from None
    if not isinstance(m, dict):
        raise UserError(f"{path}: unreadable manifest (not an object)")
    v = m.get("format_version")
    if v == 1:
        raise UserError(f"{folder}: cache format 1 is older than this attncache's format {FORMAT_VERSION}; "
                        f"run 'attncache migrate {folder}' or rebuild it with 'attncache build'")
    if v != FORMAT_VERSION:
        raise UserError(f"{folder}: cache format {v} is not supported by this attncache (format {FORMAT_VERSION}); "
                        "rebuild it with 'attncache build'")
    return m


# -- the write lock -------------------------------------------------------------------------------
@contextlib.contextmanager
def write_lock(folder: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Exclusive right to write ``folder``. Another writer gets a clear error (or waits up to ``wait_s``)."""
    path = Path(folder) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    who = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise UserError(f"{folder} is being written by another process (pid {who}); "
                                    "one writer at a time: wait for it or pass a longer --lock-wait") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def layout_json(layout: StoreLayout) -> dict:
    return asdict(layout)
