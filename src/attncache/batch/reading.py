"""A batch job's input, read in Ray tasks: files stream in chunks, never through the driver.

DATA is a built-in dataset name or a sliced path (small: read on the driver, as ``eval`` reads it),
or a file, a glob or a folder of ``.jsonl`` / ``.parquet`` / ``.csv`` files, each read by a Ray
task in chunks of ``CHUNK_ROWS``. Every record becomes one row of the job with

- ``file`` (the file's index in ``Source.files``) and ``idx`` (its line or row in that file, from
  0), so the output can be put back in input order;
- ``row`` (the parsed row, or "" when it could not be parsed) and ``error`` (why, else "");
- ``key``: the text its model input opens with, up to its last blank line (a few-shot header), or
  all of it when there is none, and ``bucket``: a stable hash of ``key`` into the job's parts, so
  every row of one prompt lands in the same part and the same actor.

``columns`` maps the names the job expects (prompt, choices, answer, text, text1, text2, label) to
the file's own (``{"prompt": "question"}``); a CSV cell for ``choices`` holds a JSON list.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import data as data_mod
from ..data import ChoiceRow, PairRow, TextRow
from ..errors import UserError

CHUNK_ROWS = 1024  # records per block a reader task yields
# a prompt's rows stay together in runs of this many (by position in their file): a prompt shared
# by a million rows still spreads over every actor, each computing it once per run
SPLIT_ROWS = 4096


class Unreadable(str):
    """A record that is not JSON: its error message, kept as the row's ``error``."""


FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}
FIELDS = ("prompt", "choices", "answer", "text", "text1", "text2", "label")


_KINDS = {"choice": ChoiceRow, "text": TextRow, "pair": PairRow}


def encode_row(row) -> str:
    kind = next(k for k, c in _KINDS.items() if isinstance(row, c))
    return json.dumps({"kind": kind, **asdict(row)})


def decode_row(s: str):
    d = json.loads(s)
    cls = _KINDS[d.pop("kind")]
    if cls is ChoiceRow:
        d["choices"] = tuple(d["choices"])
    return cls(**d)


def order_key(row) -> str:
    """The text a row's model input starts with: in this order rows that share a prompt prefix (a
    few-shot header, a question's choices) are neighbours, so they meet in one actor's call."""
    if isinstance(row, ChoiceRow):
        return row.prompt
    if isinstance(row, PairRow):
        return row.text1
    return row.text


@dataclass(frozen=True)
class Source:
    files: tuple[str, ...]  # empty: a built-in dataset, read on the driver
    spec: str


def find_source(data: str) -> Source:
    """The files DATA names (sorted, so indices are stable across reruns); none for built-ins and
    sliced specs."""
    base = data.partition(":")[0].partition("[")[0]
    if base in data_mod.BUILTINS or data.endswith("]"):
        return Source((), data)
    p = Path(data)
    if p.is_dir():
        found = sorted(str(f) for f in p.rglob("*") if f.suffix in FORMATS and f.is_file())
    elif any(ch in data for ch in "*?["):
        found = sorted(f for f in glob.glob(data, recursive=True) if Path(f).suffix in FORMATS)
    elif p.is_file():
        if p.suffix not in FORMATS:
            raise UserError(f"'{data}': expected a .jsonl, .parquet or .csv file")
        found = [str(p)]
    else:
        raise UserError(f"data '{data}' is neither a built-in dataset nor an existing path")
    if not found:
        raise UserError(f"'{data}': no .jsonl, .parquet or .csv files there")
    return Source(tuple(str(Path(f).resolve()) for f in found), data)


def parse_columns(text: str | None) -> dict[str, str]:
    """``prompt=question,choices=options`` -> {"prompt": "question", "choices": "options"}."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for part in text.split(","):
        ours, eq, theirs = part.partition("=")
        if not eq or ours.strip() not in FIELDS or not theirs.strip():
            raise UserError(
                f"--columns: expected FIELD=COLUMN pairs with FIELD one of {', '.join(FIELDS)}, "
                f"got '{part}'"
            )
        out[ours.strip()] = theirs.strip()
    return out


def group_key(row) -> str:
    text = order_key(row)
    cut = text.rfind("\n\n")
    return text[: cut + 2] if cut > 0 else text


def bucket_of(key: str, file: int, idx: int, parts: int) -> int:
    """The part a row goes to: a stable hash (not Python's, which differs between processes) of
    its group key and its run of SPLIT_ROWS rows."""
    text = f"{file}:{idx // SPLIT_ROWS}:{key}"
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % parts


def job_row(file: int, idx: int, record, columns: dict[str, str], parts: int) -> dict:
    """One record as a row of the job (see the module docstring)."""
    try:
        if isinstance(record, Unreadable):
            raise ValueError(str(record))
        if isinstance(record, dict) and columns:
            record = {**record, **{ours: record.get(theirs) for ours, theirs in columns.items()}}
        if isinstance(record, dict) and isinstance(record.get("choices"), str):
            record = {**record, "choices": json.loads(record["choices"])}
        row = data_mod.parse_row(record)
    except (ValueError, KeyError, TypeError) as e:
        return {"file": file, "idx": idx, "row": "", "error": str(e), "key": "", "bucket": 0}
    key = group_key(row)
    return {
        "file": file,
        "idx": idx,
        "row": encode_row(row),
        "error": "",
        "key": key,
        "bucket": bucket_of(key, file, idx, parts),
    }


def _records(path: str) -> Iterator[tuple[int, object]]:
    kind = FORMATS[Path(path).suffix]
    if kind == "jsonl":
        with open(path, "rb") as f:
            for n, raw in enumerate(f):
                if raw.strip():
                    try:
                        yield n, json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        yield n, Unreadable(f"line {n + 1}: not valid JSON ({e})")
        return
    n = 0
    if kind == "parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS)
    else:
        import pyarrow.csv as pacsv

        batches = pacsv.open_csv(path)
    for batch in batches:
        for record in batch.to_pylist():
            yield n, record
            n += 1


@dataclass(frozen=True)
class ReadSpec:
    columns: dict[str, str]
    parts: int
    done: frozenset[int]  # parts already written: their rows are dropped
    limit: int | None  # only the first N rows of each file


def read_file(task: dict, spec: ReadSpec):
    """A Ray ``map_batches`` generator: the files of ``task`` as job rows, CHUNK_ROWS at a time."""
    for file, path in zip(task["file"], task["path"], strict=True):
        chunk: list[dict] = []
        for idx, record in _records(str(path)):
            if spec.limit is not None and idx >= spec.limit:
                break
            row = job_row(int(file), idx, record, spec.columns, spec.parts)
            if row["bucket"] in spec.done:
                continue
            chunk.append(row)
            if len(chunk) == CHUNK_ROWS:
                yield _columnar(chunk)
                chunk = []
        if chunk:
            yield _columnar(chunk)


def _columnar(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


def driver_rows(source: Source, encoder: bool, limit: int | None, parts: int) -> list[dict]:
    """A built-in or sliced DATA, read here as ``eval`` reads it (small by construction)."""
    rows = data_mod.load(source.spec, encoder=encoder, limit=limit).rows
    out = []
    for i, row in enumerate(rows):
        key = group_key(row)
        bucket = bucket_of(key, 0, i, parts)
        out.append(
            {"file": 0, "idx": i, "row": encode_row(row), "error": "", "key": key, "bucket": bucket}
        )
    return out
