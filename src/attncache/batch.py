"""Scale-out: a Ray Data batch job over DATA with the cache attached in every actor.

``run_batch`` reads DATA on the driver, hands rows to ``ray.data``'s ``map_batches`` with an actor
pool; each actor opens the DB read-only (memory-mapped, so actors on one node share the page cache)
and loads the model once. Output rows, in input order, carry the row index, the prediction (choice
index, or greedy token for text rows on a decoder) or the embedding (encoders), the choices' scores,
whether the cache hit, and ``error`` (why a row could not be planned, else empty: such rows never
fail the job). Written as JSONL or Parquet (by the OUT suffix). Ray is an optional
extra: ``pip install 'attncache[ray]'``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import data as data_mod
from . import models
from .data import ChoiceRow, PairRow, TextRow
from .errors import UserError
from .tiers import DEFAULT_PREFIX_BYTES

_KINDS = {"choice": ChoiceRow, "text": TextRow, "pair": PairRow}


def _encode(row) -> str:
    kind = next(k for k, c in _KINDS.items() if isinstance(row, c))
    return json.dumps({"kind": kind, **asdict(row)})


def _decode(s: str):
    d = json.loads(s)
    cls = _KINDS[d.pop("kind")]
    if cls is ChoiceRow:
        d["choices"] = tuple(d["choices"])
    return cls(**d)


MEMO_SAVE_EVERY = 500  # new answers an actor collects before it tries to commit them


class Predictor:
    """One per Ray actor: the session (model, DB), the cache attached for the actor's life, the
    memo."""

    def __init__(
        self,
        db: str | None,
        model_name: str | None,
        policy: str | None,
        batch_size: int,
        max_tokens: int | None,
        attach: bool = True,
        device: str = "cpu",
        dtype: str = "float32",
        memo: bool = True,
    ):
        from .tiers.memo import ResultMemo
        from .workflows import Session

        self.s = Session.open(db, model_name, max_tokens=max_tokens, device=device, dtype=dtype)
        self.batch_size = batch_size
        cache = self.s.cache
        self.att = cache.attach(self.s.model, policy).__enter__() if attach and cache else None
        self.prefix = self.s.prefix_tier(DEFAULT_PREFIX_BYTES)
        self.memo = ResultMemo.load(cache.db) if memo and cache is not None else None
        self.unsaved = 0

    def __call__(self, batch: dict) -> dict:
        before = len(self.memo) if self.memo is not None else 0
        cols = predict_rows(
            self.s,
            [_decode(x) for x in batch["row"]],
            list(batch["idx"]),
            self.att,
            self.batch_size,
            self.prefix,
            self.memo,
        )
        if self.memo is not None:
            self.unsaved += len(self.memo) - before
            if self.unsaved >= MEMO_SAVE_EVERY and self.memo.save(self.s.cache.db, lock_wait_s=0.0):
                self.unsaved = 0
        return cols


def predict_rows(
    s, rows: list, idx: list[int], attached, batch_size: int, prefix=None, memo=None
) -> dict:
    """Per row: index, prediction or embedding, scores, cache hit, and ``error`` (empty, or why
    the row could not be planned: too long, an empty choice; such a row gets no prediction and
    never fails the job)."""
    from .tasks import RunOptions, Tiers, choice_scores, plan_rows, run

    plan = plan_rows(rows, s.tokenizer, s.causal, s.max_len)
    if attached is not None and attached.inert:
        attached = None
    out = run(
        s.model,
        s.tokenizer,
        plan,
        RunOptions(batch_size=batch_size, progress=False),
        tiers=Tiers(attached=attached, prefix=prefix, memo=memo),
    )
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
        if r.kind in ("choice1", "choiceN"):
            sc = choice_scores(r, out)
            cols["prediction"].append(int(np.argmax(sc)))
            cols["scores"].append([float(x) for x in sc])
            cols["embedding"].append([])
        elif r.kind == "text":
            cols["prediction"].append(int(out.argmax[r.seqs[0]]))
            cols["scores"].append([])
            cols["embedding"].append([])
        else:
            cols["prediction"].append(-1)
            cols["scores"].append([])
            cols["embedding"].append(
                [float(x) for x in np.concatenate([out.embeddings[q] for q in r.seqs])]
            )
    return cols


def run_batch(
    db: str | None,
    data: str,
    out: str,
    address: str | None = None,
    actors: int = 2,
    batch_size: int = 16,
    model_name: str | None = None,
    policy: str | None = None,
    limit: int | None = None,
    max_tokens: int | None = None,
    attach: bool = True,
    progress: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    memo: bool = True,
) -> dict:
    """DATA through an actor pool, each with the DB attached (or, ``db`` None, ``model_name`` with
    the exact tiers); rows written in input order to OUT."""
    try:
        import ray
    except ImportError:
        raise UserError("the batch job needs Ray: pip install 'attncache[ray]'") from None
    from .cache import AttnCache

    out_path = Path(out)
    if out_path.suffix not in (".jsonl", ".parquet"):
        raise UserError(f"--out must end in .jsonl or .parquet, got '{out}'")
    if actors < 1 or batch_size < 1:
        raise UserError("--actors and --batch-size must be >= 1")
    if db is not None:
        causal = AttnCache.open(db).adapter.causal  # fail fast on a bad DB, before starting Ray
    elif model_name is not None:
        causal = models.kind_of(model_name) == "decoder"  # every name eval takes (GGUF too)
    else:
        raise UserError("which model? pass --db DB or --model MODEL")
    ds_rows = data_mod.load(data, encoder=not causal, limit=limit).rows
    if not ds_rows:
        raise UserError(f"{data}: no usable rows")
    items = [{"idx": i, "row": _encode(r)} for i, r in enumerate(ds_rows)]
    started = False
    if not ray.is_initialized():
        ray.init(
            address=address,
            num_cpus=None if address else max(1, actors),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ds = ray.data.from_items(items)
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={
                "db": str(Path(db).resolve()) if db is not None else None,
                "model_name": model_name,
                "policy": policy,
                "batch_size": batch_size,
                "max_tokens": max_tokens,
                "attach": attach,
                "device": device,
                "dtype": dtype,
                "memo": memo,
            },
            batch_size=batch_size,
            concurrency=actors,
            num_cpus=1,
            batch_format="numpy",
        )
        rows = sorted(ds.take_all(), key=lambda r: int(r["idx"]))
    finally:
        if started:
            ray.shutdown()
    clean = [
        {
            "idx": int(r["idx"]),
            "prediction": int(r["prediction"]),
            "scores": [float(x) for x in r["scores"]],
            "embedding": [float(x) for x in r["embedding"]],
            "cache_hit": bool(r["cache_hit"]),
            "error": str(r["error"]),
        }
        for r in rows
    ]
    errors = [r for r in clean if r["error"]]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".jsonl":
        with open(out_path, "w") as f:
            for r in clean:
                f.write(json.dumps(r) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(clean), out_path)
    return {
        "rows": len(clean),
        "errors": len(errors),
        # one line: how many rows could not run, and the first of them
        "errors_summary": (
            f"{len(errors)} of {len(clean)} rows not run; first: row {errors[0]['idx']}: "
            f"{errors[0]['error']}"
            if errors
            else ""
        ),
        "hit_rate": float(np.mean([r["cache_hit"] for r in clean])),
        "out": str(out_path),
        "actors": actors,
        "device": models.resolve_device(device),
        "dtype": dtype,
    }
