"""Building a DB folder beside its destination, and publishing it in one rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from .locks import LOCK, READERS, is_write_locked, write_lock


@contextlib.contextmanager
def staging(out: Path, force: bool = False) -> Iterator[Path]:
    """A new write-locked folder beside ``out`` that replaces ``out`` when the block ends without
    error.

    An interrupted build leaves only its staging folder, which the next build removes; ``out`` is
    never half-written."""
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not force:
        raise UserError(f"'{out}' already exists; choose a new --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.building-*"):
        if not is_write_locked(stale):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        with write_lock(tmp):
            yield tmp
            _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished DB folder into place, replacing ``out`` (taking its write lock first)."""
    if out.exists():
        with write_lock(out) if out.is_dir() else contextlib.nullcontext():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    for name in (LOCK, READERS):
        (tmp / name).unlink(missing_ok=True)
    os.replace(tmp, out)


@contextlib.contextmanager
def scratch_folder(parent: Path, name: str) -> Iterator[Path]:
    """A temporary folder inside a staging folder, removed afterwards (build's layer probe)."""
    path = Path(parent) / name
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
