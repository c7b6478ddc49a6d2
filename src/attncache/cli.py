"""Command line: a thin layer over the Python API (``attncache.workflows``, ``attncache.bench``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UserError

POLICY_HELP = "reuse policy: 'default' (stored in the DB), 'all' (the paper's mode), 'none', or layers like '17,20'"


def _table(rows: list[dict], keys: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
        if isinstance(v, list):
            return ",".join(map(str, v)) if len(v) <= 8 else f"{len(v)} layers"
        return "-" if v is None else str(v)

    cells = [[k] + [fmt(r.get(k)) for r in rows] for k in keys if any(k in r for r in rows)]
    w = [max(len(c[i]) for c in cells) for i in range(len(rows) + 1)]
    return "\n".join("  ".join(c[i].ljust(w[i]) for i in range(len(c))) for c in cells)


def cmd_build(a) -> int:
    from .cache import BuildConfig
    from .workflows import build

    cfg = BuildConfig(codec=a.compression, sparse_eps=a.sparse_eps, batch_size=a.batch_size, max_bytes=a.max_bytes,
                      eviction=a.eviction)
    if a.store_layers == "auto":
        cfg.store_layers = "auto"
    elif a.store_layers != "all":
        try:
            cfg.layers = [int(x) for x in a.store_layers.split(",")]
        except ValueError:
            raise UserError(f"--store-layers: expected 'all', 'auto' or layers like '17,20', got '{a.store_layers}'") from None
    cache = build(a.model, a.data, a.out, a.limit, cfg, progress=not a.quiet, force=a.force, strict=a.strict,
                  max_tokens=a.max_tokens)
    info = cache.info()
    if a.json:
        print(json.dumps(info))
    else:
        print(f"built {a.out}: {info['entries']} entries, {info['bytes_on_disk'] / 2**20:.1f} MiB ({info['compression']}), "
              f"threshold {info['threshold']:.4f}, default policy layers {info['policy_layers']}")
    return 0


EVAL_KEYS = ["policy", "n", "n_sequences", "accuracy_baseline", "accuracy_cached", "agreement",
             "cosine_to_exact_mean", "cosine_to_exact_min", "pair_auc_exact", "pair_auc_cached",
             "hit_rate", "reuse_fraction", "prefix_tokens_reused_fraction",
             "threshold", "lookup_ms_per_item", "seconds_exact", "seconds_cached",
             "workload_speedup_rough"]


SWEEP_KEYS = ["policy", "threshold", "hit_rate", "reuse_fraction", "template_fraction", "attention_work_saved",
              "accuracy_cached", "accuracy_loss", "agreement", "disagreement_upper95", "cosine_to_exact_mean",
              "cosine_to_exact_min"]


def cmd_eval(a) -> int:
    from .workflows import evaluate

    if a.sweep:
        from .calibrate import plot_sweep, sweep

        rows = sweep(a.db, a.data, a.policy or ["all", "default"], a.limit, a.batch_size,
                     progress=not a.quiet and not a.json, model_name=a.model, max_tokens=a.max_tokens)
        if a.plot:
            plot_sweep(rows, a.plot, title=f"{a.data}: reuse vs fidelity")
        if a.json:
            print(json.dumps({"points": rows}))
        else:
            keys = [k for k in SWEEP_KEYS if any(k in r for r in rows)]
            print("  ".join(f"{k:>12.12s}" for k in keys))
            for r in rows:
                print("  ".join(f"{r.get(k):>12.4f}" if isinstance(r.get(k), float) else f"{str(r.get(k)):>12.12s}"
                                for k in keys))
        return 0
    res = evaluate(a.db, a.data, a.policy or ["default"], a.threshold, a.limit, a.batch_size,
                   progress=not a.quiet and not a.json, model_name=a.model, strict=a.strict,
                   prefix_bytes=None if a.no_prefix_cache else a.prefix_bytes, quantize=a.quantize,
                   max_tokens=a.max_tokens, learn=a.learn, max_bytes=a.max_bytes, eviction=a.eviction)
    if a.json:
        print(json.dumps(res[0] if len(res) == 1 else {"results": res}))
    else:
        print(_table(res, EVAL_KEYS))
    return 0


def cmd_bench(a) -> int:
    from .bench import BenchConfig, bench

    cfg = BenchConfig(repeats=a.repeats, warmup=a.warmup, threads=a.threads, eager=not a.no_eager,
                      prefix_bytes=None if a.no_prefix_cache else a.prefix_bytes, batch_size=a.batch_size,
                      quantize=a.quantize, pass_repeats=a.pass_repeats, max_tokens=a.max_tokens)
    res = bench(a.db, a.data, a.policy, a.limit, cfg, model_name=a.model, progress=not a.quiet and not a.json,
                threshold=a.threshold)
    if a.plot:
        from .bench import plot

        plot(res, a.plot)
    if a.json:
        print(json.dumps(res))
    else:
        keys = [k for k in res if not isinstance(res[k], dict | list)]
        print(_table([res], keys))
    return 0


def cmd_calibrate(a) -> int:
    from .calibrate import calibrate

    res = calibrate(a.db, a.data, a.max_loss, a.limit, a.batch_size, a.confidence,
                    progress=not a.quiet and not a.json, model_name=a.model, write=not a.dry_run,
                    max_tokens=a.max_tokens, templates=not a.no_templates, rank_share=a.rank_share,
                    max_template_share=a.max_template_share)
    if a.json:
        print(json.dumps(res))
    else:
        print(_table([res], [k for k in res if k != "candidates"]))
        print("written to the DB" if not a.dry_run else "dry run: the DB is unchanged")
    return 0


def cmd_templates(a) -> int:
    from .calibrate import templates_only

    res = templates_only(a.db, a.data, a.max_share, a.limit, a.batch_size, progress=not a.quiet and not a.json,
                         model_name=a.model, max_tokens=a.max_tokens, rounds=a.rank_rounds)
    print(json.dumps(res) if a.json else _table([res], list(res)))
    return 0


def cmd_verify(a) -> int:
    from .cache import AttnCache

    problems = AttnCache.verify(a.db)
    if problems:
        raise UserError(f"{a.db}: {len(problems)} problem(s): " + "; ".join(problems))
    print(f"{a.db}: ok (all data files match their checksums)")
    return 0


def cmd_migrate(a) -> int:
    from .cache import AttnCache

    changed = AttnCache.migrate(a.db)
    print(f"{a.db}: migrated to the current format" if changed else f"{a.db}: already in the current format")
    return 0


def cmd_compress(a) -> int:
    from .cache import AttnCache

    c = AttnCache.open(a.db).compress(a.out, a.to, a.sparse_eps, progress=not a.quiet, force=a.force)
    info = c.info()
    print(f"wrote {a.out}: {info['entries']} entries, {info['map_bytes'] / 2**20:.1f} MiB of maps "
          f"({info['map_bytes_vs_fp32']:.3f} of fp32)")
    return 0


def cmd_retrain(a) -> int:
    from .cache import AttnCache

    res = AttnCache.open(a.db).retrain(progress=not a.quiet and not a.json)
    print(json.dumps(res) if a.json else _table([res], list(res)))
    return 0


def cmd_serve(a) -> int:
    from .serve import ServeConfig, serve

    cfg = ServeConfig(max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, max_queue=a.max_queue, timeout_s=a.timeout_s,
                      policy=a.policy, attach=not a.no_cache, learn=a.learn,
                      prefix_bytes=None if a.no_prefix_cache else a.prefix_bytes)
    for name in ("max_batch", "max_queue"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    serve(a.db, a.model, a.host, a.port, cfg, max_bytes=a.max_bytes)
    return 0


def cmd_batch(a) -> int:
    from .batch import run_batch

    res = run_batch(a.db, a.data, a.out, address=a.address, actors=a.actors, batch_size=a.batch_size,
                    model_name=a.model, policy=a.policy, limit=a.limit, max_tokens=a.max_tokens,
                    progress=not a.quiet and not a.json)
    print(json.dumps(res) if a.json else _table([res], list(res)))
    return 0


def cmd_inspect(a) -> int:
    from .cache import AttnCache

    info = AttnCache.open(a.db).info()
    if a.json:
        print(json.dumps(info))
    else:
        print(_table([info], list(info)))
    return 0


def _bytes(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    try:
        n = float(s[:-1]) * units[s[-1].lower()] if s and s[-1].lower() in units else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 2G, got '{s}'") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return int(n)


def prefix_args(sp) -> None:
    from .prefix import DEFAULT_PREFIX_BYTES

    sp.add_argument("--no-prefix-cache", action="store_true", help="switch off the exact prefix K/V tier (decoders)")
    sp.add_argument("--prefix-bytes", type=_bytes, default=DEFAULT_PREFIX_BYTES,
                    help="memory cap of the prefix K/V tier, e.g. 512M (default 2G); LRU eviction")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attncache", description="Reuse attention maps to speed up prefill-only inference.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, db=True):
        if db:
            sp.add_argument("--db", required=True, help="cache DB folder")
        sp.add_argument("--data", required=True, help="built-in name (sst2, piqa, rte, mmlu, mmlu:Kshot) or a "
                        ".jsonl path; may end in a slice like [0:400]")
        sp.add_argument("--limit", type=int, help="use only the first N rows")
        sp.add_argument("--max-tokens", type=int, help="skip (and report) rows whose model input is longer than N tokens")
        sp.add_argument("--strict", action="store_true", help="stop at the first bad data row instead of skipping it")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--json", action="store_true", help="print one JSON object")

    b = sub.add_parser("build", help="record attention maps of DATA and build a cache DB")
    b.add_argument("--model", default="smollm2-135m", help="built-in name (smollm2-135m, minilm-l6), HF folder or .gguf")
    common(b, db=False)
    b.add_argument("--out", required=True, help="DB folder to create")
    b.add_argument("--compression", default="auto", choices=["auto", "float16", "int8", "sparse", "float32"],
                   help="how maps are stored: auto (default) = int8 for decoders (< 1/8 of fp32 bytes), float16 for "
                   "encoders; float16 = no decode cost when many layers are reused")
    b.add_argument("--sparse-eps", type=float, help="sparse: share of each row's mass that may be dropped (default 0.02)")
    b.add_argument("--store-layers", default="all",
                   help="'all' (default), 'auto' (only the layers the default policy reuses, chosen on a probe of "
                   "64 inputs), or layers like '17,20,23'")
    b.add_argument("--max-bytes", type=_bytes, help="cap on the stored maps, e.g. 2G; later inserts evict to stay within it")
    b.add_argument("--eviction", default="lru", choices=["lru", "lfu"], help="which entries an insert evicts (default lru)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--force", action="store_true", help="replace an existing DB at --out")
    b.set_defaults(fn=cmd_build)

    e = sub.add_parser("eval", help="exact vs cached predictions on DATA")
    common(e)
    e.add_argument("--policy", action="append", help=POLICY_HELP + "; repeat to compare several")
    e.add_argument("--threshold", type=float, help="max predicted distance for a hit (default: the DB's)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--model", help="load this model instead of the one named in the DB (must be identical)")
    e.add_argument("--sweep", action="store_true",
                   help="Pareto sweep: reuse fraction vs accuracy loss / agreement over thresholds, per --policy "
                   "(default: all and default); map reuse only")
    e.add_argument("--plot", help="with --sweep: write the curves to this PNG")
    e.add_argument("--quantize", choices=["int8"], help="dynamic int8 quantization of the model's linears (CPU)")
    e.add_argument("--learn", action="store_true", help="insert inputs that miss into the DB (online; one writer at a time)")
    e.add_argument("--max-bytes", type=_bytes, help="with --learn: cap on the stored maps (evicts); default: the DB's cap")
    e.add_argument("--eviction", choices=["lru", "lfu"], help="with --learn: eviction order (default: the DB's)")
    prefix_args(e)
    e.set_defaults(fn=cmd_eval)

    bn = sub.add_parser("bench", help="interleaved timing of exact vs cached forwards")
    common(bn)
    bn.add_argument("--policy", default="all", help=POLICY_HELP + " (default: all)")
    bn.add_argument("--threshold", type=float)
    bn.add_argument("--repeats", type=int, default=5)
    bn.add_argument("--warmup", type=int, default=1)
    bn.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    bn.add_argument("--no-eager", action="store_true", help="skip the eager-attention baseline")
    bn.add_argument("--plot", help="write a PNG of per-item speedups")
    bn.add_argument("--model")
    bn.add_argument("--batch-size", type=int, default=1, help="batch size of the whole-workload passes (default 1)")
    bn.add_argument("--pass-repeats", type=int, default=3, help="whole-workload passes per variant (default 3)")
    bn.add_argument("--quantize", choices=["int8"], help="dynamic int8 quantization of the model's linears (CPU)")
    prefix_args(bn)
    bn.set_defaults(fn=cmd_bench)

    c = sub.add_parser("calibrate", help="store the setting that reuses most within an accuracy-loss bound")
    common(c)
    c.add_argument("--max-loss", type=float, required=True,
                   help="bound on the share of changed predictions (hence on accuracy loss), e.g. 0.01")
    c.add_argument("--confidence", type=float, default=0.95, help="one-sided confidence of the bound (default 0.95)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--dry-run", action="store_true", help="report the setting without writing it to the DB")
    c.add_argument("--no-templates", action="store_true",
                   help="do not try template heads (one stored mean map per head, served with no lookup)")
    c.add_argument("--rank-share", type=float, default=0.25,
                   help="share of DATA's rows that only ranks heads for templates (default 0.25; the bound is "
                        "measured on the rest)")
    c.add_argument("--max-template-share", type=float, default=0.6,
                   help="most (layer, head) maps that may get templates (default 0.6)")
    c.add_argument("--model")
    c.set_defaults(fn=cmd_calibrate)

    t = sub.add_parser("templates", help="store template maps for the heads whose mean map changes answers least "
                                         "(use them with --policy fixed:N; calibrate chooses N itself)")
    common(t)
    t.add_argument("--max-share", type=float, default=0.6, help="share of all (layer, head) maps to keep (default 0.6)")
    t.add_argument("--rank-rounds", type=int, default=1,
                   help="rank heads in N chunks, each with the earlier chunks' templates in place (default 1)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--model")
    t.set_defaults(fn=cmd_templates)

    v = sub.add_parser("verify", help="check every data file of a cache DB against its checksum")
    v.add_argument("db")
    v.set_defaults(fn=cmd_verify)

    sv = sub.add_parser("serve", help="HTTP service: /v1/embeddings, /v1/score, /health, /metrics")
    sv.add_argument("--db", required=True, help="cache DB folder")
    sv.add_argument("--model", help="load this model instead of the one named in the DB (must be identical)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--policy", help=POLICY_HELP)
    sv.add_argument("--max-batch", type=int, default=8, help="requests per model batch (default 8)")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)")
    sv.add_argument("--max-queue", type=int, default=256, help="queued requests before 503 (default 256)")
    sv.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout, 504 after (default 30)")
    sv.add_argument("--no-cache", action="store_true", help="serve the plain model (a baseline for load tests)")
    sv.add_argument("--learn", action="store_true", help="insert inputs that miss (one writer per DB)")
    sv.add_argument("--max-bytes", type=_bytes, help="with --learn: cap on the stored maps")
    prefix_args(sv)
    sv.set_defaults(fn=cmd_serve)

    bt = sub.add_parser("batch", help="offline batch job on Ray Data (an actor pool, each with the DB attached)")
    common(bt)
    bt.add_argument("--out", required=True, help="output file: .jsonl or .parquet")
    bt.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    bt.add_argument("--actors", type=int, default=2)
    bt.add_argument("--batch-size", type=int, default=16)
    bt.add_argument("--model")
    bt.add_argument("--policy", help=POLICY_HELP)
    bt.set_defaults(fn=cmd_batch)

    m = sub.add_parser("migrate", help="convert an older cache DB to the current format in place")
    m.add_argument("db")
    m.set_defaults(fn=cmd_migrate)

    cp = sub.add_parser("compress", help="copy a DB with its maps re-encoded (same entries, projector and index)")
    cp.add_argument("db")
    cp.add_argument("--to", required=True, choices=["float16", "int8", "sparse", "float32"])
    cp.add_argument("--sparse-eps", type=float)
    cp.add_argument("--out", required=True)
    cp.add_argument("--force", action="store_true")
    cp.add_argument("--quiet", action="store_true")
    cp.set_defaults(fn=cmd_compress)

    r = sub.add_parser("retrain", help="refit the projector on every stored entry and re-index (after --learn)")
    r.add_argument("db")
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_retrain)

    i = sub.add_parser("inspect", help="describe a cache DB")
    i.add_argument("db")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "limit", None) is not None and args.limit < 1:
        print("attncache: error: --limit must be >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return args.fn(args)
    except UserError as e:
        print(f"attncache: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attncache: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
