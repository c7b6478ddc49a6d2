"""Commands on a DB folder alone: inspect, verify, retrain, compress, migrate."""

from __future__ import annotations

from ..errors import UserError
from .options import add_db, add_output, db_of, number
from .output import emit


def run_inspect(a) -> int:
    from ..cache import AttnCache

    emit(AttnCache.open(db_of(a)).info().as_dict(), a.json)
    return 0


def run_verify(a) -> int:
    from ..cache import AttnCache

    db = db_of(a)
    problems = AttnCache.verify(db)
    if problems:
        raise UserError(f"{db}: {len(problems)} problem(s): " + "; ".join(problems))
    print(f"{db}: ok (all data files match their checksums)")
    return 0


def run_migrate(a) -> int:
    from ..cache import AttnCache

    db = db_of(a)
    changed = AttnCache.migrate(db)
    print(
        f"{db}: migrated to the current format"
        if changed
        else f"{db}: already in the current format"
    )
    return 0


def run_compress(a) -> int:
    from ..cache import AttnCache

    if a.sparse_eps is not None and a.to != "sparse":
        raise UserError("--sparse-eps has no effect without --to sparse")
    info = (
        AttnCache.open(db_of(a))
        .compress(a.out, a.to, a.sparse_eps, progress=not a.quiet, force=a.force)
        .info()
    )
    print(
        f"wrote {a.out}: {info.entries} entries, {info.map_bytes / 2**20:.1f} MiB of maps "
        f"({info.map_bytes_vs_fp32:.3f} of fp32)"
    )
    return 0


def run_retrain(a) -> int:
    from ..cache import AttnCache

    emit(AttnCache.open(db_of(a)).retrain(progress=not a.quiet and not a.json), a.json)
    return 0


def register(sub) -> None:
    sp = sub.add_parser(
        "inspect", help="describe a cache DB: sizes, codec, cap, settings, most used entries"
    )
    add_db(sp, positional=True)
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(fn=run_inspect)

    sp = sub.add_parser("verify", help="check every data file of a cache DB against its checksum")
    add_db(sp, positional=True)
    sp.set_defaults(fn=run_verify)

    sp = sub.add_parser(
        "retrain", help="refit the projector on every stored entry and re-index (after --learn)"
    )
    add_db(sp, positional=True)
    add_output(sp)
    sp.set_defaults(fn=run_retrain)

    sp = sub.add_parser(
        "compress", help="copy a DB with its maps re-encoded (same entries, projector, index)"
    )
    add_db(sp, positional=True)
    sp.add_argument("--to", required=True, choices=["float16", "int8", "sparse", "float32"])
    sp.add_argument(
        "--sparse-eps",
        type=number(float, 0.0, 1.0, hi_open=True),
        help="with --to sparse: share of each row's mass that may be dropped (default 0.02)",
    )
    sp.add_argument("--out", required=True, help="the new DB folder")
    sp.add_argument("--force", action="store_true", help="replace an existing DB at --out")
    add_output(sp, json_flag=False)
    sp.set_defaults(fn=run_compress)

    sp = sub.add_parser("migrate", help="convert an older cache DB to the current format in place")
    add_db(sp, positional=True)
    sp.set_defaults(fn=run_migrate)
