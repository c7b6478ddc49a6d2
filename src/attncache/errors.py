"""One exception type for problems the user can fix; the CLI prints it as one line and exits 2."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable


class UserError(Exception):
    """Bad input, a missing file, an incompatible DB: reported without a traceback."""


def keep_or_warn(what: str, save: Callable[[], object]) -> bool:
    """Run ``save``, which keeps what later runs reuse (answers, prefix K/V). A refusal (a full
    disk, a damaged file in the way) is one line on stderr, not the end of a run whose own
    results are computed already; False then."""
    try:
        save()
    except UserError as e:
        print(f"attncache: warning: {what} not kept: {e}", file=sys.stderr)
        return False
    return True


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
