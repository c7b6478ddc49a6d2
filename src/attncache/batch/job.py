"""The batch job's driver: DATA through a Ray Data actor pool into a folder of parts, resumable,
and one commit of what the workers learned at the end.

The pipeline: reader tasks turn files into job rows (``reading.py``: file, index, parsed row or
error, group key, part), ``groupby(bucket).map_groups`` hands every row of a part to one actor
(``worker.py``), which runs them in prompt order, writes ``part-NNNNN.<fmt>`` atomically and
returns one summary row. The driver holds only those summaries (one per part) and the ledger's
totals, never rows or results. A rerun with the same OUT skips the parts already written, so a
killed job resumes and writes each row exactly once; the job's settings are kept in
``OUT/_job.json`` and a rerun with others is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import models
from ..errors import UserError
from ..tiers import DEFAULT_PREFIX_BYTES
from .ledger import Ledger, LedgerTotals
from .reading import ReadSpec, Source, driver_rows, find_source, parse_columns, read_file
from .worker import Worker, WorkerSpec

DEFAULT_ACTORS = 2  # on CPUs; with CUDA, one per GPU the cluster has
JOB_FILE = "_job.json"


@dataclass(frozen=True)
class BatchOptions:
    """How the job runs. ``actors`` None: one per GPU with ``device="cuda"``, else 2. ``parts``:
    how many part files the rows are hashed into (by prompt); ``max_restarts``: how often a failed
    actor is restarted (its part retried) before the job fails (Ray's own default: forever);
    ``prefix_bytes`` None: no prefix tier; ``columns``: "prompt=question,..."; ``fmt``: the parts'
    format, "jsonl" or "parquet"."""

    address: str | None = None
    actors: int | None = None
    batch_size: int = 16
    policy: str | None = None
    limit: int | None = None
    max_tokens: int | None = None
    attach: bool = True
    progress: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    memo: bool = True
    prefix_bytes: int | None = DEFAULT_PREFIX_BYTES
    max_restarts: int = 2
    parts: int = 64
    columns: str | None = None
    fmt: str | None = None  # None: parquet for an OUT ending in .parquet, else jsonl


def _check(options: BatchOptions) -> None:
    if options.fmt not in (None, "jsonl", "parquet"):
        raise UserError(f"--format must be jsonl or parquet, got '{options.fmt}'")
    if (options.actors is not None and options.actors < 1) or options.batch_size < 1:
        raise UserError("--actors and --batch-size must be >= 1")
    if options.max_restarts < 0 or options.parts < 1:
        raise UserError("--max-restarts must be >= 0 and --parts >= 1")


def _job_record(db: str | None, model_name: str | None, data: str, o: BatchOptions) -> dict:
    """What decides a part's content: a rerun into the same OUT must agree on all of it."""
    keep = ("policy", "limit", "max_tokens", "attach", "dtype", "parts", "columns", "fmt")
    return {"db": db, "model": model_name, "data": data, **{k: asdict(o)[k] for k in keep}}


def _open_folder(out: Path, record: dict) -> set[int]:
    """The parts already written by the same job (to skip), after checking it is the same job."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; the job writes a folder of parts")
    out.mkdir(parents=True, exist_ok=True)
    job = out / JOB_FILE
    if job.exists():
        before = json.loads(job.read_text())
        if before != record:
            diff = sorted(k for k in record if before.get(k) != record[k])
            raise UserError(
                f"--out '{out}' holds another job's parts (it differs in: {', '.join(diff)}); "
                "use a new folder, or the same settings to resume it"
            )
    else:
        job.write_text(json.dumps(record, indent=1))
    for tmp in out.glob(".part-*.tmp"):  # a killed job's half-written parts
        tmp.unlink(missing_ok=True)
    return {int(p.name[5:10]) for p in out.glob(f"part-*.{record['fmt']}")}


def _uses_gpus(ray, options: BatchOptions) -> bool:
    """Whether each actor asks for a GPU: ``cuda``, or ``auto`` on a cluster that has GPUs. Asked
    of the cluster, not of this process: the driver of a cluster job may have no GPU itself."""
    if options.device == "cuda":
        return True
    return options.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1


def _actors(ray, options: BatchOptions) -> int:
    if not _uses_gpus(ray, options):
        return options.actors or DEFAULT_ACTORS
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise UserError("--device cuda: the Ray cluster has no GPU")
    return options.actors or gpus


def _commit(db: str | None, totals: LedgerTotals) -> dict:
    """The workers' new memo answers and map usage, committed once under the DB's writer lock."""
    if db is None or (totals.memo is None and not totals.usage):
        return {"memo_answers_committed": 0, "committed": True}
    from ..cache import AttnCache
    from ..tiers.memo import ResultMemo

    cache = AttnCache.open(db)
    cache.db.usage.add(totals.usage)
    memo = ResultMemo.from_arrays(totals.memo) if totals.memo is not None else ResultMemo()
    memo.dirty = len(memo) > 0
    ok = memo.save(cache.db, lock_wait_s=30.0) and cache.save_usage(lock_wait_s=30.0)
    return {"memo_answers_committed": len(memo) if ok else 0, "committed": ok}


def _dataset(ray, source: Source, causal: bool, o: BatchOptions, done: set[int]):
    if not source.files:
        rows = driver_rows(source, not causal, o.limit, o.parts)
        rows = [r for r in rows if r["bucket"] not in done]
        return ray.data.from_items(rows) if rows else None
    tasks = [{"file": i, "path": p} for i, p in enumerate(source.files)]
    spec = ReadSpec(parse_columns(o.columns), o.parts, frozenset(done), o.limit)
    return ray.data.from_items(tasks).map_batches(
        read_file, fn_kwargs={"spec": spec}, batch_size=1, batch_format="numpy"
    )


def run_batch(
    db: str | None,
    data: str,
    out: str,
    model_name: str | None = None,
    options: BatchOptions | None = None,
) -> dict:
    """DATA through an actor pool, each with the DB attached (or, ``db`` None, ``model_name`` with
    the exact tiers), into the folder OUT (one part file per bucket of rows; ``OUT.parquet``: in
    Parquet unless ``options.fmt`` says otherwise)."""
    try:
        import ray
    except ImportError:
        raise UserError("the batch job needs Ray: pip install 'attncache[ray]'") from None
    from ..cache import AttnCache

    o = options or BatchOptions()
    _check(o)
    if o.fmt is None:
        o = replace(o, fmt="parquet" if Path(out).suffix == ".parquet" else "jsonl")
    parse_columns(o.columns)  # a bad mapping fails here, not in a Ray task
    if db is not None:
        causal = AttnCache.open(db).adapter.causal  # fail fast on a bad DB, before starting Ray
        db = str(Path(db).resolve())
    elif model_name is not None:
        causal = models.kind_of(model_name) == "decoder"  # every name eval takes (GGUF too)
    else:
        raise UserError("which model? pass --db DB or --model MODEL")
    source = find_source(data)
    folder = Path(out)
    done = _open_folder(folder, _job_record(db, model_name, data, o))
    started = False
    if not ray.is_initialized():
        local_cpus = (o.actors or DEFAULT_ACTORS) + 1  # the actors, and one for the readers
        ray.init(
            address=o.address,
            num_cpus=None if o.address else local_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        started = True
    summaries: list[dict] = []
    totals = LedgerTotals(None, {}, 0, 0, 0)
    try:
        actors, gpus = _actors(ray, o), _uses_gpus(ray, o)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = o.progress
        # a sort-based shuffle runs in tasks; the hash shuffle starts aggregator actors that wait
        # for the CPUs the model actors hold (measured: 30 s of a 4-row job)
        ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        ds = _dataset(ray, source, causal, o, done)
        if ds is not None:
            ledger = ray.remote(num_cpus=0)(Ledger).remote()
            spec = WorkerSpec(
                db,
                model_name,
                o.policy,
                o.batch_size,
                o.max_tokens,
                o.attach,
                o.device,
                o.dtype,
                o.memo,
                o.prefix_bytes,
                str(folder.resolve()),
                o.fmt,
            )
            # few shuffle partitions: a handful of parts per actor, not Ray's default 200
            groups = ds.groupby("bucket", num_partitions=min(o.parts, 4 * actors))
            summaries = groups.map_groups(
                Worker,
                fn_constructor_kwargs={"spec": spec, "ledger": ledger},
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=1,
                num_gpus=1 if gpus else 0,
                batch_format="numpy",
                max_restarts=o.max_restarts,
                max_task_retries=o.max_restarts,
            ).take_all()  # one small row per part
            totals = ray.get(ledger.totals.remote())
    finally:
        if started:
            ray.shutdown()
    committed = _commit(db, totals) if o.memo else {"memo_answers_committed": 0, "committed": True}
    return _summary(summaries, totals, committed, folder, len(done)) | {
        "actors": actors,
        "device": "cuda" if gpus else "cpu",
        "dtype": o.dtype,
    }


def _summary(parts: list[dict], totals: LedgerTotals, committed: dict, out: Path, skipped: int):
    rows = sum(int(p["rows"]) for p in parts)
    errors = sum(int(p["errors"]) for p in parts)
    first = next((str(p["first_error"]) for p in parts if p["first_error"]), "")
    return {
        "rows": rows,
        "errors": errors,
        # one line: how many rows could not run, and the first of them
        "errors_summary": f"{errors} of {rows} rows not run; first: {first}" if errors else "",
        "hit_rate": sum(int(p["hits"]) for p in parts) / rows if rows else 0.0,
        "prefix_tokens_reused_fraction": totals.prefix_tokens_reused_fraction,
        **committed,
        "out": str(out),
        "parts_written": len(parts),
        "parts_skipped": skipped,
    }
