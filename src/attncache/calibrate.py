"""Accuracy-bounded reuse: threshold sweeps (Pareto curves) and calibration.

Both rest on one observation: a lookup hits its nearest length-compatible entry iff that entry's predicted
distance is within the threshold. So one cached pass at threshold infinity, per policy, gives every
threshold's outcome exactly: each sequence either reuses the maps that pass used, or computes exactly
(``tasks.mix``). A sweep over T thresholds and P policies costs P cached passes, not P * T.

Calibration picks, among policies "the k most stable layers" (stability measured at build time) and all
thresholds, the setting with the largest reuse fraction whose disagreement with exact predictions has a
one-sided Clopper-Pearson upper confidence bound <= ``max_loss``. Since accuracy can drop at most by the
share of changed predictions, the bound also bounds the accuracy loss on data of the same distribution.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .policy import Policy
from .tasks import Plan, RunOutput, choice_scores, compare, mix, run
from .templates import Target, Templates, greedy_order, mean_maps
from .workflows import Session

TEMPLATE_SHARES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)  # of all (layer, head) maps
QUANTILES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def binom_upper(k: int, n: int, conf: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on p after k successes in n trials."""
    if n == 0:
        return 1.0
    if k >= n:
        return 1.0
    alpha = 1.0 - conf

    def cdf(p: float) -> float:  # P(X <= k; n, p)
        logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                + (i * math.log(p) if i else 0.0) + ((n - i) * math.log1p(-p) if n - i else 0.0)
                for i in range(k + 1)]
        m = max(logs)
        return math.exp(m) * sum(math.exp(x - m) for x in logs)

    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if cdf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class Curve:
    policy: Policy
    cached: RunOutput  # the policy at threshold infinity (every lookup that finds an entry hits)
    base: RunOutput  # what an item outputs when its lookup misses: exact, or the template heads alone


def _run(s: Session, plan: Plan, pol: Policy, threshold: float, batch_size: int, progress: bool) -> RunOutput:
    with s.cache.attach(s.model, pol, threshold=threshold) as att:
        return run(s.model, s.tokenizer, plan, batch_size, attached=att, progress=progress,
                   desc=f"cached ({pol.name})")


def policy_curves(s: Session, plan: Plan, exact: RunOutput, specs: list, batch_size: int, progress: bool) -> list[Curve]:
    curves = []
    bases: dict[str, RunOutput] = {}  # template-only runs, shared by the policies that add retrieval to them
    for spec in specs:
        pol = s.cache.policy(spec)
        base = exact
        if pol.fixed:
            key = json.dumps(pol.to_json()["fixed"], sort_keys=True)
            if key not in bases:
                bases[key] = _run(s, plan, Policy({}, pol.n_heads, "fixed", pol.fixed), -1.0, batch_size, progress)
            base = bases[key]
        cached = _run(s, plan, pol, float("inf"), batch_size, progress) if pol.retrieves else base
        curves.append(Curve(pol, cached, base))
    return curves


def template_share(s: Session, plan: Plan) -> float:
    """Share of the plan's sequences short enough for the templates (the others compute template heads)."""
    t = s.cache.templates
    if t is None or not plan.seqs:
        return 0.0
    return float(np.mean([len(x) <= t.max_len for x in plan.seqs]))


def points(s: Session, plan: Plan, exact: RunOutput, curve: Curve, thresholds: list[float],
           rows: Plan | None = None) -> list[dict]:
    """One result per threshold (one in all for a policy without retrieval); ``rows``: score only these."""
    n_layers = s.cache.shape.n_layers
    per_hit = curve.policy.head_maps(s.cache.store.layer_pos) / n_layers
    fixed = curve.policy.fixed_maps() / n_layers * template_share(s, plan) if curve.policy.fixed else 0.0
    c = s.cache
    L = int(np.median([len(x) for x in plan.seqs]))
    work = [curve.policy.work_saved(c.shape, L, c.adapter.causal, c.store.layer_pos, hit) for hit in (False, True)]
    out = []
    for t in thresholds if curve.policy.retrieves else [-1.0]:
        m = mix(curve.base, curve.cached, t)
        r = compare(rows or plan, exact, m)
        r.pop("seconds_exact", None)
        r.pop("seconds_cached", None)
        r["policy"] = curve.policy.name
        r["threshold"] = float(t)
        r["reuse_fraction"] = fixed + float(np.mean(m.hit)) * per_hit
        r["template_fraction"] = fixed
        hr = float(np.mean(m.hit))
        r["attention_work_saved"] = (1 - hr) * work[0] + hr * work[1]  # at the median length (estimate)
        if "accuracy_baseline" in r:
            r["accuracy_loss"] = r["accuracy_baseline"] - r["accuracy_cached"]
        if "agreement" in r:
            n = r["n"]
            r["disagreement_upper95"] = binom_upper(round((1 - r["agreement"]) * n), n)
        out.append(r)
    return out


def thresholds_for(curves: list[Curve], default: float) -> list[float]:
    d = np.array([x for c in curves for x in c.cached.distance if np.isfinite(x)])
    ts = sorted({float(np.quantile(d, q)) for q in QUANTILES} | {default}) if len(d) else [default]
    return [-1.0] + ts  # -1: nothing hits (the exact end of every curve)


def sweep(db: str, data: str, policies: list[str], limit: int | None = None, batch_size: int = 8,
          progress: bool = True, model_name: str | None = None, max_tokens: int | None = None) -> list[dict]:
    s = Session.open(db, model_name, max_tokens=max_tokens)
    specs = [s.cache.policy(p) for p in policies]
    plan = s.plan(data, limit, quiet=not progress)
    exact = run(s.model, s.tokenizer, plan, batch_size, progress=progress, desc="exact")
    curves = policy_curves(s, plan, exact, specs, batch_size, progress)
    ts = thresholds_for(curves, s.cache.threshold)
    return [p for c in curves for p in points(s, plan, exact, c, ts)]


def plot_sweep(rows: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(policy: str) -> str:  # template-only policies are one point each: draw them as one curve
        return "templates (fixed:N)" if re.fullmatch(r"fixed:\d+", policy) else policy

    has_acc = any("accuracy_loss" in r for r in rows)
    ykeys = [("accuracy_loss", "accuracy loss (points)")] if has_acc else []
    ykeys.append(("agreement", "agreement with exact") if "agreement" in rows[0] else
                 ("cosine_to_exact_mean", "cosine to exact (mean)"))
    fig, axes = plt.subplots(1, len(ykeys), figsize=(5 * len(ykeys), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], ykeys):
        for name in dict.fromkeys(series(r["policy"]) for r in rows):
            pts = sorted((r["reuse_fraction"], r[key] * (100 if key == "accuracy_loss" else 1))
                         for r in rows if series(r["policy"]) == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
        ax.set_xlabel("reused (layer, head) maps / all maps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def candidate_policies(s: Session, heads: bool = True) -> list[Policy]:
    """The k most stable layers for growing k, and (optionally) the N most stable single heads."""
    c = s.cache
    layer_dist = c.manifest["projector"].get("train", {}).get("layer_distance")
    stored = c.store.layout.layers
    order = [stored[i] for i in np.argsort(layer_dist, kind="stable")] if layer_dist else list(stored)
    ks = sorted({k for k in (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, len(order)) if k <= len(order)})
    out = [c.policy(",".join(map(str, sorted(order[:k])))) for k in ks]
    total = len(stored) * c.shape.n_heads
    if heads and c.head_distance is not None:
        out += [c.policy(f"heads:{max(1, round(total * f))}") for f in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)]
    return out


def choice_targets(plan: Plan, exact: RunOutput, rows: list[int]) -> list[Target]:
    """Per choice row: the decision margin (exact best choice minus runner-up) as weighted log-probs."""
    out = []
    for n in rows:
        r = plan.rows[n]
        if r.kind not in ("choice1", "choiceN") or len(r.queries) < 2:
            continue
        order = np.argsort(choice_scores(r, exact))[::-1]
        terms: dict[int, list[tuple[int, int, float]]] = {}
        for c, sign in ((int(order[0]), 1.0), (int(order[1]), -1.0)):
            for q in r.queries[c]:
                terms.setdefault(q.seq, []).append((q.from_end, q.token, sign / r.norms[c]))
        out += [Target(seq, t, n) for seq, t in terms.items()]
    return out


def fit_templates(s: Session, plan: Plan, exact: RunOutput, rank_rows: list[int], max_share: float,
                  progress: bool, rounds: int = 1) -> tuple[Templates, dict]:
    """Average the stored maps, rank every stored (layer, head) by the estimated output effect of its
    template on ``rank_rows``, and keep the templates of the best ``max_share`` of all heads, in rank order.
    ``rounds`` > 1 ranks in that many chunks, each with the earlier chunks' templates in place (measured on
    SST-2: no better than one round, see docs/results.md)."""
    c = s.cache
    means = mean_maps(c.store, progress=progress)
    targets = choice_targets(plan, exact, rank_rows)
    if not targets:
        raise UserError("ranking heads for templates needs multiple-choice rows (with 2+ choices) in DATA")
    layers = c.store.layout.layers
    keep = max(1, int(round(max_share * c.shape.n_layers * c.shape.n_heads)))
    if rounds < 1:
        raise UserError(f"--rank-rounds must be at least 1, got {rounds}")
    order, scores = greedy_order(s.model, c.adapter, means, layers, plan.seqs, targets, keep, rounds, progress)
    info = {"ranked_on": len(targets), "method": "attribution", "rounds": rounds, "score": scores}
    return Templates.select(means, layers, order, c.adapter.causal), info


def _exact_on_decoder(db, data, limit, batch_size, progress, model_name, max_tokens, refusal: str):
    """Open a decoder DB (``refusal`` otherwise), plan DATA and run it exactly: where both commands start."""
    s = Session.open(db, model_name, max_tokens=max_tokens)
    if not s.cache.adapter.causal:
        raise UserError(refusal)
    plan = s.plan(data, limit, quiet=not progress)
    return s, plan, run(s.model, s.tokenizer, plan, batch_size, progress=progress, desc="exact")


def templates_only(db: str, data: str, max_share: float = 0.6, limit: int | None = None, batch_size: int = 8,
                   progress: bool = True, model_name: str | None = None, max_tokens: int | None = None,
                   rounds: int = 1) -> dict:
    """Fit and store templates for the ``max_share`` of heads that rank best on DATA, without choosing how many
    to use (``--policy fixed:N`` picks; ``calibrate`` chooses N under a bound and keeps only those)."""
    if not 0 < max_share <= 1:
        raise UserError(f"--max-share must be in (0, 1], got {max_share}")
    s, plan, exact = _exact_on_decoder(db, data, limit, batch_size, progress, model_name, max_tokens,
                                       "templates are ranked by their effect on choice scores: they need a decoder cache")
    t, info = fit_templates(s, plan, exact, list(range(len(plan.rows))), max_share, progress, rounds)
    s.cache.set_templates(t, {"source": f"attncache templates on {data}", **info})
    return {"db": db, "template_heads": len(t.heads), "max_len": t.max_len, "ranked_on": info["ranked_on"],
            "bytes": int(t.maps.nbytes)}


def calibrate(db: str, data: str, max_loss: float, limit: int | None = None, batch_size: int = 8,
              conf: float = 0.95, progress: bool = True, model_name: str | None = None, write: bool = True,
              heads: bool = True, max_tokens: int | None = None, templates: bool = True,
              rank_share: float = 0.25, max_template_share: float = 0.6) -> dict:
    """Store the setting that reuses the most maps while the 95 % upper bound on changed answers <= max_loss.

    Candidates: retrieval policies (the k most stable layers, the N most stable heads) at every threshold;
    with ``templates``, also the k best template heads alone (k = 5..60 % of all maps) and the largest such k
    within the bound combined with each retrieval policy.
    The first ``rank_share`` of DATA's rows only ranks heads for templates; the bound is measured on the rest.
    """
    if not 0 < max_loss < 1:
        raise UserError(f"--max-loss must be between 0 and 1 (a fraction of predictions), got {max_loss}")
    s, plan, exact = _exact_on_decoder(db, data, limit, batch_size, progress, model_name, max_tokens,
                                       "calibrate needs labelled predictions: it supports decoder caches "
                                       "(choice or text rows)")
    n_rank = int(round(rank_share * len(plan.rows))) if templates else 0
    if templates and (n_rank < 8 or len(plan.rows) - n_rank < 20):
        raise UserError(f"calibrating templates needs at least ~60 rows in DATA (8+ to rank heads, 20+ to measure "
                        f"the bound), got {len(plan.rows)}; pass more data or --no-templates")
    held = Plan(plan.seqs, plan.rows[n_rank:], plan.skipped, plan.causal)  # the rows the bound is measured on
    specs = candidate_policies(s, heads)
    table: list[dict] = []
    tmpl_info: dict = {}
    if templates:
        t, tmpl_info = fit_templates(s, plan, exact, list(range(n_rank)), max_template_share, progress)
        s.cache.use_templates(t)
        total = s.cache.shape.n_layers * s.cache.shape.n_heads
        ks = sorted({min(len(t.heads), max(1, round(f * total))) for f in TEMPLATE_SHARES})
        fixed_curves = policy_curves(s, plan, exact, [f"fixed:{k}" for k in ks], batch_size, progress)
        k_ok = 0
        for k, curve in zip(ks, fixed_curves):
            p = points(s, plan, exact, curve, [-1.0], held)[0]
            table.append(_bounded(p, conf))
            if p["bound"] <= max_loss:
                k_ok = k
        if k_ok:  # the retrieval policies alone, and each on top of the largest template set within the bound
            specs = specs + [s.cache.policy(f"fixed:{k_ok}+{x.name}") for x in specs]
    curves = policy_curves(s, plan, exact, specs, batch_size, progress)
    ts = thresholds_for(curves, s.cache.threshold)
    # Finer thresholds for calibration: every distinct distance is a candidate.
    ds = sorted({x for c in curves for x in c.cached.distance if np.isfinite(x)})
    ts = sorted(set(ts) | set(ds))
    for c in curves:
        table += [_bounded(p, conf) for p in points(s, plan, exact, c, ts, held)]
    ok = [p for p in table if p["bound"] <= max_loss and p["reuse_fraction"] > 0]
    best = max(ok, key=lambda p: p["reuse_fraction"]) if ok else None
    if best is None:
        best = {"policy": "none", "threshold": -1.0, "reuse_fraction": 0.0, "agreement": 1.0, "n": len(held.rows)}
        best_policy = Policy({}, s.cache.shape.n_heads, "none")
    else:
        best_policy = s.cache.policy(best["policy"])
    pj = best_policy.to_json()
    result = {
        "max_loss": max_loss, "confidence": conf, "data": data, "n": best["n"], "rank_rows": n_rank,
        "policy": best["policy"], "policy_layers": pj["layers"],  # whole layers
        "policy_heads": sum(len(h) for h in pj["heads"].values()),  # retrieved heads of other layers
        "policy_fixed_heads": sum(len(h) for h in pj.get("fixed", {}).values()),  # served by templates
        "threshold": best["threshold"], "reuse_fraction": best["reuse_fraction"],
        "template_fraction": best.get("template_fraction", 0.0),
        "agreement": best.get("agreement"), "disagreement_bound": best.get("bound", 0.0),
        "accuracy_baseline": best.get("accuracy_baseline"), "accuracy_cached": best.get("accuracy_cached"),
        "candidates": len(table),
    }
    if write:
        n_fixed = result["policy_fixed_heads"]
        if n_fixed:  # keep only the chosen heads' templates (the first n_fixed in rank order)
            t = s.cache.templates
            kept = Templates(t.heads[:n_fixed], t.maps[:n_fixed], t.causal)
            s.cache.use_templates(None)
            s.cache.set_templates(kept, {"source": f"calibrate on {data}", **tmpl_info,
                                         "score": tmpl_info.get("score", [])[:n_fixed]})
        else:
            s.cache.use_templates(None)
        s.cache.update_settings(
            threshold=best["threshold"] if best_policy.retrieves else s.cache.threshold,
            policy={**pj, "source": f"calibrate ({best['policy']}): max_loss {max_loss} at "
                    f"{conf:.0%} confidence on {len(held.rows)} rows of {data}"},
            calibration=result)
    return result


def _bounded(p: dict, conf: float) -> dict:
    n = p["n"]
    p["bound"] = binom_upper(round((1 - p["agreement"]) * n), n, conf)
    return p

