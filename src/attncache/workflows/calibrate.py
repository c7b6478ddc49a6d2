"""``calibrate`` and ``templates``: choose (and store) the setting that reuses most within a
bound."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from ..build.calibrate import (
    TEMPLATE_SHARES,
    allowed_changes,
    binom_upper,
    choice_targets,
    rows_for,
)
from ..build.templates import RankData, greedy_order, mean_maps, select
from ..db import Templates
from ..errors import UserError
from ..runtime import Policy
from ..tasks import Plan, RunOptions, RunOutput, compare, run
from .search import Search, SearchOptions
from .session import CalibrationData, Session

CANDIDATE_LAYER_COUNTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25)
CANDIDATE_HEAD_SHARES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def candidate_policies(s: Session, heads: bool = True) -> list[Policy]:
    """The k most stable layers for growing k, and (optionally) the N most stable single heads."""
    c = s.cache
    layer_dist = c.db.train_report.get("layer_distance")
    stored = c.store.layout.layers
    order = (
        [stored[i] for i in np.argsort(layer_dist, kind="stable")] if layer_dist else list(stored)
    )
    ks = sorted({k for k in (*CANDIDATE_LAYER_COUNTS, len(order)) if k <= len(order)})
    out = [c.policy(",".join(map(str, sorted(order[:k])))) for k in ks]
    total = len(stored) * c.shape.n_heads
    if heads and c.head_distance is not None:
        out += [c.policy(f"heads:{max(1, round(total * f))}") for f in CANDIDATE_HEAD_SHARES]
    return out


@dataclass(frozen=True)
class TemplateFit:
    """How templates are fitted: the best ``max_share`` of all heads kept; ``rounds`` > 1 ranks in
    chunks, each with the earlier chunks' templates in place (measured on SST-2: no better than
    one round, see docs/results.md)."""

    max_share: float
    rounds: int = 1
    progress: bool = True


def fit_templates(
    s: Session, plan: Plan, exact: RunOutput, rank_rows: list[int], fit: TemplateFit
) -> tuple[Templates, dict]:
    """Average the stored maps, rank every stored (layer, head) by the estimated output effect of
    its template on ``rank_rows``, and keep the templates of the best ``fit.max_share`` of all
    heads, in rank order."""
    c, rounds, progress = s.cache, fit.rounds, fit.progress
    if rounds < 1:
        raise UserError(f"--rank-rounds must be at least 1, got {rounds}")
    targets = choice_targets(plan, exact, rank_rows)
    if not targets:
        raise UserError(
            "ranking heads for templates needs multiple-choice rows (with 2+ choices) in DATA"
        )
    means = mean_maps(c.store, progress=progress)
    layers = c.store.layout.layers
    keep = max(1, int(round(fit.max_share * c.shape.n_layers * c.shape.n_heads)))
    data = RankData(s.model, c.adapter, means, layers, plan.seqs, targets)
    order, scores = greedy_order(data, keep, rounds, progress)
    info = {"ranked_on": len(targets), "method": "attribution", "rounds": rounds, "score": scores}
    return select(means, layers, order, c.adapter.causal), info


def exact_on_decoder(
    src: CalibrationData, batch_size: int, progress: bool, refusal: str
) -> tuple[Session, Plan, RunOutput]:
    """Open a decoder DB (``refusal`` otherwise), plan DATA and run it exactly."""
    s = Session.open(src.db, src.model_name, src.session)
    if not s.causal:
        raise UserError(refusal)
    plan = s.plan(src.data, src.limit, quiet=not progress)
    opts = RunOptions(batch_size=batch_size, progress=progress, desc="exact")
    return s, plan, run(s.model, s.tokenizer, plan, opts)


@dataclass(frozen=True)
class TemplatesResult:
    db: str
    template_heads: int
    max_len: int
    ranked_on: int
    bytes: int
    device: str
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def templates_only(
    src: CalibrationData,
    max_share: float = 0.6,
    rounds: int = 1,
    batch_size: int = 8,
    progress: bool = True,
) -> TemplatesResult:
    """Fit and store templates for the ``max_share`` of heads that rank best on DATA, without
    choosing how many to use (``--policy fixed:N`` picks; ``calibrate`` chooses N under a bound)."""
    if not 0 < max_share <= 1:
        raise UserError(f"--max-share must be in (0, 1], got {max_share}")
    s, plan, exact = exact_on_decoder(
        src,
        batch_size,
        progress,
        "templates are ranked by their effect on choice scores: they need a decoder cache",
    )
    every_row = list(range(len(plan.rows)))
    t, info = fit_templates(s, plan, exact, every_row, TemplateFit(max_share, rounds, progress))
    s.cache.set_templates(t, {"source": f"attncache templates on {src.data}", **info})
    return TemplatesResult(
        src.db, len(t.heads), t.max_len, info["ranked_on"], int(t.maps.nbytes), s.device, s.dtype
    )


@dataclass(frozen=True)
class CalibrationResult:
    max_loss: float
    confidence: float
    data: str
    n: int  # rows the bound was measured on: none of them took part in choosing the setting
    rank_rows: int  # rows that only ranked heads for templates
    selection_rows: int  # rows the search chose the setting on
    policy: str
    policy_layers: list[int]  # whole layers
    policy_heads: int  # retrieved heads of other layers
    policy_fixed_heads: int  # served by templates
    threshold: float
    reuse_fraction: float
    template_fraction: float
    agreement: float | None
    disagreement_bound: float
    accuracy_baseline: float | None
    accuracy_cached: float | None
    candidates: int  # candidate settings whose passes ran (fully or until they broke the bound)
    passes: float  # cached passes over the calibration rows, in whole-pass units
    seconds: float
    search: str  # "complete", or "stopped at the time limit: the best setting found so far"
    rejected: str | None  # the search's choice when the verification rows refused it (then none)
    device: str
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate(src: CalibrationData, opts: CalibrationOptions) -> CalibrationResult:
    """Store the setting that reuses the most maps while the upper bound on changed answers <=
    ``opts.max_loss``.

    Candidates: retrieval policies (the k most stable layers, the N most stable heads) at every
    threshold; with ``templates``, also the k best template heads alone (k = 5..60 % of all maps)
    and the largest such k within the bound combined with each retrieval policy. The first
    ``rank_share`` of DATA's rows only ranks heads for templates; the search chooses on every
    other remaining row and the bound is measured on the rows between, which did not choose it.
    The search (``search.py``) skips and stops candidates that cannot win; ``max_minutes`` caps its
    time and returns the best setting found within it, labelled as such."""
    if not 0 < opts.max_loss < 1:
        raise UserError(
            f"--max-loss must be between 0 and 1 (a fraction of predictions), got {opts.max_loss}"
        )
    if opts.max_minutes is not None and opts.max_minutes <= 0:
        raise UserError(f"--max-minutes must be positive, got {opts.max_minutes}")
    t0 = time.monotonic()
    s, plan, exact = exact_on_decoder(
        src,
        opts.batch_size,
        opts.progress,
        "calibrate needs labelled predictions: it supports decoder caches (choice or text rows)",
    )
    return calibrate_plan(s, plan, exact, src.data, opts, t0)


@dataclass
class CalibrationOptions:
    """How ``calibrate_plan`` searches and what it promises."""

    max_loss: float  # the bound on the share of changed answers
    confidence: float = 0.95
    batch_size: int = 8
    progress: bool = True
    write: bool = True  # store the chosen setting in the DB
    heads: bool = True  # per-head retrieval candidates too
    templates: bool = True  # template-head candidates (rank heads on the first rows)
    rank_share: float = 0.25  # rows that rank heads for templates
    max_template_share: float = 0.6
    max_minutes: float | None = None  # the search's time cap
    exhaustive: bool = False  # every candidate at every threshold (slow; for checking the search)


def calibrate_plan(
    s: Session, plan: Plan, exact: RunOutput, data: str, opts: CalibrationOptions, t0: float
) -> CalibrationResult:
    """``calibrate`` on a planned and exactly run DATA (build calibrates its default this way)."""
    max_loss, conf, batch_size, progress = (
        opts.max_loss,
        opts.confidence,
        opts.batch_size,
        opts.progress,
    )
    templates, rank_share = opts.templates, opts.rank_share
    n_rank = int(round(rank_share * len(plan.rows))) if templates else 0
    if templates and (n_rank < 8 or len(plan.rows) - n_rank < 20):
        raise UserError(
            f"calibrating templates needs at least ~60 rows in DATA (8+ to rank heads, 20+ to "
            f"choose and verify the setting), got {len(plan.rows)}; pass more data or "
            "--no-templates"
        )
    # the search chooses on half of the rows, the bound is measured on the other half: a bound on
    # the rows that chose the setting among many candidates would be optimistic
    select_rows = list(range(n_rank, len(plan.rows), 2))
    verify_rows = list(range(n_rank + 1, len(plan.rows), 2))
    if not verify_rows:
        raise UserError(f"calibrate needs more rows than {len(plan.rows)} in DATA")
    verify = Plan(plan.seqs, [plan.rows[r] for r in verify_rows], plan.skipped, plan.causal)
    if allowed_changes(len(verify_rows), max_loss, conf) < 0:  # not even 0 changes would do
        templates = False  # nothing can pass: rank no heads, run no candidate
    deadline = t0 + 60 * opts.max_minutes if opts.max_minutes is not None else None
    tmpl_info: dict = {}
    if templates:
        fit = TemplateFit(opts.max_template_share, progress=progress)
        t, tmpl_info = fit_templates(s, plan, exact, list(range(n_rank)), fit)
        s.cache.use_templates(t)
    search_opts = SearchOptions(max_loss, conf, batch_size, progress, deadline, opts.exhaustive)
    search = Search(s, plan, select_rows, exact, search_opts)
    specs = candidate_policies(s, opts.heads) if search.c_max >= 0 else []
    k_ok, k_base = 0, None
    if templates:
        total = s.cache.shape.n_layers * s.cache.shape.n_heads
        ks = sorted({min(len(t.heads), max(1, round(f * total))) for f in TEMPLATE_SHARES})
        k_ok, k_base = search.templates(ks)
    candidates = [(x, exact) for x in specs]
    if k_ok and k_base is not None:  # each on top of the largest template set in the bound too
        candidates += [(s.cache.policy(f"fixed:{k_ok}+{x.name}"), k_base) for x in specs]
    search.policies(candidates)
    chosen = search.best
    base_policy = s.cache.policy(f"fixed:{k_ok}") if chosen.base is not exact and k_ok else None
    best, checked, changes = search.confirm(verify_rows, base_policy)
    rejected = None
    if chosen.reuse > 0 and best.reuse <= 0:
        rejected = f"{chosen.policy.name} broke max_loss on them at every threshold"
    cmp = compare(verify, exact, checked)
    if best.reuse > 0:
        why = f"max_loss {max_loss} at {conf:.0%} confidence on {len(verify_rows)} rows of {data}"
    elif rejected:
        why = f"the search's choice, tested on rows that did not choose it: {rejected}"
    elif allowed_changes(len(verify_rows), max_loss, conf) < 0:
        need = rows_for(max_loss, conf)
        why = (
            f"{len(verify_rows)} verification rows cannot bound changed answers at {max_loss} "
            f"(at least {need} are needed: about {2 * need} calibration rows)"
        )
    else:
        why = f"no setting kept changed answers within {max_loss} on {len(select_rows)} rows"
    pj = best.policy.to_json()
    n_fixed = sum(len(h) for h in pj.get("fixed", {}).values())
    n_layers = s.cache.shape.n_layers
    result = CalibrationResult(
        max_loss=max_loss,
        confidence=conf,
        data=data,
        n=cmp.n,
        rank_rows=n_rank,
        selection_rows=len(select_rows),
        policy=best.policy.name,
        policy_layers=pj["layers"],
        policy_heads=sum(len(h) for h in pj["heads"].values()),
        policy_fixed_heads=n_fixed,
        threshold=best.threshold if best.policy.retrieves else s.cache.threshold,  # what is stored
        reuse_fraction=best.reuse,
        template_fraction=best.policy.fixed_maps() / n_layers * search.template_share,
        agreement=cmp.agreement,
        disagreement_bound=binom_upper(changes, cmp.n, conf) if best.reuse > 0 else 0.0,
        accuracy_baseline=cmp.accuracy_baseline,
        accuracy_cached=cmp.accuracy_cached,
        candidates=search.tried,
        passes=round(search.passes, 2),
        seconds=round(time.monotonic() - t0, 1),
        search="stopped at the time limit: the best setting found so far"
        if search.stopped_early
        else "complete",
        rejected=rejected,
        device=s.device,
        dtype=s.dtype,
    )
    if opts.write:
        kept = (
            s.cache.templates.first(n_fixed) if n_fixed else None
        )  # the chosen heads, in rank order
        s.cache.use_templates(None)
        if kept is not None:
            s.cache.set_templates(
                kept,
                {
                    "source": f"calibrate on {data}",
                    **tmpl_info,
                    "score": tmpl_info.get("score", [])[:n_fixed],
                },
            )
        s.cache.update_settings(
            threshold=result.threshold,
            policy={
                **pj,
                "source": f"calibrate ({result.policy}): {why}",
            },
            calibration=result.as_dict(),
        )
    return result
