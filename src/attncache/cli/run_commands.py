"""Commands that run the model: build, eval (and its sweep), bench, calibrate, templates."""

from __future__ import annotations

import argparse
import json

from ..errors import UserError
from .options import (
    NON_NEGATIVE,
    POLICY_GRAMMAR,
    POSITIVE,
    UNIT_HALF_OPEN,
    UNIT_OPEN,
    add_data,
    add_db,
    add_device_maps,
    add_model,
    add_output,
    add_prefix,
    db_of,
    db_or_model,
    number,
    prefix_bytes,
    refuse,
    size,
)
from .output import emit, rows_table, table

EVAL_KEYS = [
    "policy",
    "n",
    "n_sequences",
    "accuracy_baseline",
    "accuracy_cached",
    "agreement",
    "cosine_to_exact_mean",
    "cosine_to_exact_min",
    "pair_auc_exact",
    "pair_auc_cached",
    "hit_rate",
    "reuse_fraction",
    "prefix_tokens_reused_fraction",
    "threshold",
    "lookup_ms_per_item",
    "seconds_exact",
    "seconds_cached",
    "workload_speedup_rough",
    "device",
    "dtype",
]
SWEEP_KEYS = [
    "policy",
    "threshold",
    "hit_rate",
    "reuse_fraction",
    "template_fraction",
    "attention_work_saved",
    "accuracy_cached",
    "accuracy_loss",
    "agreement",
    "disagreement_upper95",
    "cosine_to_exact_mean",
    "cosine_to_exact_min",
]


def store_layers(text: str):
    if text in ("all", "auto"):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(
            f"--store-layers: expected 'all', 'auto' or layers like '17,20', got '{text}'"
        ) from None


def sizes_list(text: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,8,32, got '{text}'") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError("batch sizes must be >= 1")
    return out


def run_build(a) -> int:
    from ..build import BuildConfig
    from ..workflows import build

    if a.sparse_eps is not None and a.compression != "sparse":
        raise UserError("--sparse-eps has no effect without --compression sparse")
    layers = store_layers(a.store_layers)
    cfg = BuildConfig(
        codec=a.compression,
        sparse_eps=a.sparse_eps,
        batch_size=a.batch_size,
        max_bytes=a.max_bytes,
        eviction=a.eviction,
        store_layers="auto" if layers == "auto" else "all",
        layers=layers if isinstance(layers, list) else None,
    )
    cache = build(
        a.model,
        a.data,
        a.out,
        a.limit,
        cfg,
        progress=not a.quiet,
        force=a.force,
        strict=a.strict,
        max_tokens=a.max_tokens,
        device=a.device,
        dtype=a.dtype,
        calibrate_share=0.0 if a.no_calibrate else a.calibrate_share,
        max_loss=a.max_loss,
    )
    info = cache.info()
    if a.json:
        print(json.dumps(info.as_dict()))
    else:
        print(
            f"built {a.out}: {info.entries} entries, "
            f"{info.bytes_on_disk / 2**20:.1f} MiB ({info.compression}); "
            f"default: {info.default_reuse}"
        )
    return 0


def run_eval(a) -> int:
    from ..workflows import evaluate, sweep

    progress = not a.quiet and not a.json
    if a.sweep:
        refuse(
            a,
            [
                "threshold",
                "strict",
                "quantize",
                "learn",
                "max_bytes",
                "eviction",
                "no_prefix_cache",
                "prefix_bytes",
            ],
            "with --sweep (it mixes every threshold from one pass per policy)",
        )
        res = sweep(
            db_of(a),
            a.data,
            a.policy or ["all", "default"],
            a.limit,
            a.batch_size,
            progress=progress,
            model_name=a.model,
            max_tokens=a.max_tokens,
            device=a.device,
            dtype=a.dtype,
        ).as_dict()
        if a.plot:
            from ..plots import plot_sweep

            plot_sweep(res["points"], a.plot, title=f"{a.data}: reuse vs fidelity")
        print(json.dumps(res) if a.json else rows_table(res["points"], SWEEP_KEYS))
        return 0
    refuse(a, ["plot"], "without --sweep")
    if not a.learn:
        refuse(a, ["max_bytes", "eviction"], "without --learn (they bound what learning inserts)")
    db = db_or_model(a)
    results = evaluate(
        db,
        a.data,
        a.policy or (["default"] if db else None),
        a.threshold,
        a.limit,
        a.batch_size,
        progress=progress,
        model_name=a.model,
        strict=a.strict,
        prefix_bytes=prefix_bytes(a),
        quantize=a.quantize,
        max_tokens=a.max_tokens,
        learn=a.learn,
        max_bytes=a.max_bytes,
        eviction=a.eviction,
        device=a.device,
        dtype=a.dtype,
        memo=not a.no_memo,
        device_map_bytes=a.device_map_bytes,
    )
    rows = [r.as_dict() for r in results]
    if a.json:
        print(json.dumps(rows[0] if len(rows) == 1 else {"results": rows}))
    else:
        print(table(rows, EVAL_KEYS))
    return 0


def run_bench(a) -> int:
    from ..bench import BenchConfig, bench

    cfg = BenchConfig(
        repeats=a.repeats,
        warmup=a.warmup,
        threads=a.threads,
        eager=not a.no_eager,
        prefix_bytes=prefix_bytes(a),
        batch_sizes=tuple(a.batch_sizes),
        per_item=not a.no_per_item,
        quantize=a.quantize,
        pass_repeats=a.pass_repeats,
        max_tokens=a.max_tokens,
        device=a.device,
        dtype=a.dtype,
    )
    db = db_or_model(a)
    if db is None:
        refuse(a, ["policy", "threshold", "plot"], "without a map DB (--db)")
    res = bench(
        db,
        a.data,
        a.policy or "default",
        a.limit,
        cfg,
        model_name=a.model,
        progress=not a.quiet and not a.json,
        threshold=a.threshold,
    )
    if a.plot:
        from ..plots import plot_bench

        plot_bench(res, a.plot)
    emit(res, a.json, [k for k in res if not isinstance(res[k], dict | list)])
    return 0


def run_calibrate(a) -> int:
    from ..workflows import calibrate

    if a.no_templates:
        refuse(a, ["rank_share", "max_template_share"], "with --no-templates")
    res = calibrate(
        db_of(a),
        a.data,
        a.max_loss,
        a.limit,
        a.batch_size,
        a.confidence,
        progress=not a.quiet and not a.json,
        model_name=a.model,
        write=not a.dry_run,
        max_tokens=a.max_tokens,
        templates=not a.no_templates,
        rank_share=a.rank_share or 0.25,
        max_template_share=a.max_template_share or 0.6,
        device=a.device,
        dtype=a.dtype,
        max_minutes=a.max_minutes,
        exhaustive=a.exhaustive,
    ).as_dict()
    emit(res, a.json, [k for k in res if k != "candidates"])
    if not a.json:
        print("written to the DB" if not a.dry_run else "dry run: the DB is unchanged")
    return 0


def run_templates(a) -> int:
    from ..workflows import templates_only

    res = templates_only(
        db_of(a),
        a.data,
        a.max_share,
        a.limit,
        a.batch_size,
        progress=not a.quiet and not a.json,
        model_name=a.model,
        max_tokens=a.max_tokens,
        rounds=a.rank_rounds,
        device=a.device,
        dtype=a.dtype,
    ).as_dict()
    emit(res, a.json)
    return 0


def register(sub, formatter) -> None:
    sp = sub.add_parser("build", help="record attention maps of DATA and build a cache DB")
    add_model(sp, default="smollm2-135m")
    add_data(sp)
    add_output(sp)
    sp.add_argument("--out", required=True, help="DB folder to create")
    sp.add_argument(
        "--compression",
        default="auto",
        choices=["auto", "float16", "int8", "sparse", "float32"],
        help="how maps are stored: auto (default) = float16, read with no decoding, so a hit is "
        "never slower than its miss; int8 = < 1/8 of fp32 bytes, decoding costs time",
    )
    sp.add_argument(
        "--sparse-eps",
        type=number(float, 0.0, 1.0, hi_open=True),
        help="with --compression sparse: share of each row's mass that may be dropped (0.02)",
    )
    sp.add_argument(
        "--store-layers",
        default="all",
        help="'all' (default), 'auto' (only the layers the "
        "default policy reuses, chosen on a probe of 64 inputs), or layers like '17,20,23'",
    )
    sp.add_argument(
        "--max-bytes",
        type=size,
        help="cap on the stored maps, e.g. 2G; inserts evict to stay within",
    )
    sp.add_argument(
        "--eviction", default="lru", choices=["lru", "lfu"], help="what an insert evicts (lru)"
    )
    sp.add_argument("--batch-size", type=POSITIVE, default=8)
    sp.add_argument("--force", action="store_true", help="replace an existing DB at --out")
    sp.add_argument(
        "--calibrate-share",
        type=UNIT_OPEN,
        default=0.35,
        help="share of DATA's rows held out of the DB to calibrate its default (0.35; decoders, "
        "when it gives 150+ rows)",
    )
    sp.add_argument(
        "--max-loss",
        type=UNIT_OPEN,
        default=0.02,
        help="bound on the default's share of changed answers, 95 %% confidence (0.02)",
    )
    sp.add_argument(
        "--no-calibrate",
        action="store_true",
        help="keep the uncalibrated default (the most stable sixth of the layers, no bound)",
    )
    sp.set_defaults(fn=run_build)

    sp = sub.add_parser(
        "eval",
        help="exact vs cached predictions on DATA",
        epilog=POLICY_GRAMMAR,
        formatter_class=formatter,
    )
    add_db(sp)
    add_data(sp)
    add_output(sp)
    add_model(sp)
    sp.add_argument(
        "--policy", action="append", help="reuse policy (below); repeat to compare several"
    )
    sp.add_argument(
        "--threshold", type=number(float, 0.0), help="max predicted distance for a hit (the DB's)"
    )
    sp.add_argument("--batch-size", type=POSITIVE, default=8)
    sp.add_argument(
        "--sweep",
        action="store_true",
        help="Pareto sweep: reuse vs accuracy loss / agreement over "
        "thresholds, per --policy (default: all and default); map reuse only",
    )
    sp.add_argument("--plot", help="with --sweep: write the curves to this PNG")
    sp.add_argument(
        "--quantize",
        choices=["int8"],
        help="dynamic int8 quantization of the model's linears (CPU)",
    )
    sp.add_argument(
        "--learn", action="store_true", help="insert inputs that miss into the DB (one writer)"
    )
    sp.add_argument("--max-bytes", type=size, help="with --learn: cap on the stored maps (evicts)")
    sp.add_argument(
        "--eviction", choices=["lru", "lfu"], help="with --learn: eviction order (the DB's)"
    )
    add_device_maps(sp)
    add_prefix(sp)
    sp.add_argument(
        "--no-memo",
        action="store_true",
        help="do not answer inputs seen in earlier runs from the DB's result memo",
    )
    sp.set_defaults(fn=run_eval)

    sp = sub.add_parser(
        "bench",
        help="the workload against plain SDPA at its best batch size; per-item map reuse timing",
        epilog=POLICY_GRAMMAR,
        formatter_class=formatter,
    )
    add_db(sp)
    add_data(sp)
    add_output(sp)
    add_model(sp)
    sp.add_argument("--policy", help="reuse policy (below; default: the DB's, as in eval)")
    sp.add_argument("--threshold", type=number(float, 0.0))
    sp.add_argument(
        "--repeats", type=POSITIVE, default=5, help="timed runs per item and variant (median)"
    )
    sp.add_argument("--warmup", type=NON_NEGATIVE, default=1)
    sp.add_argument("--threads", type=POSITIVE, help="torch threads (default: all cores)")
    sp.add_argument("--no-eager", action="store_true", help="skip the eager-attention baseline")
    sp.add_argument("--plot", help="write a PNG of per-item speedups")
    sp.add_argument(
        "--batch-sizes",
        type=sizes_list,
        default=[1, 4, 8, 16, 32],
        help="batch sizes tried for plain SDPA and for attncache; each at its best (1,4,8,16,32)",
    )
    sp.add_argument(
        "--no-per-item", action="store_true", help="skip the per-item (batch 1) map reuse timing"
    )
    sp.add_argument(
        "--pass-repeats", type=POSITIVE, default=3, help="whole-workload passes per variant (3)"
    )
    sp.add_argument(
        "--quantize",
        choices=["int8"],
        help="dynamic int8 quantization of the model's linears (CPU)",
    )
    add_prefix(sp)
    sp.set_defaults(fn=run_bench)

    sp = sub.add_parser(
        "calibrate", help="store the setting that reuses most within an accuracy-loss bound"
    )
    add_db(sp)
    add_data(sp)
    add_output(sp)
    add_model(sp)
    sp.add_argument(
        "--max-loss",
        type=UNIT_OPEN,
        required=True,
        help="bound on the share of changed predictions (hence on accuracy loss), e.g. 0.01",
    )
    sp.add_argument(
        "--confidence",
        type=UNIT_OPEN,
        default=0.95,
        help="one-sided confidence of the bound (0.95)",
    )
    sp.add_argument("--batch-size", type=POSITIVE, default=8)
    sp.add_argument(
        "--dry-run", action="store_true", help="report the setting without writing it to the DB"
    )
    sp.add_argument(
        "--no-templates",
        action="store_true",
        help="do not try template heads (one stored mean map per head, served with no lookup)",
    )
    sp.add_argument(
        "--rank-share",
        type=UNIT_OPEN,
        help="share of DATA's rows that only ranks heads for "
        "templates (default 0.25; the bound is measured on the rest)",
    )
    sp.add_argument(
        "--max-template-share",
        type=UNIT_HALF_OPEN,
        help="most (layer, head) maps that may get templates (default 0.6)",
    )
    sp.add_argument(
        "--max-minutes",
        type=number(float, 0.0, lo_open=True),
        help="stop searching after this long and store the best setting found (labelled as such)",
    )
    sp.add_argument(
        "--exhaustive",
        action="store_true",
        help="run every candidate to the end instead of skipping those that cannot win (slow)",
    )
    sp.set_defaults(fn=run_calibrate)

    sp = sub.add_parser(
        "templates",
        help="store template maps for the heads whose mean map changes answers "
        "least (use them with --policy fixed:N; calibrate chooses N itself)",
    )
    add_db(sp)
    add_data(sp)
    add_output(sp)
    add_model(sp)
    sp.add_argument(
        "--max-share", type=UNIT_HALF_OPEN, default=0.6, help="share of all maps to keep (0.6)"
    )
    sp.add_argument(
        "--rank-rounds",
        type=POSITIVE,
        default=1,
        help="rank heads in N chunks, each with the earlier chunks' templates in place (1)",
    )
    sp.add_argument("--batch-size", type=POSITIVE, default=8)
    sp.set_defaults(fn=run_templates)
