"""``build`` and ``eval`` as Python functions (the CLI is a thin layer over these)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import data as data_mod
from .. import models
from ..build import BuildConfig
from ..build.calibrate import rows_for
from ..cache import AttnCache
from ..errors import UserError, keep_or_warn
from ..tasks import Comparison, RunOptions, Tiers, compare, plan_rows, require_rows, run
from ..tiers import DEFAULT_PREFIX_BYTES
from ..tiers.memo import ResultMemo
from .calibrate import CalibrationOptions, calibrate_plan
from .cheap import VerifyOptions, verified_pass
from .session import Session, SessionOptions, input_limit, warn_skipped

CONFIDENCE = 0.95  # of the build's calibration bound


def held_out_rows(n_rows: int, share: float, max_loss: float) -> int:
    """How many of DATA's rows the build holds out to calibrate its default: ``share`` of them,
    or none when they could not bound ``max_loss``. Half of the held rows verify the chosen
    setting, so at least twice the rows a bound with no changed answer needs."""
    n = int(round(share * n_rows))
    return n if n >= 2 * rows_for(max_loss, CONFIDENCE) else 0


@dataclass
class BuildOptions:
    """How ``build`` reads DATA, records it and calibrates its default."""

    limit: int | None = None  # DATA's first rows only
    config: BuildConfig | None = None  # how maps are stored (codec, layers, byte cap, batch size)
    progress: bool = True
    force: bool = False  # overwrite an existing DB
    strict: bool = False  # a bad row fails the build instead of being skipped
    max_tokens: int | None = None  # rows with a longer input are skipped (reported)
    device: str = "cpu"
    dtype: str = "float32"
    calibrate_share: float = 0.35  # of DATA's rows held out to calibrate the default (0: none)
    max_loss: float = 0.02  # the default's bound on the share of changed answers


def build(model_name: str, data: str, out: str, opts: BuildOptions | None = None) -> AttnCache:
    """Record every model input of DATA with ``model_name`` and write a cache DB at ``out``.

    Decoders: ``calibrate_share`` of DATA's rows is held out of the DB and calibrates its default
    policy and threshold against the model's own exact answers, to ``max_loss`` (agreement needs no
    labels). With too few rows for a bound, or for encoders, the default reuses no approximate maps,
    and ``inspect`` says why. ``calibrate_share=0``: the uncalibrated stability default."""
    o = opts or BuildOptions()
    cfg, progress, max_tokens = o.config, o.progress, o.max_tokens
    calibrate_share, max_loss = o.calibrate_share, o.max_loss
    t0 = time.monotonic()
    model, tok = models.load(model_name, dtype=o.dtype, device=o.device)
    causal = models.model_kind(model.config) == "decoder"
    ds = data_mod.load(data, encoder=not causal, limit=o.limit, strict=o.strict)
    plan = plan_rows(ds.rows, tok, causal, input_limit(model, tok, max_tokens))
    warn_skipped(ds.skipped + plan.skipped, not progress)
    require_rows(plan)
    held: list[int] = []
    n_held = held_out_rows(len(plan.rows), calibrate_share, max_loss) if causal else 0
    if n_held:
        held = sorted({int(x) for x in np.linspace(0, len(plan.rows) - 1, n_held)})  # spread out
    keep = [r for r in range(len(plan.rows)) if r not in set(held)]
    seq_row: dict[int, int] = {}
    for r in reversed(keep):  # a sequence shared by rows belongs to the first
        for q in plan.rows[r].seqs:
            seq_row[q] = r
    seqs = [plan.seqs[q] for q in sorted(seq_row)]
    groups = [seq_row[q] for q in sorted(seq_row)]
    cache = AttnCache.build(
        model, tok, seqs, out, cfg, progress=progress, force=o.force, groups=groups
    )
    if held:
        sub = plan.subset(held)
        if sub.rows:
            session = Session(cache, model, tok, max_tokens)
            exact = run(
                model,
                tok,
                sub,
                RunOptions(
                    batch_size=cfg.batch_size if cfg else 8, progress=progress, desc="exact"
                ),
            )
            choices = sum(r.kind in ("choice1", "choiceN") and len(r.queries) > 1 for r in sub.rows)
            # rows that rank heads for templates come out of what the bound can spare
            spare = len(sub.rows) - 2 * rows_for(max_loss, CONFIDENCE)
            rank_share = min(0.25, max(0.0, spare / len(sub.rows)))
            templates = choices == len(sub.rows) and rank_share * len(sub.rows) >= 8
            opts = CalibrationOptions(
                max_loss,
                CONFIDENCE,
                cfg.batch_size if cfg else 8,
                progress,
                templates=templates,
                rank_share=rank_share,
            )
            held_data = f"{len(sub.rows)} rows of {data} held out of the build"
            calibrate_plan(session, sub, exact, held_data, opts, t0)
            return AttnCache.open(out)
    if calibrate_share > 0:
        need = 2 * rows_for(max_loss, CONFIDENCE)
        why = (
            "encoders are not calibrated"
            if not causal
            else f"{len(plan.rows)} rows are too few: a bound of {max_loss:g} needs "
            f"{need} held-out rows, {calibrate_share:g} of {math.ceil(need / calibrate_share)}; "
            "every row went into the DB"
        )
        cache.update_settings(
            policy={
                "layers": [],
                "source": f"build: no measured bound ({why}); "
                "the default reuses no approximate maps: run 'attncache calibrate'",
            }
        )
    return AttnCache.open(out)


@dataclass
class EvalResult:
    """One policy's cached pass against the exact pass (``comparison``) and what each tier did."""

    comparison: Comparison
    policy: str
    policy_layers: list[int]
    threshold: float | None
    reuse_fraction: float  # share of all (layer, head) maps replayed over every sequence
    lookup_ms_per_item: float
    workload_speedup_rough: float | None  # exact seconds / cached seconds, same batch size
    batch_size: int
    skipped_rows: int
    prefix_cache: bool
    prefix_tokens_reused_fraction: float
    prefix_bytes_peak: int
    memo_hit_rate: float  # answered from earlier runs' exact answers
    memo_entries: int
    device_map_hit_rate: float  # maps found on the model's device (--device-map-bytes)
    device_map_bytes: int
    learned: int
    entries: int  # map DB entries (0: no DB)
    data: str
    device: str
    dtype: str
    verify: dict | None = None  # the cheap pass (--verify-margin): gate, fallback share, times

    def as_dict(self) -> dict:
        out = self.comparison.as_dict()
        out.update({k: v for k, v in asdict(self).items() if k != "comparison"})
        return out


@dataclass
class EvalOptions:
    """What ``evaluate`` runs beside DB and DATA (the CLI's ``eval`` flags)."""

    model_name: str | None = None  # without a DB: the model; with one: the same weights
    session: SessionOptions = field(default_factory=SessionOptions)
    policies: list[str] | None = None  # one result per policy (the exact pass is shared)
    threshold: float | None = None
    limit: int | None = None
    batch_size: int = 8
    progress: bool = True
    strict: bool = False  # stop at the first bad row instead of skipping it
    prefix_bytes: int | None = DEFAULT_PREFIX_BYTES  # None: the prefix tier off
    prefix_dir: str | None = None
    memo: bool = True
    learn: bool = False
    device_map_bytes: int | None = None
    verify: VerifyOptions | None = None


def evaluate(db: str | None, data: str, options: EvalOptions | None = None) -> list[EvalResult]:
    """Exact vs cached predictions on DATA, one result per policy (the exact pass is shared).

    The cached pass runs every tier: the result memo (answers of earlier runs, kept in the DB), the
    exact prefix tier (decoders; ``prefix_bytes=None`` switches it off), and map reuse by the
    policy. ``db`` None: ``model_name`` with the exact tiers only. ``learn``: inputs that miss are
    recorded and inserted as the run goes (within the byte cap). ``prefix_dir``: the exact tiers
    start from what an earlier run kept there (checked for this model) and keep the shared
    prompts' K/V (and, without a DB, the memo) for the next run. ``verify``: the cached pass runs
    in a cheaper precision, rows under a margin rerun exactly (``workflows.cheap``)."""
    o = options or EvalOptions()
    policies, threshold, learn, verify = o.policies, o.threshold, o.learn, o.verify
    batch_size, progress, memo, prefix_bytes = o.batch_size, o.progress, o.memo, o.prefix_bytes
    if threshold is not None and threshold < 0:
        raise UserError(f"--threshold must be >= 0, got {threshold}")
    if learn and o.session.quantize:
        raise UserError(
            "--learn records maps on the model the DB was built with; it cannot be "
            "combined with --quantize"
        )
    s = Session.open(db, o.model_name, o.session)
    if s.cache is None and (policies or threshold is not None or learn):
        raise UserError("--policy, --threshold and --learn need a map DB (--db)")
    verify = verify if verify is not None and verify.on else None
    if verify is not None and (s.cache is not None or s.quantized):
        raise UserError(
            "--verify-margin runs the exact tiers in two precisions; it is not combined with "
            "a map DB (--db) or --quantize"
        )
    parsed = [s.cache.policy(p) for p in policies or ["default"]] if s.cache else [None]
    folder = s.tier_folder(o.prefix_dir, prefix_bytes)
    kept = s.kept_prefix(folder)  # read once, for every policy
    plan = s.plan(data, o.limit, o.strict, quiet=not progress)
    exact = run(
        s.model,
        s.tokenizer,
        plan,
        RunOptions(batch_size=batch_size, progress=progress, desc="exact"),
    )
    stored = None
    if memo and s.cache is not None:
        stored = ResultMemo.load(s.cache.db)
    elif memo and folder is not None:
        stored = ResultMemo.load_from(folder)
    learned_answers = ResultMemo(stored.max_entries) if stored is not None else None
    results = []
    for policy in parsed:
        prefix = s.prefix_tier(prefix_bytes)
        if prefix is not None and kept is not None:
            prefix.restore(kept)
        # every policy starts from the memo as stored, so policies compare on equal terms
        answers = stored.copy() if stored is not None else None
        if s.cache is not None:
            s.cache.stats.reset()
        ctx = (
            s.cache.attach(
                s.model, policy, threshold, learn=learn, device_map_bytes=o.device_map_bytes
            )
            if s.cache
            else contextlib.nullcontext()
        )
        name = policy.name if policy is not None else "exact tiers"
        opts = RunOptions(
            batch_size=batch_size,
            progress=progress,
            desc=f"cached ({name})",
            keep_prefixes=folder is not None,
        )
        cheap = None
        if verify is not None:
            cheap = verified_pass(s, plan, opts, verify, Tiers(prefix=prefix, memo=answers))
        with ctx as att:
            if cheap is not None and cheap.out is not None:
                cached = cheap.out
            else:
                cached = run(
                    s.model,
                    s.tokenizer,
                    plan,
                    opts,
                    tiers=Tiers(attached=att, prefix=prefix, memo=answers),
                )
        if answers is not None and answers.dirty:  # this pass answered something new
            learned_answers.merge(answers)
            learned_answers.dirty = True
        st = (
            s.cache.stats.as_dict()
            if s.cache
            else {"layer_maps_reused": 0.0, "lookup_s": 0.0, "lookups": 0}
        )
        report = prefix.report() if prefix is not None else {}
        resident = att.maps.device_cache if att is not None else None
        dev = resident.stats.as_dict() if resident is not None else {}
        n_layers = s.cache.shape.n_layers if s.cache else 1
        results.append(
            EvalResult(
                comparison=compare(plan, exact, cached),
                policy=name,
                policy_layers=list(policy.layers) if policy else [],
                threshold=att.threshold if att is not None else None,
                reuse_fraction=st["layer_maps_reused"] / (len(plan.seqs) * n_layers),
                lookup_ms_per_item=1000 * st["lookup_s"] / max(1, st["lookups"]),
                workload_speedup_rough=exact.seconds / cached.seconds if cached.seconds else None,
                batch_size=batch_size,
                skipped_rows=len(plan.skipped),
                prefix_cache=prefix is not None,
                prefix_tokens_reused_fraction=report.get("prefix_tokens_reused_fraction", 0.0),
                prefix_bytes_peak=int(report.get("prefix_bytes_peak", 0)),
                memo_hit_rate=answers.stats.as_dict()["memo_hit_rate"]
                if answers is not None
                else 0.0,
                memo_entries=len(answers) if answers is not None else 0,
                device_map_hit_rate=dev.get("device_map_hit_rate", 0.0),
                device_map_bytes=int(dev.get("bytes", 0)),
                learned=att.learned if att is not None else 0,
                entries=len(s.cache.store) if s.cache else 0,
                data=data,
                device=s.device,
                dtype=s.dtype,
                verify=cheap.report.as_dict() if cheap is not None else None,
            )
        )
    if s.cache is not None:
        # hit counts for eviction and inspect (skipped if a writer holds the lock)
        s.cache.save_usage()
        if learned_answers is not None and learned_answers.dirty:
            stored.merge(learned_answers)
            stored.dirty = True
            keep_or_warn("the new answers", lambda: stored.save(s.cache.db))
    if folder is not None:
        if prefix is not None:
            keep_or_warn("the prefix K/V", lambda: prefix.save(folder))
        if s.cache is None and stored is not None and learned_answers is not None:
            stored.merge(learned_answers)
            keep_or_warn("the new answers", lambda: stored.save_to(folder))
    return results
