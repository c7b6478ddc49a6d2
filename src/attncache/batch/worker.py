"""What each Ray actor of a batch job runs, and the same work in one process (``predict_rows``)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..tasks import RunOptions, Tiers
from .ledger import WorkerReport
from .reading import decode_row


@dataclass(frozen=True)
class WorkerSpec:
    """How every actor opens its session (the DB or model, the job's settings) and where it
    writes its parts."""

    db: str | None
    model_name: str | None
    policy: str | None
    batch_size: int
    max_tokens: int | None
    attach: bool
    device: str
    dtype: str
    memo: bool
    prefix_bytes: int | None
    out: str  # the job's folder
    fmt: str  # "jsonl" or "parquet"


CALL_ROWS = 256  # rows per ``run`` call inside a part: the tree keeps prompts between them
FAULT_ENV = "ATTNCACHE_BATCH_FAULT"  # tests: "kill-once:MARKER" kills the first actor mid-part


def part_path(out: str | Path, bucket: int, fmt: str) -> Path:
    return Path(out) / f"part-{bucket:05d}.{fmt}"


class Worker:
    """One per Ray actor: the session (model, DB) opened once, the map cache attached for the
    actor's life, the prefix tree kept across calls. Each call is one part of the job (every row
    of its bucket): run in prompt order, written atomically to its part file, its new answers and
    counts handed to the job's ledger; it returns one summary row."""

    def __init__(self, spec: WorkerSpec, ledger) -> None:
        from ..tiers.memo import ResultMemo
        from ..workflows import Session, SessionOptions

        self.spec = spec
        self.s = Session.open(
            spec.db,
            spec.model_name,
            SessionOptions(max_tokens=spec.max_tokens, device=spec.device, dtype=spec.dtype),
        )
        self.ledger = ledger
        cache = self.s.cache
        use_maps = spec.attach and cache is not None
        attached = cache.attach(self.s.model, spec.policy).__enter__() if use_maps else None
        memo = ResultMemo.load(cache.db) if spec.memo and cache is not None else None
        self.tiers = Tiers(attached, self.s.prefix_tier(spec.prefix_bytes), memo)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["idx"])
        # prompt order, shortest first within one: a shared prompt's rows meet in one run call
        order = sorted(range(n), key=lambda i: (batch["key"][i], len(batch["row"][i])))
        good = [i for i in order if not batch["error"][i]]
        prefix, memo = self.tiers.prefix, self.tiers.memo
        before = (prefix.stats.tokens_total, prefix.stats.tokens_run) if prefix else (0, 0)
        opts = RunOptions(batch_size=self.spec.batch_size, progress=False, keep_prefixes=True)
        results: dict[int, dict] = {}
        for lo in range(0, len(good), CALL_ROWS):
            chunk = good[lo : lo + CALL_ROWS]
            rows = [decode_row(batch["row"][i]) for i in chunk]
            cols = predict_rows(self.s, rows, chunk, self.tiers, opts)
            for at, i in enumerate(chunk):
                results[i] = {k: cols[k][at] for k in cols if k != "idx"}
            _maybe_fault()
        out = []
        for i in sorted(range(n), key=lambda i: (batch["file"][i], batch["idx"][i])):
            r = results.get(i) or _unplanned(str(batch["error"][i]))
            out.append({"file": int(batch["file"][i]), "idx": int(batch["idx"][i]), **r})
        bucket = int(batch["bucket"][0])
        _write_part(part_path(self.spec.out, bucket, self.spec.fmt), out)
        cache = self.s.cache
        report = WorkerReport(
            memo=memo.take_fresh().to_arrays() if memo is not None and memo.dirty else None,
            usage=cache.db.usage.take() if cache is not None else {},
            tokens_total=prefix.stats.tokens_total - before[0] if prefix else 0,
            tokens_run=prefix.stats.tokens_run - before[1] if prefix else 0,
        )
        if memo is not None:
            memo.dirty = False  # its answers are the ledger's to commit now
        import ray

        ray.get(self.ledger.add.remote(report))
        bad = [r for r in out if r["error"]]
        first = f"file {bad[0]['file']} row {bad[0]['idx']}: {bad[0]['error']}" if bad else ""
        return {
            "bucket": [bucket],
            "rows": [len(out)],
            "errors": [len(bad)],
            "hits": [sum(r["cache_hit"] for r in out)],
            "first_error": [first],
        }


def _unplanned(error: str) -> dict:
    return {"prediction": -1, "scores": [], "embedding": [], "cache_hit": False, "error": error}


def _maybe_fault() -> None:
    """The test hook of ``FAULT_ENV``: the first actor to pass here (its marker file absent) dies
    as SIGKILL would kill it, after computing part of a part and before writing it."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("kill-once:"):
        marker = Path(spec.partition(":")[2])
        try:
            marker.open("x").close()
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def _write_part(path: Path, rows: list[dict]) -> None:
    """All of a part or nothing: written beside, then renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".jsonl":
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)


def predict_rows(
    s, rows: list, idx: list[int], tiers: Tiers | None = None, options: RunOptions | None = None
) -> dict:
    """Per row: index, prediction or embedding, scores, cache hit, and ``error`` (empty, or why
    the row could not be planned: too long, an empty choice; such a row gets no prediction and
    never fails the job)."""
    from ..tasks import choice_scores, plan_rows, run

    plan = plan_rows(rows, s.tokenizer, s.causal, s.max_len)
    options = options or RunOptions(progress=False)
    tiers = tiers or Tiers()
    if tiers.attached is not None and tiers.attached.inert:  # a policy that reuses nothing
        tiers = replace(tiers, attached=None)
    out = run(s.model, s.tokenizer, plan, options, tiers=tiers)
    cols: dict = {k: [] for k in ("idx", "prediction", "scores", "embedding", "cache_hit", "error")}
    for n, (i, r) in enumerate(zip(idx, plan.by_input(len(rows)), strict=True)):
        cols["idx"].append(int(i))
        if r is None:
            for k, empty in (("prediction", -1), ("scores", []), ("embedding", [])):
                cols[k].append(empty)
            cols["cache_hit"].append(False)
            cols["error"].append(plan.error_of(n))
            continue
        cols["error"].append("")
        cols["cache_hit"].append(bool(any(out.hit[q] for q in r.seqs)))
        prediction, scores, embedding = -1, [], []
        if r.kind in ("choice1", "choiceN"):
            sc = choice_scores(r, out)
            prediction, scores = int(np.argmax(sc)), [float(x) for x in sc]
        elif r.kind == "text":
            prediction = int(out.argmax[r.seqs[0]])
        else:
            embedding = [float(x) for x in np.concatenate([out.embeddings[q] for q in r.seqs])]
        cols["prediction"].append(prediction)
        cols["scores"].append(scores)
        cols["embedding"].append(embedding)
    return cols
