"""The statistics and choices of calibration, apart from running anything.

A lookup hits its nearest compatible entry iff that entry's predicted distance is within the
threshold, so one cached pass at threshold infinity per policy gives every threshold's outcome
exactly (``tasks.mix``). Calibration picks, among candidate settings, the one with the largest reuse
whose disagreement with the exact predictions has a one-sided Clopper-Pearson upper confidence bound
<= ``max_loss``. Accuracy can drop at most by the share of changed predictions, so the bound also
bounds the accuracy loss on data of the same distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..stats import binom_upper
from ..tasks import Comparison, Plan, RowPlan, RunOutput, choice_scores, row_prediction
from .templates import Target

TEMPLATE_SHARES = (
    0.05,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.35,
    0.4,
    0.5,
    0.6,
)  # of all (layer, head) maps
QUANTILES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class SweepPoint:
    """One (policy, threshold) setting, mixed from the policy's pass and scored against exact."""

    comparison: Comparison
    policy: str
    threshold: float
    reuse_fraction: float  # share of all (layer, head) maps reused
    template_fraction: float  # of which served by templates
    attention_work_saved: float  # share of attention FLOPs skipped, at the median length (estimate)
    accuracy_loss: float | None = None
    disagreement_upper95: float | None = None
    bound: float | None = None  # the disagreement bound at the calibration's confidence

    def as_dict(self) -> dict:
        out = self.comparison.as_dict()
        for key in ("seconds_exact", "seconds_cached"):
            out.pop(key, None)
        out.update({k: v for k, v in asdict(self).items() if k != "comparison" and v is not None})
        return out

    @property
    def changed(self) -> int:
        """Rows whose prediction changed."""
        return round((1 - (self.comparison.agreement or 0.0)) * self.comparison.n)

    def with_bound(self, conf: float) -> SweepPoint:
        self.bound = (
            self.disagreement_upper95
            if conf == 0.95 and self.disagreement_upper95 is not None
            else binom_upper(self.changed, self.comparison.n, conf)
        )
        return self


def best_within(points: list[SweepPoint], max_loss: float) -> SweepPoint | None:
    """The point with the most reuse whose bound is within ``max_loss`` (and that reuses
    anything)."""
    ok = [p for p in points if p.bound is not None and p.bound <= max_loss and p.reuse_fraction > 0]
    return max(ok, key=lambda p: p.reuse_fraction) if ok else None


def choice_targets(plan: Plan, exact: RunOutput, rows: list[int]) -> list[Target]:
    """Per choice row: the decision margin (exact best choice minus runner-up) as weighted
    log-probs."""
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


def rows_for(max_loss: float, conf: float) -> int:
    """The fewest rows whose bound with no changed row is within ``max_loss``."""
    n = 1
    while binom_upper(0, n, conf) > max_loss:
        n = n * 2 if binom_upper(0, n * 2, conf) > max_loss else n + 1
    return n


def allowed_changes(n: int, max_loss: float, conf: float) -> int:
    """The most changed rows out of ``n`` whose upper bound stays within ``max_loss`` (-1: not even
    0)."""
    c = -1
    while c + 1 <= n and binom_upper(c + 1, n, conf) <= max_loss:
        c += 1
    return c


def _merged(r: RowPlan, inside: set[int], base: RunOutput, cached: RunOutput) -> RunOutput:
    """A view of one row's outputs: its sequences in ``inside`` from ``cached``, the others from
    ``base``."""
    logprobs = {}
    argmax = list(base.argmax)
    for qs in r.queries:
        for q in qs:
            key = (q.seq, q.from_end, q.token)
            logprobs[key] = (cached if q.seq in inside else base).logprobs[key]
    for seq in r.seqs:
        argmax[seq] = (cached if seq in inside else base).argmax[seq]
    return RunOutput(logprobs, argmax, None, [], 0.0)


@dataclass(frozen=True)
class Mixture:
    """What a threshold mixes (``tasks.mix``): per sequence, ``cached``'s output where its lookup
    distance is within the threshold, else ``base``'s. ``distances``: per sequence (default: those
    ``cached`` recorded)."""

    base: RunOutput
    cached: RunOutput
    distances: list[float] | None = None

    @classmethod
    def alone(cls, out: RunOutput) -> Mixture:
        """A pass that is its own outcome whatever the threshold."""
        return cls(out, out)


def change_counts(
    plan: Plan, rows: list[int], exact: RunOutput, mixture: Mixture, thresholds: np.ndarray
) -> np.ndarray:
    """Per threshold t, how many of ``rows`` predict differently from ``exact`` when each sequence
    takes ``mixture.cached``'s output if its distance is <= t, else ``mixture.base``'s.

    A row's sequences enter in order of distance, so its outcome changes at most once per sequence:
    each row is scored once per state, not once per threshold."""
    base, cached = mixture.base, mixture.cached
    dist_of = cached.distance if mixture.distances is None else mixture.distances
    counts = np.zeros(len(thresholds), np.int64)
    for n in rows:
        r = plan.rows[n]
        want = row_prediction(r, exact)
        seqs = sorted(set(r.seqs), key=lambda s: dist_of[s])
        dists = np.array([dist_of[s] for s in seqs])
        at = np.searchsorted(dists, thresholds, side="right")  # sequences inside, per threshold
        changed = np.array(  # only the states some threshold takes (a sequence at infinity: none)
            [
                row_prediction(r, _merged(r, set(seqs[:j]), base, cached)) != want
                for j in range(int(at.max()) + 1)
            ]
        )
        counts += changed[at]
    return counts
