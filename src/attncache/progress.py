"""Progress on long work: a bar on a terminal, one line per stage in a log.

Off a TTY (CI, a batch job, ``2>file``) a bar would write thousands of updates; there each stage
prints one line when it ends, with its count and seconds.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class Stage:
    """``with Stage(total, "pair labels") as bar: bar.update(n)``; also usable as an iterator
    wrapper."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, iterable: Any = None):
        self.total, self.desc, self.enabled, self.iterable = total, desc, enabled, iterable
        self.done = 0
        self._t0 = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.desc:
            print(
                f"{self.desc}: {self.done} in {time.perf_counter() - self._t0:.1f} s",
                file=sys.stderr,
            )
            self.enabled = False

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update()
        finally:
            self.close()


def stage(iterable, desc: str, enabled: bool = True, total: int | None = None) -> Stage:
    """Iterate with progress."""
    if total is None:
        total = len(iterable) if hasattr(iterable, "__len__") else None
    return Stage(total, desc, enabled, iterable)
