"""The job's ledger: workers report what they did; the driver commits it once at the end.

A DB has one writer at a time. Workers therefore never commit: after each call an actor hands its
new memo answers, the map hits it counted and its prefix-tier token counts to this one collector (a
Ray actor), and the driver commits the answers and counts in one go when the job ends, so nothing is
lost to a lock another actor held, and nothing is committed twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..db.usage import UsageCounter
from ..tiers.memo import ResultMemo


@dataclass
class WorkerReport:
    """One call's worth of a worker's results for the ledger."""

    memo: dict[str, np.ndarray] | None = None  # ``ResultMemo.to_arrays`` of the new answers
    usage: dict[int, list[float]] = field(default_factory=dict)  # uid -> [hits, last use]
    tokens_total: int = 0  # prefix tier: tokens of every input it was given
    tokens_run: int = 0  # ... and tokens that went through the model


@dataclass
class LedgerTotals:
    memo: dict[str, np.ndarray] | None
    usage: dict[int, list[float]]
    tokens_total: int
    tokens_run: int
    reports: int

    @property
    def prefix_tokens_reused_fraction(self) -> float:
        saved = self.tokens_total - self.tokens_run
        return saved / self.tokens_total if self.tokens_total else 0.0


class Ledger:
    def __init__(self) -> None:
        self.memo = ResultMemo()
        self.usage = UsageCounter()
        self.tokens_total = 0
        self.tokens_run = 0
        self.reports = 0

    def add(self, report: WorkerReport) -> None:
        if report.memo is not None:
            self.memo.merge(ResultMemo.from_arrays(report.memo))
        self.usage.add(report.usage)
        self.tokens_total += report.tokens_total
        self.tokens_run += report.tokens_run
        self.reports += 1

    def totals(self) -> LedgerTotals:
        memo = self.memo.to_arrays() if len(self.memo) else None
        usage = self.usage.take()
        return LedgerTotals(memo, usage, self.tokens_total, self.tokens_run, self.reports)
