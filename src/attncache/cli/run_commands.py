"""Commands that run a workload: eval (and its sweep) and bench."""

from __future__ import annotations

import argparse
import json

from .options import (
    NON_NEGATIVE,
    POLICY_GRAMMAR,
    POSITIVE,
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


def sizes_list(text: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,8,32, got '{text}'") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError("batch sizes must be >= 1")
    return out


def margin(text: str) -> str:
    """--verify-margin: off, auto or a threshold >= 0."""
    from ..workflows.cheap import valid_margin

    if valid_margin(text):
        return text
    raise argparse.ArgumentTypeError(f"expected off, auto or a number >= 0, got '{text}'")


def run_eval(a) -> int:
    from ..workflows import CalibrationData, EvalOptions, SessionOptions, evaluate, sweep
    from ..workflows.cheap import VerifyOptions

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
                "prefix_dir",
            ],
            "with --sweep (it mixes every threshold from one pass per policy)",
        )
        session = SessionOptions(device=a.device, dtype=a.dtype, max_tokens=a.max_tokens)
        src = CalibrationData(db_of(a), a.data, a.limit, a.model, session)
        res = sweep(src, a.policy or ["all", "default"], a.batch_size, progress).as_dict()
        if a.plot:
            from ..plots import plot_sweep

            plot_sweep(res["points"], a.plot, title=f"{a.data}: reuse vs fidelity")
        print(json.dumps(res) if a.json else rows_table(res["points"], SWEEP_KEYS))
        return 0
    refuse(a, ["plot"], "without --sweep")
    if a.verify_margin == "off":
        refuse(
            a,
            ["cheap_dtype", "max_loss", "verify_rows", "verify_confidence"],
            "without --verify-margin",
        )
    elif a.verify_margin != "auto":
        refuse(
            a,
            ["max_loss", "verify_rows", "verify_confidence"],
            "with a given --verify-margin (they calibrate 'auto')",
        )
    if not a.learn:
        refuse(a, ["max_bytes", "eviction"], "without --learn (they bound what learning inserts)")
    db = db_or_model(a)
    session = SessionOptions(
        device=a.device,
        dtype=a.dtype,
        quantize=a.quantize,
        max_tokens=a.max_tokens,
        max_bytes=a.max_bytes,
        eviction=a.eviction,
    )
    verify = VerifyOptions(  # flags not given keep VerifyOptions' defaults
        **{
            k: v
            for k, v in {
                "margin": a.verify_margin,
                "dtype": a.cheap_dtype,
                "max_loss": a.max_loss,
                "calibrate_rows": a.verify_rows,
                "confidence": a.verify_confidence,
            }.items()
            if v is not None
        }
    )
    options = EvalOptions(
        model_name=a.model,
        session=session,
        policies=a.policy or (["default"] if db else None),
        threshold=a.threshold,
        limit=a.limit,
        batch_size=a.batch_size,
        progress=progress,
        strict=a.strict,
        prefix_bytes=prefix_bytes(a),
        prefix_dir=a.prefix_dir,
        memo=not a.no_memo,
        learn=a.learn,
        device_map_bytes=a.device_map_bytes,
        verify=verify,
    )
    results = evaluate(db, a.data, options)
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
        bound=not a.no_bound,
        quantize=a.quantize,
        pass_repeats=a.pass_repeats,
        max_tokens=a.max_tokens,
        device=a.device,
        dtype=a.dtype,
        prefix_dir=a.prefix_dir,
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


def register(sub, formatter) -> None:
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
    sp.add_argument(
        "--batch-size",
        type=POSITIVE,
        default=8,
        help="inputs per forward (default 8); with shared prefixes, a batch holds the inputs "
        "whose new tokens make as many as 8 average inputs have (at most 4x as many inputs)",
    )
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
        "--prefix-dir",
        help="start the exact tiers from what an earlier run kept here, and keep the shared "
        "prompts' K/V (and, without a DB, the memo) here for the next run",
    )
    sp.add_argument(
        "--no-memo",
        action="store_true",
        help="do not answer inputs seen in earlier runs from the DB's result memo",
    )
    add_verify(sp)
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
        "--no-bound",
        action="store_true",
        help="skip the workload pass with every hit's maps in RAM and no lookup (its bound)",
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
    sp.add_argument(
        "--prefix-dir",
        help="start every attncache pass from the prefix K/V an earlier run kept here "
        "(eval --prefix-dir); the baseline is unchanged",
    )
    sp.set_defaults(fn=run_bench)


def add_verify(sp) -> None:
    """The cheap pass's flags (eval). Their defaults are None so a refusal can tell them apart
    from flags the user gave; ``run_eval`` fills them in."""
    sp.add_argument(
        "--verify-margin",
        type=margin,
        default="off",
        help="off (default), auto or X: run the exact tiers in --cheap-dtype and rerun in the "
        "model's precision every row whose margin (best minus runner-up score) is under X; "
        "auto calibrates X on the job's first --verify-rows rows to a --max-loss bound on "
        "changed answers, and runs cheap only where the device has --cheap-dtype natively",
    )
    sp.add_argument(
        "--cheap-dtype",
        choices=["bfloat16", "float16", "bfloat16-linears", "float16-linears"],
        help="the cheap precision: the whole model, or with -linears only its linear layers "
        "(float32 residual stream, norms, attention and logits: fewer rows rerun); default "
        "bfloat16, and with auto bfloat16-linears where the whole cast would rerun many rows "
        "and not pay",
    )
    sp.add_argument("--max-loss", type=UNIT_OPEN, help="auto: bound on changed answers (0.02)")
    sp.add_argument("--verify-rows", type=POSITIVE, help="auto: rows that calibrate (300)")
    sp.add_argument(
        "--verify-confidence", type=UNIT_OPEN, help="auto: the bound's confidence (0.95)"
    )
