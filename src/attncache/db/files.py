"""Crash-safe file writes and guarded reads: the only place that opens a DB file for writing.

Every write goes to a temporary name, is fsynced, then renamed over the target (and the folder
fsynced for the manifest), so a reader or a crash sees either the old file or the new one, never a
mix. Nothing is read with pickle: ``np.load(allow_pickle=False)``, safetensors, JSON and raw memmaps
only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import UserError

MANIFEST = "manifest.json"
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], Any], tmp_suffix: str = ".tmp") -> None:
    """``write(file)`` into a temporary name, fsync, rename over ``path``; on an OS error nothing
    changes."""
    tmp = path.with_name(f".{path.name}{tmp_suffix}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(path, e) from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def save_npy(path: Path, arr: np.ndarray) -> None:
    def write(f: BinaryIO) -> None:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)

    atomic_write(path, write, ".tmp.npy")


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def disk_error(path: Path, e: OSError) -> UserError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on the device writing {path.name}; the cache is unchanged")
    return UserError(f"could not write {path}: {e.strerror or e}; the cache is unchanged")


def safe_name(name: object) -> str:
    """A file name from a manifest: refused if it could leave the DB folder."""
    ok = isinstance(name, str) and _NAME_OK.match(name) and ".." not in name and name != MANIFEST
    if not ok:
        raise UserError(
            f"manifest names a file '{name}' outside the cache folder: refusing to read it"
        )
    return str(name)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {size, sha256}} of a generation's small files, recorded in the manifest at commit."""
    return {
        n: {"size": (folder / n).stat().st_size, "sha256": file_digest(folder / n)} for n in names
    }


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files directly in ``folder`` (what ``du`` counts for a DB, roughly)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
