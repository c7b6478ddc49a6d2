"""Whole-workload passes, each at its best batch size: the baseline users run against attncache.

Plain SDPA is timed over the same sequences at every batch size (as memory allows) and its best is
the baseline; attncache (the exact tiers and the map cache, no memo) is timed the same way at its
own sizes. The two best configurations (and attncache's single tiers, for attribution) are then
timed again in interleaved order (medians). Every tiered pass starts from an empty prefix tree,
or from the one a ``--prefix-dir`` holds (a warm start, reported as such).

With a map DB, the same attncache pass is also timed as its *in-RAM bound*: the hits a looked-up
pass found, replayed batch by batch with their maps already in memory and no lookup (features,
search, fetch and decode left out). ``workload_fraction_of_bound`` is what the real pass keeps of
it, at the same batch size (the per-item bound of ``items.py`` is at batch 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..runtime import Policy, PreloadedMaps, RecordedHits, RecordingHits, read_maps
from ..tasks import Plan, RunOptions, Tiers, run
from ..workflows import Session
from .harness import interleaved

BATCH_SIZES = (1, 4, 8, 16, 32)
BOUND_BYTES = 4 << 30  # the in-RAM bound preloads every hit's maps: skipped beyond this


@dataclass
class WorkloadOptions:
    """How whole passes are timed: each variant at each of ``batch_sizes``, ``repeats`` passes."""

    batch_sizes: tuple[int, ...] = BATCH_SIZES
    repeats: int = 3
    prefix_bytes: int | None = None  # the prefix tier's cap (None: no prefix tier)
    # a kept prefix tree (``TierFolder.read``): every attncache pass starts from it (a warm
    # start), not from an empty tree
    warm: dict[str, torch.Tensor] | None = None
    bound: bool = True  # with maps, time the in-RAM bound too


def time_workload(
    s: Session, plan: Plan, pol: Policy | None, threshold: float | None, opts: WorkloadOptions
) -> dict:
    """Plain SDPA at its best batch size against attncache at its own, whole passes over
    ``plan``, interleaved; ``pol``/``threshold``: the map cache's setting (None: no maps)."""
    batch_sizes, repeats, prefix_bytes = opts.batch_sizes, opts.repeats, opts.prefix_bytes
    warm, bound = opts.warm, opts.bound
    model, tok = s.model, s.tokenizer
    has_prefix = s.prefix_tier(prefix_bytes) is not None
    has_maps = s.cache is not None and pol is not None

    def plain(batch: int):
        def fn(_i: int) -> dict:
            return {
                "e2e": run(model, tok, plan, RunOptions(batch_size=batch, progress=False)).seconds
            }

        return fn

    def tiered(batch: int, maps: bool, prefix: bool, hits=None, preloaded=None):
        """``hits``: given the attachment's lookup, the hit source to use instead
        (``RecordingHits``, ``RecordedHits``); ``preloaded``: maps in memory by (entry, layer,
        length)."""

        def fn(_i: int) -> dict:
            tier = s.prefix_tier(prefix_bytes) if prefix else None
            if tier is not None and warm is not None:
                tier.restore(warm)
            ctx = s.cache.attach(model, pol, threshold) if maps else contextlib.nullcontext()
            if hits is not None:
                ctx.hits = hits(ctx.hits)
            if preloaded is not None:
                ctx.maps = PreloadedMaps(s.cache.db, preloaded)
            with ctx as att:
                out = run(
                    model,
                    tok,
                    plan,
                    RunOptions(batch_size=batch, progress=False),
                    tiers=Tiers(attached=att, prefix=tier),
                )
            if tier is not None:
                reports["prefix"] = tier.report()
            return {"e2e": out.seconds}

        return fn

    def in_ram_bound(batch: int) -> tuple[Callable[[int], dict] | None, str | None]:
        """The attncache pass at ``batch`` replaying the hits one looked-up pass found, their maps
        preloaded; else None and why not."""
        assert s.cache is not None and pol is not None
        recorder: list[RecordingHits] = []

        def record(lookup):
            recorder.append(RecordingHits(lookup))
            return recorder[0]

        tiered(batch, True, has_prefix, hits=record)(0)
        batches = recorder[0].batches
        hits = {h for b in batches for h in b if h is not None}
        layers = [x for x in pol.layers if x in s.cache.store.layer_pos]
        heads = s.cache.shape.n_heads
        if not hits:  # e.g. every input ran over a shared prefix, where maps do not apply
            return None, "the pass found no map hits"
        if sum(len(layers) * heads * h.length**2 * 4 for h in hits) > BOUND_BYTES:
            return None, f"its hits' maps exceed {BOUND_BYTES >> 30} GiB"
        maps = read_maps(s.cache.db, hits, layers)
        return tiered(batch, True, has_prefix, lambda _: RecordedHits(batches), maps), None

    reports: dict = {}
    sizes = sorted({b for b in batch_sizes if b <= max(1, len(plan.seqs))} or {1})
    screen_sdpa: dict[int, float] = {}
    screen_ours: dict[int, float] = {}
    for b in sizes:
        try:
            screen_sdpa[b] = plain(b)(0)["e2e"]
            screen_ours[b] = tiered(b, has_maps, has_prefix)(0)["e2e"]
        except (RuntimeError, MemoryError):  # out of memory: larger batches will not fit either
            break
    best_sdpa = min(screen_sdpa, key=screen_sdpa.get)
    best_ours = min(screen_ours, key=screen_ours.get)
    variants = {"sdpa_best": plain(best_sdpa), "ours": tiered(best_ours, has_maps, has_prefix)}
    if best_ours != best_sdpa:
        variants["sdpa_same"] = plain(best_ours)
    if has_maps and has_prefix:
        variants["map_only"] = tiered(best_ours, True, False)
        variants["prefix_only"] = tiered(best_ours, False, True)
    if not has_maps:
        in_ram, no_bound = None, "no map DB"
    elif not bound:
        in_ram, no_bound = None, "--no-bound"
    else:
        in_ram, no_bound = in_ram_bound(best_ours)
    if in_ram is not None:
        variants["bound"] = in_ram
    t = {k: v["e2e"][0] for k, v in interleaved(variants, 1, repeats, 0).items()}
    same = t.get("sdpa_same", t["sdpa_best"])
    prefix = reports.get("prefix", {})
    return {
        "best_sdpa_batch_size": best_sdpa,
        "workload_seconds_best_sdpa": t["sdpa_best"],
        "workload_batch_size": best_ours,
        "workload_seconds": t["ours"],
        "workload_speedup_vs_best_sdpa": t["sdpa_best"] / t["ours"],
        "workload_speedup_vs_sdpa": same / t["ours"],  # plain SDPA at attncache's batch size
        "workload_speedup_map_only": same / t["map_only"] if "map_only" in t else None,
        "workload_speedup_prefix_only": same / t["prefix_only"] if "prefix_only" in t else None,
        # the same pass with its hits' maps in RAM and no lookup, and what the real pass keeps
        "workload_seconds_bound": t.get("bound"),
        "workload_bound_speedup_vs_sdpa": same / t["bound"] if "bound" in t else None,
        "workload_fraction_of_bound": t["bound"] / t["ours"] if "bound" in t else None,
        "workload_bound_skipped": no_bound,  # why there is no bound (None: there is one)
        "screening_seconds_sdpa": screen_sdpa,
        "screening_seconds_attncache": screen_ours,
        "workload_tokens": sum(len(x) for x in plan.seqs),
        "workload_sequences": len(plan.seqs),
        "prefix_cache": has_prefix,
        "prefix_tokens_reused_fraction": prefix.get("prefix_tokens_reused_fraction", 0.0),
        "prefix_bytes_peak": prefix.get("prefix_bytes_peak", 0),
        "prefix_bytes_cap": prefix_bytes if has_prefix else 0,
        "prefix_warm_start": warm is not None,  # passes started from a kept tree (--prefix-dir)
        "pass_repeats": repeats,
    }
