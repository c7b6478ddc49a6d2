"""Long-running and scale-out commands: serve (HTTP) and batch (Ray Data)."""

from __future__ import annotations

from ..errors import UserError
from .options import (
    NON_NEGATIVE,
    POLICY_GRAMMAR,
    POSITIVE,
    add_data,
    add_db,
    add_device_maps,
    add_model,
    add_output,
    add_prefix,
    db_or_model,
    number,
    prefix_bytes,
    refuse,
    size,
)
from .output import emit


def run_serve(a) -> int:
    from ..serve import ServeConfig, serve
    from ..serve.config import Limits
    from ..workflows import SessionOptions

    if not a.learn:
        refuse(a, ["max_bytes"], "without --learn (it bounds what learning inserts)")
    if a.no_cache:
        refuse(a, ["policy", "learn"], "with --no-cache (no map cache is attached)")
    db = db_or_model(a)
    if db is None:
        refuse(a, ["policy", "learn", "no_cache"], "without a map DB (--db): the exact tiers only")
    cfg = ServeConfig(
        max_batch=a.max_batch,
        max_wait_ms=a.max_wait_ms,
        max_queue=a.max_queue,
        timeout_s=a.timeout_s,
        policy=a.policy,
        attach=not a.no_cache,
        learn=a.learn,
        prefix_bytes=prefix_bytes(a),
        memo=not a.no_memo,
        device_map_bytes=a.device_map_bytes,
        prefix_dir=a.prefix_dir,
        limits=Limits(
            a.max_client_batch_size, a.max_request_tokens, a.max_input_chars, a.max_body_bytes
        ),
    )
    opening = SessionOptions(max_bytes=a.max_bytes, device=a.device, dtype=a.dtype)
    serve(db, a.model, a.host, a.port, cfg, opening)
    return 0


def run_batch(a) -> int:
    from ..batch import BatchOptions
    from ..batch import run_batch as job

    if a.strict:
        raise UserError(
            "--strict has no effect in batch: a bad row gets an error column, never fails the job"
        )
    db = db_or_model(a)
    if db is None:
        refuse(a, ["no_memo"], "without a map DB (--db): the memo is kept in a DB")
    options = BatchOptions(
        address=a.address,
        actors=a.actors,
        batch_size=a.batch_size,
        policy=a.policy,
        limit=a.limit,
        max_tokens=a.max_tokens,
        progress=not a.quiet and not a.json,
        device=a.device,
        dtype=a.dtype,
        memo=not a.no_memo,
        prefix_bytes=prefix_bytes(a),
        max_restarts=a.max_restarts,
        parts=a.parts,
        columns=a.columns,
        fmt=a.format,
    )
    emit(job(db, a.data, a.out, model_name=a.model, options=options), a.json)
    return 0


def register(sub, formatter) -> None:
    from ..serve.config import Limits

    sp = sub.add_parser(
        "serve",
        help="HTTP service: /v1/embeddings, /v1/score, /v1/rerank, /v1/classify, /health, "
        "/metrics (--db DB, or --model M alone for the exact tiers)",
        epilog=POLICY_GRAMMAR,
        formatter_class=formatter,
    )
    add_db(sp)
    add_model(sp)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=number(int, 1, 65535), default=8000)
    sp.add_argument("--policy", help="reuse policy (below; default: the DB's)")
    sp.add_argument("--max-batch", type=POSITIVE, default=8, help="requests per model batch (8)")
    sp.add_argument(
        "--max-wait-ms",
        type=number(float, 0.0),
        default=5.0,
        help="how long a batch waits to fill (5)",
    )
    sp.add_argument(
        "--max-queue", type=POSITIVE, default=256, help="queued requests before 503 (256)"
    )
    sp.add_argument(
        "--timeout-s",
        type=number(float, 0.0, lo_open=True),
        default=30.0,
        help="per-request timeout, 504 after (30)",
    )
    sp.add_argument(
        "--no-cache",
        action="store_true",
        help="serve the plain model: no map reuse, nothing read from or written to the DB (a "
        "baseline for load tests)",
    )
    limits = Limits()
    for name, kind, what in (
        ("max_client_batch_size", POSITIVE, "strings in one request"),
        ("max_request_tokens", POSITIVE, "tokens one request runs"),
        ("max_input_chars", POSITIVE, "characters of one string"),
        ("max_body_bytes", size, "bytes of a request body"),
    ):
        default = getattr(limits, name)
        sp.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=default,
            help=f"{what}, 413 past it ({default})",
        )
    sp.add_argument(
        "--learn", action="store_true", help="insert inputs that miss (one writer per DB)"
    )
    sp.add_argument("--max-bytes", type=size, help="with --learn: cap on the stored maps")
    sp.add_argument(
        "--no-memo", action="store_true", help="do not answer inputs seen before from the memo"
    )
    add_device_maps(sp)
    sp.add_argument(
        "--prefix-dir",
        help="keep the prefix K/V tree (and, without a DB, the memo) here across restarts",
    )
    add_prefix(sp)
    sp.set_defaults(fn=run_serve)

    sp = sub.add_parser(
        "batch",
        help="offline batch job on Ray Data (an actor pool, each with the DB attached)",
        epilog=POLICY_GRAMMAR,
        formatter_class=formatter,
    )
    add_db(sp)
    add_data(sp)
    add_output(sp)
    add_model(sp)
    sp.add_argument(
        "--out",
        required=True,
        help="output folder: one part file per bucket of rows (rerun with the same --out resumes)",
    )
    sp.add_argument(
        "--format",
        choices=["jsonl", "parquet"],
        help="the parts' format (default: parquet for an --out ending in .parquet, else jsonl)",
    )
    sp.add_argument(
        "--columns", help="the file's column names for ours, e.g. prompt=question,choices=options"
    )
    sp.add_argument(
        "--parts", type=POSITIVE, default=64, help="part files the rows are hashed into (64)"
    )
    sp.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    sp.add_argument(
        "--actors", type=POSITIVE, help="actors (default: one per GPU with --device cuda, else 2)"
    )
    sp.add_argument("--batch-size", type=POSITIVE, default=16, help="inputs per forward (16)")
    sp.add_argument("--policy", help="reuse policy (below; default: the DB's)")
    sp.add_argument("--no-memo", action="store_true", help="neither read nor commit the memo")
    sp.add_argument(
        "--max-restarts",
        type=NON_NEGATIVE,
        default=2,
        help="restarts of a failed actor (its call retried) before the job fails (2)",
    )
    add_prefix(sp)
    sp.set_defaults(fn=run_batch)
