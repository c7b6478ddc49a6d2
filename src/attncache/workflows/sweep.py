"""Threshold sweeps (Pareto curves): one cached pass per policy gives every threshold's outcome."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..build.calibrate import QUANTILES, SweepPoint, binom_upper
from ..runtime import Policy
from ..tasks import Plan, RunOptions, RunOutput, Tiers, compare, mix, run
from .session import CalibrationData, Session


@dataclass
class Curve:
    policy: Policy
    cached: RunOutput  # the policy at threshold infinity (every lookup that finds an entry hits)
    base: (
        RunOutput  # what an item outputs when its lookup misses: exact, or the template heads alone
    )


def run_policy(
    s: Session, plan: Plan, policy: Policy, threshold: float, batch_size: int, progress: bool
) -> RunOutput:
    with s.cache.attach(s.model, policy, threshold=threshold) as att:
        return run(
            s.model,
            s.tokenizer,
            plan,
            RunOptions(batch_size=batch_size, progress=progress, desc=f"cached ({policy.name})"),
            tiers=Tiers(attached=att),
        )


def policy_curves(
    s: Session, plan: Plan, exact: RunOutput, specs: list, batch_size: int, progress: bool
) -> list[Curve]:
    curves = []
    bases: dict[str, RunOutput] = {}  # template-only runs, shared by the policies adding retrieval
    for spec in specs:
        policy = s.cache.policy(spec)
        base = exact
        if policy.fixed:
            key = json.dumps(policy.to_json()["fixed"], sort_keys=True)
            if key not in bases:
                only = Policy({}, policy.n_heads, "fixed", policy.fixed)
                bases[key] = run_policy(s, plan, only, -1.0, batch_size, progress)
            base = bases[key]
        cached = (
            run_policy(s, plan, policy, float("inf"), batch_size, progress)
            if policy.retrieves
            else base
        )
        curves.append(Curve(policy, cached, base))
    return curves


def template_share(s: Session, plan: Plan) -> float:
    """Share of the plan's sequences short enough for the templates (the others compute those
    heads)."""
    t = s.cache.templates
    if t is None or not plan.seqs:
        return 0.0
    return float(np.mean([len(x) <= t.max_len for x in plan.seqs]))


def points(
    s: Session,
    plan: Plan,
    exact: RunOutput,
    curve: Curve,
    thresholds: list[float],
    rows: Plan | None = None,
) -> list[SweepPoint]:
    """One point per threshold (one in all for a policy without retrieval); ``rows``: score only
    these."""
    c = s.cache
    n_layers = c.shape.n_layers
    stored = c.store.layer_pos
    per_hit = curve.policy.head_maps(stored) / n_layers
    fixed = (
        curve.policy.fixed_maps() / n_layers * template_share(s, plan)
        if curve.policy.fixed
        else 0.0
    )
    length = int(np.median([len(x) for x in plan.seqs]))
    work = [
        curve.policy.work_saved(c.shape, length, c.adapter.causal, stored, hit)
        for hit in (False, True)
    ]
    out = []
    for t in thresholds if curve.policy.retrieves else [-1.0]:
        mixed = mix(curve.base, curve.cached, t)
        cmp = compare(rows or plan, exact, mixed)
        hit_rate = float(np.mean(mixed.hit))
        point = SweepPoint(
            cmp,
            curve.policy.name,
            float(t),
            fixed + hit_rate * per_hit,
            fixed,
            (1 - hit_rate) * work[0] + hit_rate * work[1],
        )
        if cmp.accuracy_baseline is not None:
            point.accuracy_loss = cmp.accuracy_baseline - cmp.accuracy_cached
        if cmp.agreement is not None:
            point.disagreement_upper95 = binom_upper(point.changed, cmp.n)
        out.append(point)
    return out


def thresholds_for(curves: list[Curve], default: float) -> list[float]:
    d = np.array([x for c in curves for x in c.cached.distance if np.isfinite(x)])
    ts = sorted({float(np.quantile(d, q)) for q in QUANTILES} | {default}) if len(d) else [default]
    return [-1.0] + ts  # -1: nothing hits (the exact end of every curve)


@dataclass
class SweepResult:
    points: list[SweepPoint]
    device: str
    dtype: str

    def as_dict(self) -> dict:
        return {
            "points": [p.as_dict() for p in self.points],
            "device": self.device,
            "dtype": self.dtype,
        }


def sweep(
    src: CalibrationData, policies: list[str], batch_size: int = 8, progress: bool = True
) -> SweepResult:
    """Every policy's pass at threshold infinity, mixed into a point per threshold."""
    s = Session.open(src.db, src.model_name, src.session)
    specs = [s.cache.policy(p) for p in policies]
    plan = s.plan(src.data, src.limit, quiet=not progress)
    exact = run(
        s.model,
        s.tokenizer,
        plan,
        RunOptions(batch_size=batch_size, progress=progress, desc="exact"),
    )
    curves = policy_curves(s, plan, exact, specs, batch_size, progress)
    ts = thresholds_for(curves, s.cache.threshold)
    return SweepResult(
        [p for c in curves for p in points(s, plan, exact, c, ts)], s.device, s.dtype
    )
