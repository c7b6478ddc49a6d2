"""Argument types and the option groups several commands share; refusing flags that would do
nothing."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..errors import UserError

POLICY_GRAMMAR = """\
policies (--policy P):
  default      what the DB stores (build's most stable layers; 'calibrate' replaces it)
  all          every layer of a hit (the paper's mode; costs accuracy)
  none         never reuse (lookups still run and are counted)
  17,20,23     every head of these layers
  heads:N      the N (layer, head) maps that differed least between close build inputs
  fixed        every head the DB has a template map for (one mean map, served with no lookup)
  fixed:N      the N best-ranked template heads
  A+B          the union of two policies, e.g. fixed:54+default (templates win where both apply)"""

DATA_HELP = (
    "built-in name (sst2, sst2:Kshot, piqa, rte, hellaswag, arc_easy[:Kshot], mmlu, mmlu:Kshot) "
    "or a .jsonl path; may end in a slice like [0:400]"
)


def number(
    kind: type,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Callable[[str], float]:
    """An argparse type: ``kind`` within [lo, hi] (open ends where asked), with a one-line error."""

    def parse(text: str):
        try:
            value = kind(text)
            if value != value:  # nan passes every range check below
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got '{text}'") from None
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        high_bad = hi is not None and (value >= hi if hi_open else value > hi)
        if low_bad or high_bad:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(
                f"must be in {left}{lo}, {hi if hi is not None else 'inf'}{right}, got {text}"
            )
        return value

    return parse


POSITIVE = number(int, 1)
NON_NEGATIVE = number(int, 0)
UNIT_OPEN = number(float, 0.0, 1.0, lo_open=True, hi_open=True)
UNIT_HALF_OPEN = number(float, 0.0, 1.0, lo_open=True)


def size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    try:
        n = (
            float(text[:-1]) * units[text[-1].lower()]
            if text and text[-1].lower() in units
            else float(text)
        )
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 2G, got '{text}'") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return int(n)


def add_db(sp, positional: bool = False) -> None:
    sp.add_argument("--db", help="cache DB folder")
    if positional:  # the older form 'attncache inspect DB' keeps working
        sp.add_argument("db_path", nargs="?", metavar="DB", help=argparse.SUPPRESS)


def add_data(sp, required: bool = True) -> None:
    sp.add_argument("--data", required=required, help=DATA_HELP)
    sp.add_argument("--limit", type=POSITIVE, help="use only the first N rows")
    sp.add_argument(
        "--max-tokens",
        type=POSITIVE,
        help="skip (and report) rows whose model input is longer than N tokens",
    )
    sp.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad data row instead of skipping it",
    )


def add_output(sp, json_flag: bool = True) -> None:
    sp.add_argument("--quiet", action="store_true", help="no progress")
    if json_flag:
        sp.add_argument("--json", action="store_true", help="print one JSON object")


def add_model(sp, default: str | None = None) -> None:
    help_ = (
        "built-in name (smollm2-135m, minilm-l6), HF folder or .gguf"
        if default
        else "load this model instead of the one named in the DB (must be the same weights)"
    )
    sp.add_argument("--model", default=default, help=help_)
    sp.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs (default auto: cuda when visible)",
    )
    sp.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="model weights' dtype (default float32)",
    )


def add_device_maps(sp) -> None:
    sp.add_argument(
        "--device-map-bytes",
        type=size,
        help="keep the hottest maps on the model's device, up to this many bytes (LRU)",
    )


def add_prefix(sp) -> None:
    sp.add_argument(
        "--no-prefix-cache", action="store_true", help="switch off the exact prefix K/V tier"
    )
    sp.add_argument(
        "--prefix-bytes",
        type=size,
        help="memory cap of the prefix K/V tier, e.g. 512M (default 2G)",
    )


def prefix_bytes(a) -> int | None:
    from ..tiers import DEFAULT_PREFIX_BYTES

    if a.no_prefix_cache:
        refuse(a, ["prefix_bytes"], "with --no-prefix-cache")
        return None
    return a.prefix_bytes or DEFAULT_PREFIX_BYTES


def given(a, dest: str) -> bool:
    value = getattr(a, dest, None)
    return value not in (None, False, [])


def refuse(a, dests: list[str], why: str) -> None:
    """A flag that would have no effect in this combination is an error, never silently ignored."""
    for dest in dests:
        if given(a, dest):
            raise UserError(f"--{dest.replace('_', '-')} has no effect {why}")


def db_or_model(a) -> str | None:
    """A DB, or None when --model alone is given (the exact tiers, no map reuse)."""
    if not getattr(a, "db", None) and not getattr(a, "db_path", None) and getattr(a, "model", None):
        return None
    return db_of(a)


def db_of(a) -> str:
    """The DB folder, from --db or (for the DB commands) the older positional form."""
    pos = getattr(a, "db_path", None)
    if a.db and pos and a.db != pos:
        raise UserError(f"two DB folders given: --db {a.db} and {pos}")
    db = a.db or pos
    if not db:
        raise UserError("which DB? pass --db FOLDER")
    return db
