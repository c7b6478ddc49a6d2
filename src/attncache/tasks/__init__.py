"""Rows -> sequences -> scores -> metrics."""

from .metrics import Comparison, auc, choice_scores, compare, predictions, row_prediction
from .plan import Plan, Query, RowPlan, plan_rows, require_rows
from .run import RunOptions, RunOutput, Tiers, mix, run

__all__ = [
    "Comparison",
    "Plan",
    "Query",
    "RowPlan",
    "RunOptions",
    "RunOutput",
    "Tiers",
    "auc",
    "choice_scores",
    "compare",
    "mix",
    "plan_rows",
    "predictions",
    "require_rows",
    "row_prediction",
    "run",
]
