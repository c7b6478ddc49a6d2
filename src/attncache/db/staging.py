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
    if out.parent.is_dir():
        _recover(out)
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
    """Move a finished DB folder into place, replacing ``out``: the old one is renamed aside
    (under its write lock), the new one renamed in, and only then is the old one deleted. A
    failed swap puts the old one back; a crash between the renames leaves it whole beside
    ``out`` (``aside_of``), where the next build or open finds it."""
    for name in (LOCK, READERS):
        (tmp / name).unlink(missing_ok=True)
    if not out.exists():
        _swap_in(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.replaced-"))
    aside.rmdir()  # a fresh name: the rename below makes it
    with write_lock(out) if out.is_dir() else contextlib.nullcontext():
        os.rename(out, aside)
        try:
            _swap_in(tmp, out)
        except BaseException:
            os.rename(aside, out)
            raise
    shutil.rmtree(aside) if aside.is_dir() else aside.unlink()


def _swap_in(tmp: Path, out: Path) -> None:
    try:
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(
            f"could not move the new DB into '{out}' ({e.strerror or e}); the old one is unchanged"
        ) from None


def aside_of(out: Path) -> Path | None:
    """A previous DB that an interrupted replace left beside ``out`` (newest first), if any."""
    out = Path(out)
    found = sorted(
        out.parent.glob(f".{out.name}.replaced-*"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    return found[0] if found else None


def _recover(out: Path) -> None:
    """Before a build: a DB an interrupted replace moved aside goes back to ``out`` if ``out``
    is missing; otherwise the leftovers are removed."""
    while (aside := aside_of(out)) is not None:
        if not out.exists():
            os.rename(aside, out)
        elif not is_write_locked(aside):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            break


@contextlib.contextmanager
def scratch_folder(parent: Path, name: str) -> Iterator[Path]:
    """A temporary folder inside a staging folder, removed afterwards (build's layer probe)."""
    path = Path(parent) / name
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
