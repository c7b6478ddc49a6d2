"""Outputs -> predictions -> metrics, and a cached run compared with the exact one."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .plan import Plan, RowPlan
from .run import RunOutput


def row_prediction(r: RowPlan, out: RunOutput) -> int:
    """The chosen index (choice rows) or greedy token (text rows); -1 for embedding rows."""
    if r.kind in ("choice1", "choiceN"):
        return int(np.argmax(choice_scores(r, out)))
    if r.kind == "text":
        return out.argmax[r.seqs[0]]
    return -1


def predictions(plan: Plan, out: RunOutput) -> list[int]:
    return [row_prediction(r, out) for r in plan.rows]


def choice_scores(r: RowPlan, out: RunOutput) -> list[float]:
    return [
        sum(out.logprobs[(q.seq, q.from_end, q.token)] for q in qs) / n
        for qs, n in zip(r.queries, r.norms)
    ]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties get average ranks)."""
    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        return float("nan")
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for v in np.unique(scores):  # average ranks of ties
        t = scores == v
        if t.sum() > 1:
            ranks[t] = ranks[t].mean()
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * neg.sum()))


@dataclass
class Comparison:
    """A cached run against the exact run of the same plan (fields that do not apply are None)."""

    n: int
    n_sequences: int
    hit_rate: float
    agreement: float | None = None  # share of scored rows whose prediction did not change
    accuracy_baseline: float | None = None
    accuracy_cached: float | None = None
    cosine_to_exact_mean: float | None = None
    cosine_to_exact_min: float | None = None
    cosine_to_exact_p01: float | None = None
    pair_auc_exact: float | None = None
    pair_auc_cached: float | None = None
    seconds_exact: float | None = None
    seconds_cached: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def compare(plan: Plan, exact: RunOutput, cached: RunOutput) -> Comparison:
    """Metrics of a cached run against the exact run of the same plan."""
    res = Comparison(
        len(plan.rows),
        len(plan.seqs),
        float(np.mean(cached.hit)) if cached.hit else 0.0,
        seconds_exact=exact.seconds,
        seconds_cached=cached.seconds,
    )
    pe, pc = predictions(plan, exact), predictions(plan, cached)
    scored = [i for i, r in enumerate(plan.rows) if r.kind in ("choice1", "choiceN", "text")]
    if scored:
        res.agreement = float(np.mean([pe[i] == pc[i] for i in scored]))
    choice = [i for i, r in enumerate(plan.rows) if r.answer is not None]
    if choice:
        res.accuracy_baseline = float(np.mean([pe[i] == plan.rows[i].answer for i in choice]))
        res.accuracy_cached = float(np.mean([pc[i] == plan.rows[i].answer for i in choice]))
    if exact.embeddings is not None:
        cos = (exact.embeddings * cached.embeddings).sum(-1)
        res.cosine_to_exact_mean = float(cos.mean())
        res.cosine_to_exact_min = float(cos.min())
        res.cosine_to_exact_p01 = float(np.quantile(cos, 0.01))
        pairs = [r for r in plan.rows if r.kind == "pair"]
        if pairs:
            labels = np.array([r.label for r in pairs])
            se = np.array(
                [float(exact.embeddings[r.seqs[0]] @ exact.embeddings[r.seqs[1]]) for r in pairs]
            )
            sc = np.array(
                [float(cached.embeddings[r.seqs[0]] @ cached.embeddings[r.seqs[1]]) for r in pairs]
            )
            res.pair_auc_exact = auc(se, labels)
            res.pair_auc_cached = auc(sc, labels)
    return res
