"""``attncache bench``: what the tiers buy on a workload against plain SDPA at its best batch size,
and (with a map DB) what map reuse buys per item. Performance claims live here, never in tests."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import models
from ..db.tier_store import INDEX
from ..errors import UserError
from ..tiers import DEFAULT_PREFIX_BYTES
from ..workflows import Session, SessionOptions
from .harness import AttentionTimer, interleaved, machine
from .items import ItemTiming, time_items
from .workload import BATCH_SIZES, WorkloadOptions, time_workload

__all__ = ["AttentionTimer", "BenchConfig", "bench", "interleaved", "machine"]


@dataclass
class BenchConfig:
    repeats: int = 5  # timed runs per item and variant (per-item timing)
    warmup: int = 1
    threads: int | None = None
    eager: bool = True
    max_items: int = 24  # rows, when no --limit is given
    pass_repeats: int = 3  # whole-workload passes per variant
    batch_sizes: tuple[int, ...] = BATCH_SIZES  # tried for plain SDPA and for attncache
    per_item: bool = True  # the map mechanism per item (needs a DB)
    bound: bool = True  # the workload pass with its hits' maps in RAM and no lookup (needs a DB)
    quantize: str | None = None
    max_tokens: int | None = None
    prefix_bytes: int | None = DEFAULT_PREFIX_BYTES  # None: no prefix tier
    prefix_dir: str | None = None  # attncache's passes start from the prefix K/V kept here
    device: str = "cpu"
    dtype: str = "float32"


@torch.no_grad()
def bench(
    db: str | None,
    data: str,
    policy: str | None = "default",
    limit: int | None = None,
    cfg: BenchConfig | None = None,
    model_name: str | None = None,
    progress: bool = True,
    threshold: float | None = None,
) -> dict:
    """Time DATA's workload (and, with a DB, its items). ``db`` None: the exact tiers of
    ``model_name``."""
    cfg = cfg or BenchConfig()
    kept = cfg.prefix_dir
    if kept is not None and not (Path(kept) / INDEX).is_file():  # before the model loads
        raise UserError(
            f"--prefix-dir '{kept}' holds no kept prefixes: run 'attncache eval ... "
            f"--prefix-dir {kept}' first (bench only reads it)"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    s = Session.open(
        db,
        model_name,
        SessionOptions(
            device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize, max_tokens=cfg.max_tokens
        ),
    )
    plan = s.plan(data, limit or cfg.max_items, quiet=not progress)
    pol = s.cache.policy(policy) if s.cache is not None else None
    res: dict = {
        "dtype": s.dtype,
        "device": s.device,
        "n": len(plan.seqs),
        "rows": len(plan.rows),
        "policy": pol.name if pol else "exact tiers only (no DB)",
        "threshold": (s.cache.threshold if threshold is None else threshold) if s.cache else None,
        "repeats": cfg.repeats,
        "tokens_median": statistics.median(len(q) for q in plan.seqs),
    }
    if pol is not None:
        res["reused_layers"] = pol.head_maps(s.cache.store.layer_pos)  # per hit
        res["template_layers"] = pol.fixed_maps()  # per item, no lookup
    folder = s.tier_folder(kept, cfg.prefix_bytes)
    warm = s.kept_prefix(folder)  # read once, for every pass
    if folder is not None and warm is None:
        raise UserError(
            f"--prefix-dir '{kept}' holds no prefix K/V computed in {models.numerics(s.model)} "
            "(only answers, or K/V of other numerics)"
        )
    timing = WorkloadOptions(cfg.batch_sizes, cfg.pass_repeats, cfg.prefix_bytes, warm, cfg.bound)
    res.update(time_workload(s, plan, pol, threshold, timing))
    if s.cache is not None:
        # each entry's crc32 is checked on its first use in a process (a damaged one is never
        # replayed): that one-time cost, against one workload pass at the best batch size
        spent = s.cache.store.check_seconds
        res["entry_check_seconds"] = spent
        if res.get("workload_seconds"):
            res["entry_check_fraction_of_pass"] = spent / res["workload_seconds"]
    if cfg.per_item and pol is not None:
        timing = ItemTiming(cfg.repeats, cfg.warmup, cfg.eager)
        res.update(time_items(s, plan.seqs, pol, threshold, timing))
    res["machine"] = machine()
    return res
