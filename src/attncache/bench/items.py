"""The map mechanism per item (batch 1): hits timed against SDPA, eager, and the method's ceiling.

Every item (one model input) is timed under each variant in interleaved order (sdpa, cached, bound,
eager, sdpa, ...) after warm-up; each figure is the median over repeats. Time inside the attention
modules is measured with hooks on the same calls.

- ``sdpa``: the untouched model (the baseline a user has today);
- ``eager``: the untouched model with eager attention (the paper's baseline, for reference);
- ``cached``: the attached cache: lookup, fetch and replay all inside the timed region;
- ``bound``: the same replay with the hit's maps already in memory and no lookup: the ceiling.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

from ..inputs import collate
from ..runtime import Attachment, MapStats, Policy, PreloadedMaps, PresetHits, read_maps
from ..workflows import Session
from .harness import AttentionTimer, interleaved, ratio_of


@dataclass(frozen=True)
class ItemTiming:
    repeats: int  # timed runs per item and variant
    warmup: int
    eager: bool  # also time the untouched model with eager attention (the paper's baseline)


@torch.no_grad()
def time_items(
    s: Session, seqs: list[list[int]], pol: Policy, threshold: float | None, timing: ItemTiming
) -> dict:
    cache, model, tok = s.cache, s.model, s.tokenizer
    causal = cache.adapter.causal
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    inputs = [collate([q], pad, causal, device) for q in seqs]
    kw = {"logits_to_keep": 1} if causal else {}
    modules = cache.adapter.attention_modules(model)
    base_impl = model.config._attn_implementation
    # which items hit (and which reuse anything: template heads serve misses too), and the hits'
    # maps preloaded for the bound variant
    hits, reused = [], []
    with cache.attach(model, pol, threshold) as att:
        for x in inputs:
            model(**x, **kw)
            hits.append(att.last_hits[0])
            reused.append(att.last_reused[0])
    preloaded = read_maps(cache.db, hits, (x for x in pol.layers if x in cache.store.layer_pos))

    def bound(i: int) -> Attachment:
        return Attachment(
            model,
            cache.parts(stats=MapStats()),
            pol,
            PresetHits([hits[i]]),
            PreloadedMaps(cache.db, preloaded),
        )

    lookup_ms: list[float] = []
    fetch_ms: list[float] = []

    @contextlib.contextmanager
    def cached(i: int):
        before = cache.stats.as_dict()
        with cache.attach(model, pol, threshold):
            yield
        after = cache.stats.as_dict()
        lookup_ms.append(1000 * (after["lookup_s"] - before["lookup_s"]))
        if hits[i] is not None:
            fetch_ms.append(1000 * (after["fetch_s"] - before["fetch_s"]))

    def variant(ctx, impl: str = base_impl):
        def fn(i: int) -> dict[str, float]:
            if model.config._attn_implementation != impl:
                model.set_attn_implementation(impl)
            timer = AttentionTimer(modules)
            try:
                with ctx(i):
                    t0 = time.perf_counter()
                    model(**inputs[i], **kw)
                    dt = time.perf_counter() - t0
            finally:
                timer.remove()
            return {"e2e": dt, "attn": timer.total}

        return fn

    variants = {
        "sdpa": variant(lambda i: contextlib.nullcontext()),
        "cached": variant(cached),
        "bound": variant(bound),
    }
    if timing.eager:
        variants["eager"] = variant(lambda i: contextlib.nullcontext(), impl="eager")
    try:
        timed = interleaved(variants, len(inputs), timing.repeats, timing.warmup)
    finally:
        model.set_attn_implementation(base_impl)
    med = {k: v["e2e"] for k, v in timed.items()}
    attn = {k: v["attn"] for k, v in timed.items()}
    used = [i for i, r in enumerate(reused) if r]  # the items the per-item ratios are over

    def pick(xs):
        return [xs[i] for i in used]

    e2e = ratio_of(pick(med["sdpa"]), pick(med["cached"]))
    ceiling = ratio_of(pick(med["sdpa"]), pick(med["bound"]))
    res = {
        "n_hits": sum(h is not None for h in hits),
        "hit_rate": sum(h is not None for h in hits) / len(inputs) if inputs else 0.0,
        "n_reused": len(used),
        "attn_speedup_vs_sdpa": ratio_of(pick(attn["sdpa"]), pick(attn["cached"])),
        "attn_speedup_vs_eager": ratio_of(pick(attn["eager"]), pick(attn["cached"]))
        if timing.eager
        else None,
        "e2e_speedup_vs_sdpa": e2e,
        "e2e_speedup_vs_eager": ratio_of(pick(med["eager"]), pick(med["cached"]))
        if timing.eager
        else None,
        "bound_e2e_speedup": ceiling,
        "fraction_of_bound": e2e / ceiling if e2e and ceiling else None,
        "lookup_ms_median": statistics.median(lookup_ms) if lookup_ms else None,
        "fetch_ms_median": statistics.median(fetch_ms) if fetch_ms else None,
        "prefill_ms_median_sdpa": 1000 * statistics.median(med["sdpa"]),
        "prefill_ms_median_cached": 1000 * statistics.median(med["cached"]),
        "per_item": [
            {
                "tokens": len(seqs[i]),
                "hit": hits[i] is not None,
                "reused": reused[i],
                "sdpa_ms": 1000 * med["sdpa"][i],
                "cached_ms": 1000 * med["cached"][i],
                "bound_ms": 1000 * med["bound"][i],
            }
            for i in range(len(inputs))
        ],
    }
    if res["lookup_ms_median"] is not None and res["prefill_ms_median_sdpa"]:
        res["lookup_fetch_share_of_prefill"] = (
            res["lookup_ms_median"] + (res["fetch_ms_median"] or 0.0)
        ) / res["prefill_ms_median_sdpa"]
    return res
