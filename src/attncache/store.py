"""The memory-mapped map store and its JSON manifest.

Layout of a DB folder::

    manifest.json          format version, model identity, shapes, per-entry lengths and offsets,
                           projector settings, threshold, reuse policy (the commit point: written last,
                           atomically)
    maps.bin               every entry's maps back to back, entry e = [n_stored_layers, H_q, L_e, L_e]
                           in the store dtype (fp16 by default), C order
    features.npy           [N, F] float32 projector inputs (kept so the projector can be retrained)
    vectors.npy            [N, P] float32 projected vectors (what the index holds)
    projector.safetensors  projector weights
    index.faiss            the ANN index (only for approximate indexes; exact ones are rebuilt at open)

Nothing here is read with pickle: ``np.load(allow_pickle=False)``, safetensors and raw memmaps only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAPS = "maps.bin"
DTYPES = {"float16": np.float16, "float32": np.float32}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def load_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


@dataclass
class StoreLayout:
    n_heads: int
    layers: list[int]  # model layer indices that have stored maps, in storage order
    dtype: str = "float16"

    @property
    def np_dtype(self):
        return DTYPES[self.dtype]

    def entry_elems(self, length: int) -> int:
        return len(self.layers) * self.n_heads * length * length


@dataclass
class MapWriter:
    """Appends entries to maps.bin; offsets/lengths go into the manifest at commit."""

    folder: Path
    layout: StoreLayout
    lengths: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def __post_init__(self):
        self._f = open(self.folder / MAPS, "ab")
        self._pos = self._f.tell()

    def append(self, maps: np.ndarray) -> int:
        """maps: [n_stored_layers, H, L, L]. Returns the new entry id."""
        nl, h, L, L2 = maps.shape
        assert (nl, h, L) == (len(self.layout.layers), self.layout.n_heads, L2), maps.shape
        data = np.ascontiguousarray(maps, dtype=self.layout.np_dtype)
        self.offsets.append(self._pos)
        self.lengths.append(L)
        self._f.write(data.tobytes())
        self._pos += data.nbytes
        return len(self.lengths) - 1

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class MapStore:
    """Read side: zero-copy views into maps.bin."""

    def __init__(self, folder: Path, layout: StoreLayout, lengths: list[int], offsets: list[int]):
        self.folder = Path(folder)
        self.layout = layout
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.layer_pos = {layer: i for i, layer in enumerate(layout.layers)}
        path = self.folder / MAPS
        size = path.stat().st_size if path.exists() else 0
        itemsize = np.dtype(layout.np_dtype).itemsize
        need = int(self.offsets[-1] + layout.entry_elems(int(self.lengths[-1])) * itemsize) if len(lengths) else 0
        if size < need:
            raise UserError(f"{path}: truncated ({size} bytes, manifest needs {need}); run 'attncache verify'")
        # mode 'c' (copy-on-write) gives writeable views for torch.from_numpy without touching the file.
        self._mm = np.memmap(path, dtype=np.uint8, mode="c") if size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.lengths)

    def entry(self, e: int) -> np.ndarray:
        """[n_stored_layers, H, L, L] view of entry e (no copy)."""
        L = int(self.lengths[e])
        n = self.layout.entry_elems(L)
        off = int(self.offsets[e])
        itemsize = np.dtype(self.layout.np_dtype).itemsize
        flat = self._mm[off : off + n * itemsize].view(self.layout.np_dtype)
        return flat.reshape(len(self.layout.layers), self.layout.n_heads, L, L)

    def layer(self, e: int, layer: int, length: int | None = None) -> np.ndarray:
        """[H, L, L] view of one layer's maps; ``length`` < L_e takes the exact causal top-left crop."""
        m = self.entry(e)[self.layer_pos[layer]]
        if length is not None and length != m.shape[-1]:
            m = m[:, :length, :length]
        return m

    @property
    def nbytes(self) -> int:
        return int(self._mm.nbytes)


DATA_FILES = (MAPS, "features.npy", "vectors.npy", "projector.safetensors", "index.faiss")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_files(folder: Path) -> dict:
    """{name: {size, sha256}} of the DB's data files, recorded in the manifest at commit."""
    return {n: {"size": (folder / n).stat().st_size, "sha256": file_digest(folder / n)}
            for n in DATA_FILES if (folder / n).exists()}


def check_files(folder: Path, files: dict, full: bool = False) -> list[str]:
    """Problems with the data files: missing, wrong size, (full) wrong checksum, or unexpected extra files.

    ``files`` empty means the DB predates checksums: nothing to check against.
    """
    problems: list[str] = []
    if not files:
        return problems
    for name, meta in files.items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != meta["size"]:
            problems.append(f"{name} has {p.stat().st_size} bytes, the manifest says {meta['size']}")
        elif full and file_digest(p) != meta["sha256"]:
            problems.append(f"{name} does not match its checksum (corrupted)")
    extra = sorted(p.name for p in folder.iterdir() if p.name not in files and p.name != MANIFEST)
    problems += [f"unexpected file {n}" for n in extra]
    return problems


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
    v = m.get("format_version")
    if v != FORMAT_VERSION:
        raise UserError(
            f"{folder}: cache format {v} is not supported by this attncache (format {FORMAT_VERSION}); "
            "rebuild it with 'attncache build'"
        )
    return m
