"""Commands that write a DB's contents from data: build, calibrate, templates."""

from __future__ import annotations

import json

from ..errors import UserError
from .options import (
    POSITIVE,
    UNIT_HALF_OPEN,
    UNIT_OPEN,
    add_data,
    add_db,
    add_model,
    add_output,
    db_of,
    number,
    refuse,
    size,
)
from .output import emit


def store_layers(text: str):
    if text in ("all", "auto"):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(
            f"--store-layers: expected 'all', 'auto' or layers like '17,20', got '{text}'"
        ) from None


def run_build(a) -> int:
    from ..build import BuildConfig
    from ..workflows import BuildOptions, build

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
    opts = BuildOptions(
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
    cache = build(a.model, a.data, a.out, opts)
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


def calibration_data(a):
    from ..workflows import CalibrationData, SessionOptions

    session = SessionOptions(device=a.device, dtype=a.dtype, max_tokens=a.max_tokens)
    return CalibrationData(db_of(a), a.data, a.limit, a.model, session)


def run_calibrate(a) -> int:
    from ..workflows import CalibrationOptions, calibrate

    if a.no_templates:
        refuse(a, ["rank_share", "max_template_share"], "with --no-templates")
    opts = CalibrationOptions(
        a.max_loss,
        a.confidence,
        a.batch_size,
        progress=not a.quiet and not a.json,
        write=not a.dry_run,
        templates=not a.no_templates,
        rank_share=a.rank_share or 0.25,
        max_template_share=a.max_template_share or 0.6,
        max_minutes=a.max_minutes,
        exhaustive=a.exhaustive,
    )
    res = calibrate(calibration_data(a), opts).as_dict()
    emit(res, a.json, [k for k in res if k != "candidates"])
    if not a.json:
        print("written to the DB" if not a.dry_run else "dry run: the DB is unchanged")
    return 0


def run_templates(a) -> int:
    from ..workflows import templates_only

    progress = not a.quiet and not a.json
    res = templates_only(
        calibration_data(a), a.max_share, a.rank_rounds, a.batch_size, progress
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
        "when the share can bound --max-loss: 298+ rows at 0.02, 118+ at 0.05)",
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
        "templates (default 0.25; half of the rest choose the setting, the other half bound it)",
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
