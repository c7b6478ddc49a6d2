"""The two locks of a DB folder (``flock``, released when the process dies).

- ``.lock``: exclusive, held by the one process allowed to write (build, insert, evict, retrain,
  calibrate).
- ``.readers``: shared by readers *while they open* one generation's files; a writer deletes the
  files a new manifest no longer references only when it can take this lock exclusively, so an
  opening reader never sees a file vanish. Once open, a reader holds memmaps and needs no lock
  (POSIX unlink semantics).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

LOCK = ".lock"
READERS = ".readers"


@contextlib.contextmanager
def write_lock(folder: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Exclusive right to write ``folder``. Another writer gets a clear error (or waits up to
    ``wait_s``)."""
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
                    raise UserError(
                        f"{folder} is being written by another process (pid {who}); "
                        "one writer at a time: wait for it or pass a longer --lock-wait"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def is_write_locked(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s write lock (an interrupted build's folder is
    not)."""
    try:
        with write_lock(folder):
            return False
    except (UserError, OSError):
        return True


@contextlib.contextmanager
def opening(folder: Path) -> Iterator[None]:
    """Held (shared) by a reader while it reads one generation's files."""
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


@contextlib.contextmanager
def no_reader_opening(folder: Path) -> Iterator[bool]:
    """Yields True while no reader is opening (the exclusive side of ``opening``), else False at
    once."""
    try:
        fd = os.open(Path(folder) / READERS, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
