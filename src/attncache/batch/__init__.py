"""Scale-out: a Ray Data batch job over DATA with the exact tiers (and a map DB) in every actor.

- ``job.py``: the driver: rows ordered so that a shared prompt's rows are neighbours, an actor pool
  (one GPU each with ``device="cuda"``, bounded restarts), the output in input order, and at the end
  one commit of the workers' new memo answers and usage counts;
- ``worker.py``: one per actor: the model and DB opened once, the prefix tree kept across calls;
  ``predict_rows`` is the same work in one process;
- ``ledger.py``: the job's one collector (a Ray actor) of what only one process may commit.

Ray is an optional extra: ``pip install 'attncache[ray]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .job import BatchOptions, run_batch
    from .worker import predict_rows


def __getattr__(name: str):  # lazy: a reader task imports ``reading`` alone, without torch
    if name in ("BatchOptions", "run_batch"):
        from . import job

        return getattr(job, name)
    if name == "predict_rows":
        from .worker import predict_rows

        return predict_rows
    raise AttributeError(f"module 'attncache.batch' has no attribute {name!r}")


__all__ = ["BatchOptions", "predict_rows", "run_batch"]
