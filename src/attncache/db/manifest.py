"""``manifest.json``: the commit point of a DB folder, its typed parts, and the file checks around
it.

Layout of a DB folder::

    manifest.json              the commit point (written last, atomically): format version, model
    identity,
                               store layout and codec, the entry table, the segments with their
                               committed
                               sizes, the generation's small files with size and sha256, threshold,
                               policy
    seg-000000.bin ...         entries' encoded maps back to back (``segments.py``)
    features-<g>.npy           [N, F] float32 projector inputs (kept so the projector can be
    retrained)
    vectors-<g>.npy            [N, P] float32 projected vectors (what the index holds)
    projector-<g>.safetensors  projector weights
    index-<g>.faiss            the ANN index (approximate indexes only; exact ones are rebuilt at
    open)
    templates-<g>.npy          template maps of the heads calibration chose (optional)
    .lock / .readers           the writer's and the opening readers' locks (``locks.py``)

Writers commit by writing new files under new names, then the manifest, then deleting what the new
manifest no longer references. A crash at any point leaves the previous manifest and every file it
references intact; files left over by a crash are never referenced, are ignored by readers and
removed by the next writer.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .files import MANIFEST, file_digest, safe_name
from .locks import LOCK, READERS, no_reader_opening
from .segments import EntryTable, seg_name

FORMAT_VERSION = 2
# files a crashed writer may leave behind: ours by name, unreferenced by the manifest
_OURS = re.compile(
    r"^(seg-\d+\.bin|(features|vectors|projector|index|templates|memo)-\d+\."
    r"(npy|safetensors|faiss)|\..+\.tmp(\.npy)?)$"
)
GENERATION_FILES = ("features", "vectors", "projector")  # always present; index, templates optional


@dataclass(frozen=True)
class Shape:
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class ModelInfo:
    """Which model a DB was built with: its name, family and a content fingerprint."""

    name: str
    model_type: str
    adapter: str
    causal: bool
    fingerprint: dict[str, str]
    shape: Shape

    @classmethod
    def from_json(cls, d: dict) -> ModelInfo:
        shape = Shape(
            int(d["n_layers"]), int(d["n_heads"]), int(d["n_kv_heads"]), int(d["head_dim"])
        )
        return cls(
            str(d["name"]),
            str(d["model_type"]),
            str(d.get("adapter", "")),
            bool(d["causal"]),
            dict(d["fingerprint"]),
            shape,
        )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "model_type": self.model_type,
            "adapter": self.adapter,
            "causal": self.causal,
            "fingerprint": self.fingerprint,
            "n_layers": self.shape.n_layers,
            "n_heads": self.shape.n_heads,
            "n_kv_heads": self.shape.n_kv_heads,
            "head_dim": self.shape.head_dim,
        }


def read_manifest(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if folder.is_file():
        raise UserError(f"'{folder}' is a file, not a cache DB folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(
            f"'{folder}' is not a cache DB (no {MANIFEST}); create one with 'attncache build'"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({e.__class__.__name__})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: unreadable manifest (not an object)")
    version = manifest.get("format_version")
    if version == 1:
        raise UserError(
            f"{folder}: cache format 1 is older than this attncache's format "
            f"{FORMAT_VERSION}; run 'attncache migrate {folder}' or rebuild it with "
            "'attncache build'"
        )
    if version != FORMAT_VERSION:
        raise UserError(
            f"{folder}: cache format {version} is not supported by this attncache (format "
            f"{FORMAT_VERSION}); rebuild it with 'attncache build'"
        )
    return manifest


def generation_files(manifest: dict) -> dict[str, str]:
    """{kind: file name} of the committed generation's small files, each checked to stay inside the
    DB."""
    names = manifest.get("names")
    if not isinstance(names, dict) or not set(GENERATION_FILES) <= set(names):
        raise UserError("malformed manifest: no file names for this generation")
    return {k: safe_name(v) for k, v in names.items()}


def referenced(manifest: dict) -> set[str]:
    return set(manifest.get("segments", {})) | set(manifest.get("files", {}))


def check_files(folder: Path, manifest: dict, full: bool = False) -> list[str]:
    """Problems with the data files: missing, short, (full) corrupted entries or files, extras."""
    problems: list[str] = []
    for name, meta in manifest.get("files", {}).items():
        path = folder / safe_name(name)
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != meta["size"]:
            problems.append(
                f"{name} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
            )
        elif full and file_digest(path) != meta["sha256"]:
            problems.append(f"{name} does not match its checksum (corrupted)")
    for name, size in manifest.get("segments", {}).items():
        path = folder / safe_name(name)
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size < size:
            problems.append(
                f"{name} has {path.stat().st_size} bytes, the manifest commits {size} (truncated)"
            )
    if full and not problems:
        problems += _corrupted_entries(folder, EntryTable.from_json(manifest["entries"]))
    refs = referenced(manifest)
    extra = sorted(
        p.name
        for p in folder.iterdir()
        if p.name not in refs
        and p.name not in (MANIFEST, LOCK, READERS)
        and not _OURS.match(p.name)
    )
    return problems + [f"unexpected file {n}" for n in extra]


def _corrupted_entries(folder: Path, table: EntryTable) -> list[str]:
    out = []
    for seg in np.unique(table.seg):
        data = np.memmap(folder / seg_name(seg), dtype=np.uint8, mode="r")  # segments can be GBs
        for row in np.flatnonzero(table.seg == seg):
            start, n = int(table.offset[row]), int(table.nbytes[row])
            if zlib.crc32(data[start : start + n]) != int(table.crc[row]):
                out.append(
                    f"entry {row} (uid {int(table.uid[row])}) in {seg_name(seg)} is corrupted"
                )
    return out


def remove_unreferenced(folder: Path, manifest: dict) -> int:
    """Delete our files the manifest does not reference (old generations, a crashed writer's
    leftovers). Only call while holding the write lock. Skipped (left for a later commit) while a
    reader opens."""
    with no_reader_opening(folder) as free:
        if not free:
            return 0
        refs, n = referenced(manifest), 0
        for path in Path(folder).iterdir():
            if path.name not in refs and _OURS.match(path.name):
                path.unlink(missing_ok=True)
                n += 1
        return n
