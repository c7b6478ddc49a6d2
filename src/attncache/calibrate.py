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

import math
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .policy import Policy
from .tasks import Plan, RunOutput, compare, mix, run
from .workflows import Session

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
    cached: RunOutput


def policy_curves(s: Session, plan: Plan, exact: RunOutput, specs: list, batch_size: int, progress: bool) -> list[Curve]:
    curves = []
    for spec in specs:
        pol = s.cache.policy(spec)
        with s.cache.attach(s.model, pol, threshold=float("inf")) as att:
            cached = run(s.model, s.tokenizer, plan, batch_size, attached=att, progress=progress,
                         desc=f"cached ({pol.name}, threshold inf)")
        curves.append(Curve(pol, cached))
    return curves


def points(s: Session, plan: Plan, exact: RunOutput, curve: Curve, thresholds: list[float]) -> list[dict]:
    per_hit = curve.policy.head_maps(s.cache.store.layer_pos) / s.cache.shape.n_layers
    out = []
    for t in thresholds:
        m = mix(exact, curve.cached, t)
        r = compare(plan, exact, m)
        r.pop("seconds_exact", None)
        r.pop("seconds_cached", None)
        r["policy"] = curve.policy.name
        r["threshold"] = float(t)
        r["reuse_fraction"] = float(np.mean(m.hit)) * per_hit
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

    has_acc = any("accuracy_loss" in r for r in rows)
    ykeys = [("accuracy_loss", "accuracy loss (points)")] if has_acc else []
    ykeys.append(("agreement", "agreement with exact") if "agreement" in rows[0] else
                 ("cosine_to_exact_mean", "cosine to exact (mean)"))
    fig, axes = plt.subplots(1, len(ykeys), figsize=(5 * len(ykeys), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], ykeys):
        for pol in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["reuse_fraction"], r[key] * (100 if key == "accuracy_loss" else 1))
                         for r in rows if r["policy"] == pol)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=pol)
        ax.set_xlabel("reused (layer) maps / all maps")
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


def calibrate(db: str, data: str, max_loss: float, limit: int | None = None, batch_size: int = 8,
              conf: float = 0.95, progress: bool = True, model_name: str | None = None, write: bool = True,
              heads: bool = True, max_tokens: int | None = None) -> dict:
    if not 0 < max_loss < 1:
        raise UserError(f"--max-loss must be between 0 and 1 (a fraction of predictions), got {max_loss}")
    s = Session.open(db, model_name, max_tokens=max_tokens)
    if not s.cache.adapter.causal:
        raise UserError("calibrate needs labelled predictions: it supports decoder caches (choice or text rows)")
    plan = s.plan(data, limit, quiet=not progress)
    exact = run(s.model, s.tokenizer, plan, batch_size, progress=progress, desc="exact")
    specs = candidate_policies(s, heads)
    curves = policy_curves(s, plan, exact, specs, batch_size, progress)
    ts = thresholds_for(curves, s.cache.threshold)
    # Finer thresholds for calibration: every distinct distance is a candidate.
    ds = sorted({x for c in curves for x in c.cached.distance if np.isfinite(x)})
    ts = sorted(set(ts) | set(ds))
    best, best_policy, table = None, None, []
    for c in curves:
        for p in points(s, plan, exact, c, ts):
            n = p["n"]
            k = round((1 - p["agreement"]) * n)
            p["bound"] = binom_upper(k, n, conf)
            ok = p["bound"] <= max_loss
            if ok and p["reuse_fraction"] > 0 and (best is None or p["reuse_fraction"] > best["reuse_fraction"]):
                best, best_policy = p, c.policy
            table.append(p)
    if best is None:
        best = {"policy": "none", "threshold": -1.0, "reuse_fraction": 0.0, "agreement": 1.0, "n": len(plan.rows)}
        best_policy = Policy({}, s.cache.shape.n_heads, "none")
    result = {
        "max_loss": max_loss, "confidence": conf, "data": data, "n": len(plan.rows),
        "policy": best["policy"], "policy_layers": best_policy.to_json()["layers"],  # whole layers
        "policy_heads": sum(len(h) for h in best_policy.to_json()["heads"].values()),  # heads of other layers
        "threshold": best["threshold"], "reuse_fraction": best["reuse_fraction"],
        "agreement": best.get("agreement"), "disagreement_bound": best.get("bound", 0.0),
        "accuracy_baseline": best.get("accuracy_baseline"), "accuracy_cached": best.get("accuracy_cached"),
        "candidates": len(table),
    }
    if write:
        s.cache.update_settings(
            threshold=best["threshold"] if best_policy.heads else s.cache.threshold,
            policy={**best_policy.to_json(), "source": f"calibrate ({best['policy']}): max_loss {max_loss} at "
                    f"{conf:.0%} confidence on {len(plan.rows)} rows of {data}"},
            calibration=result)
    return result
