"""The cheap pass, verified by margin: answer in a cheaper precision, recompute in the exact one
every row the cheaper numbers might have decided differently.

A row's decision changes only if the gap between its winner and some other choice moves by more
than its *margin* (best minus runner-up, in the task's own scoring: ``choice_scores``, the
log-likelihood per character of a continuation or the next token's log-probability). So a row
whose cheap margin is above the largest gap movement the cheap precision makes keeps its answer;
the others rerun exactly. The movement is measured on held-out rows where both passes ran
(``calibrate_gate``): the rows alternate, one half *chooses* the threshold (the largest gap
movement there), the other half *verifies* it, and the Clopper-Pearson upper bound on changed
answers on the verifying half is the gate's bound.

Nothing computed in the cheap precision is ever taken for an exact answer: the cheap pass's memo
answers are keyed by its own numerics (``models.numerics``), its prefix K/V live in a tree of their
own, and the merged output is never written to a memo.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from ..stats import binom_upper
from .metrics import choice_scores, predictions
from .plan import Plan, RowPlan
from .run import RunOptions, RunOutput, Tiers, run


def row_margin(r: RowPlan, out: RunOutput) -> float:
    """Best minus runner-up score of a choice row (inf with one choice: nothing to decide);
    0 for text rows, whose runner-up token is not kept: they always rerun."""
    if r.kind not in ("choice1", "choiceN"):
        return 0.0
    scores = sorted(choice_scores(r, out), reverse=True)
    return scores[0] - scores[1] if len(scores) > 1 else math.inf


def score_movement(r: RowPlan, a: RunOutput, b: RunOutput) -> float:
    """How far the second pass moved the gaps between the first pass's winner and every other
    choice of a row (inf for text rows: their decision is a token, not a score). A row whose
    margin in ``a`` exceeds it has the same winner in ``b``; the gaps move less than the scores
    do, a prompt's rounding shifting every choice's score alike."""
    if r.kind not in ("choice1", "choiceN"):
        return math.inf
    sa, sb = choice_scores(r, a), choice_scores(r, b)
    w = int(np.argmax(sa))
    return max(abs((sa[w] - x) - (sb[w] - y)) for x, y in zip(sa, sb, strict=True))


@dataclass(frozen=True)
class MarginGate:
    """A calibrated threshold: rows whose cheap margin is below it rerun exactly."""

    threshold: float
    bound: float  # one-sided Clopper-Pearson upper bound on changed answers (verifying rows)
    changed: int  # verifying rows whose answer changed although their margin passed
    verify_rows: int
    choose_rows: int
    fallback_share: float  # of the verifying rows: the share that reran exactly
    max_loss: float
    confidence: float

    @property
    def holds(self) -> bool:
        return self.bound <= self.max_loss

    def as_dict(self) -> dict:
        return {**self.__dict__, "holds": self.holds}


def calibrate_gate(
    plan: Plan, cheap: RunOutput, exact: RunOutput, max_loss: float, confidence: float = 0.95
) -> MarginGate:
    """The threshold chosen on every other row of ``plan`` (both passes over it), its bound on
    changed answers measured on the rows between them."""
    rows = [i for i, r in enumerate(plan.rows) if r.kind in ("choice1", "choiceN", "text")]
    choose, verify = rows[0::2], rows[1::2]
    moved = [score_movement(plan.rows[i], cheap, exact) for i in choose]
    finite = [m for m in moved if math.isfinite(m)]
    threshold = max(finite) if finite else math.inf
    pc, pe = predictions(plan, cheap), predictions(plan, exact)
    margin = {i: row_margin(plan.rows[i], cheap) for i in verify}
    passed = [i for i in verify if margin[i] >= threshold]
    changed = sum(pc[i] != pe[i] for i in passed)
    return MarginGate(
        threshold=threshold,
        bound=binom_upper(changed, len(verify), confidence) if verify else 1.0,
        changed=changed,
        verify_rows=len(verify),
        choose_rows=len(choose),
        fallback_share=1 - len(passed) / len(verify) if verify else 1.0,
        max_loss=max_loss,
        confidence=confidence,
    )


@dataclass
class Precision:
    """One precision's model and the tiers it runs with (its own prefix tree and memo)."""

    model: nn.Module
    tiers: Tiers


@dataclass
class Verified:
    out: RunOutput  # cheap answers where the margin passed, exact ones elsewhere
    reran: list[int]  # rows that reran exactly
    rows: int  # rows the cheap pass answered
    cheap_seconds: float
    exact_seconds: float

    @property
    def fallback_share(self) -> float:
        return len(self.reran) / self.rows if self.rows else 0.0


def run_verified(
    tokenizer, plan: Plan, cheap: Precision, exact: Precision, threshold: float, opts: RunOptions
) -> Verified:
    """Every sequence in the cheap precision; then the sequences of rows whose margin is under
    ``threshold`` again in the exact one, their answers replacing the cheap ones. With
    ``opts.seq_ids``, only those sequences run (``opts.into`` holds the others' answers) and only
    rows with one of them are verified and counted."""
    first = run(cheap.model, tokenizer, plan, opts, cheap.tiers)
    todo = None if opts.seq_ids is None else set(opts.seq_ids)
    answered = [i for i, r in enumerate(plan.rows) if todo is None or todo.intersection(r.seqs)]
    reran = [i for i in answered if row_margin(plan.rows[i], first) < threshold]
    seqs = sorted({q for i in reran for q in plan.rows[i].seqs})
    merged = copy.deepcopy(first)
    merged.seconds = 0.0
    if seqs:
        again = RunOptions(
            batch_size=opts.batch_size,
            progress=opts.progress,
            desc="verify",
            seq_ids=seqs,
            into=merged,
            greedy=opts.greedy,
        )
        run(exact.model, tokenizer, plan, again, exact.tiers)
    exact_seconds = merged.seconds
    merged.seconds = first.seconds + exact_seconds
    return Verified(merged, reran, len(answered), first.seconds, exact_seconds)
