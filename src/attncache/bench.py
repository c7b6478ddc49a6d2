"""The timing harness behind ``attncache bench``.

Every item (one model input, batch 1) is timed under each variant in interleaved order (sdpa,
cached, bound, eager, sdpa, cached, ...) after warm-up; each figure is the median over repeats. Time
inside the attention modules is measured with forward hooks on the same calls.

Variants:
- ``sdpa``: the untouched model (the baseline a user has today);
- ``eager``: the untouched model with eager attention (the paper's baseline, for reference);
- ``cached``: the attached cache: lookup, fetch and replay all inside the timed region;
- ``bound``: the same replay with the hit's maps already converted in memory and no lookup — the
  ceiling of the method on this machine.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .inputs import collate
from .runtime import Attachment, MapStats, PreloadedMaps, PresetHits
from .tasks import run as run_plan
from .tiers import DEFAULT_PREFIX_BYTES
from .workflows import Session


@dataclass
class BenchConfig:
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    eager: bool = True
    max_items: int = 24  # rows, when no --limit is given
    pass_repeats: int = 3  # whole-workload passes per variant
    batch_size: int = 1  # of the workload passes (per-item timings are always batch 1)
    quantize: str | None = None
    max_tokens: int | None = None
    prefix_bytes: int | None = DEFAULT_PREFIX_BYTES  # None: no prefix tier
    device: str = "cpu"
    dtype: str = "float32"


def interleaved(
    variants: dict[str, Callable[[int], dict[str, float] | None]],
    n_items: int,
    repeats: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[str, list[float]]]:
    """Per variant and measure, the median per item, timing the variants in turn (A B A B ...).

    A variant may return its own measures (e.g. ``{"e2e": s, "attn": s}``); otherwise the call is
    timed here as ``e2e`` with ``clock``.
    """
    samples: dict[str, dict[str, list[list[float]]]] = {k: {} for k in variants}
    for i in range(n_items):
        for _ in range(warmup):
            for fn in variants.values():
                fn(i)
        for _ in range(repeats):
            for name, fn in variants.items():
                t0 = clock()
                got = fn(i)
                got = got if got is not None else {"e2e": clock() - t0}
                for measure, v in got.items():
                    samples[name].setdefault(measure, [[] for _ in range(n_items)])[i].append(v)
    return {
        k: {m: [statistics.median(x) for x in per] for m, per in v.items()}
        for k, v in samples.items()
    }


class AttentionTimer:
    """Accumulates wall time spent inside the given modules (forward pre/post hooks)."""

    def __init__(self, modules, sync: bool = False):
        self.sync = sync  # on a GPU, wait for the queued kernels so the hooks time the work itself
        self.total = 0.0
        self._t0 = 0.0
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, *_):
        if self.sync:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def _post(self, *_):
        if self.sync:
            torch.cuda.synchronize()
        self.total += time.perf_counter() - self._t0

    def remove(self):
        for h in self._handles:
            h.remove()


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = "cpu"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": dev,
    }


def _ratio(num: list[float], den: list[float]) -> float | None:
    return sum(num) / sum(den) if num and sum(den) > 0 else None


@torch.no_grad()
def bench(
    db: str,
    data: str,
    policy: str | None = "all",
    limit: int | None = None,
    cfg: BenchConfig | None = None,
    model_name: str | None = None,
    progress: bool = True,
    threshold: float | None = None,
) -> dict:
    cfg = cfg or BenchConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    s = Session.open(
        db, model_name, cfg.quantize, cfg.max_tokens, device=cfg.device, dtype=cfg.dtype
    )
    cache, model, tok = s.cache, s.model, s.tokenizer
    plan = s.plan(data, limit or cfg.max_items, quiet=not progress)
    seqs = plan.seqs
    causal = cache.adapter.causal
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    inputs = [collate([q], pad, causal, device) for q in seqs]
    kw = {"logits_to_keep": 1} if causal else {}
    pol = cache.policy(policy)
    attn_modules = cache.adapter.attention_modules(model)
    base_impl = model.config._attn_implementation

    # Which items hit (and which reuse anything: template heads serve misses too), and the hits'
    # maps
    # preloaded for the bound variant.
    hits, reused = [], []
    with cache.attach(model, pol, threshold) as att:
        for x in inputs:
            model(**x, **kw)
            hits.append(att.last_hits[0])
            reused.append(att.last_reused[0])
    preloaded = {}
    for h in hits:
        if h is not None:
            for layer in pol.layers:
                if layer in cache.store.layer_pos:
                    preloaded[(h.entry, layer, h.length)] = cache.fetch(
                        h.entry, layer, h.length
                    ).clone()

    def bound_ctx(i: int) -> Attachment:
        """The same replay with no lookup and the hit's maps already in memory: the method's
        ceiling."""
        return Attachment(
            model,
            cache.adapter,
            cache.shape,
            pol,
            PresetHits([hits[i]]),
            PreloadedMaps(cache.db, preloaded),
            cache.templates,
            MapStats(),
            cache.store.layout.layers,
            cache.threshold,
        )

    lookup_ms: list[float] = []
    fetch_ms: list[float] = []

    def variant(ctx_factory, impl: str = base_impl):
        def fn(i: int) -> dict[str, float]:
            if model.config._attn_implementation != impl:
                model.set_attn_implementation(impl)
            timer = AttentionTimer(attn_modules)
            try:
                with ctx_factory(i):
                    t0 = time.perf_counter()
                    model(**inputs[i], **kw)
                    dt = time.perf_counter() - t0
            finally:
                timer.remove()
            return {"e2e": dt, "attn": timer.total}

        return fn

    @contextlib.contextmanager
    def cached_ctx(i):
        before = cache.stats.as_dict()
        with cache.attach(model, pol, threshold):
            yield
        after = cache.stats.as_dict()
        lookup_ms.append(1000 * (after["lookup_s"] - before["lookup_s"]))
        if hits[i] is not None:
            fetch_ms.append(1000 * (after["fetch_s"] - before["fetch_s"]))

    variants = {
        "sdpa": variant(lambda i: contextlib.nullcontext()),
        "cached": variant(cached_ctx),
        "bound": variant(bound_ctx),
    }
    if cfg.eager:
        variants["eager"] = variant(lambda i: contextlib.nullcontext(), impl="eager")
    try:
        timed = interleaved(variants, len(inputs), cfg.repeats, cfg.warmup)
    finally:
        model.set_attn_implementation(base_impl)
    med = {k: v["e2e"] for k, v in timed.items()}
    attn = {k: v["attn"] for k, v in timed.items()}
    workload = _workload_passes(s, plan, pol, threshold, cfg)

    H = [i for i, r in enumerate(reused) if r]  # the items the per-item ratios are over

    def pick(xs, idx):
        return [xs[i] for i in idx]

    res = {
        "dtype": str(next(model.parameters()).dtype).replace("torch.", "")
        if cfg.quantize is None
        else "int8-dynamic",
        "n": len(inputs),
        "n_hits": sum(h is not None for h in hits),
        "hit_rate": sum(h is not None for h in hits) / len(inputs) if inputs else 0.0,
        "n_reused": len(H),
        "policy": pol.name,
        "reused_layers": pol.head_maps(cache.store.layer_pos),  # per hit
        "template_layers": pol.fixed_maps(),  # per item, no lookup
        "threshold": cache.threshold if threshold is None else threshold,
        "repeats": cfg.repeats,
        "tokens_median": statistics.median(len(q) for q in seqs),
        "attn_speedup_vs_sdpa": _ratio(pick(attn["sdpa"], H), pick(attn["cached"], H)),
        "attn_speedup_vs_eager": _ratio(pick(attn["eager"], H), pick(attn["cached"], H))
        if cfg.eager
        else None,
        "e2e_speedup_vs_sdpa": _ratio(pick(med["sdpa"], H), pick(med["cached"], H)),
        "e2e_speedup_vs_eager": _ratio(pick(med["eager"], H), pick(med["cached"], H))
        if cfg.eager
        else None,
        **workload,
        "bound_e2e_speedup": _ratio(pick(med["sdpa"], H), pick(med["bound"], H)),
        "lookup_ms_median": statistics.median(lookup_ms) if lookup_ms else None,
        "fetch_ms_median": statistics.median(fetch_ms) if fetch_ms else None,
        "prefill_ms_median_sdpa": 1000 * statistics.median(med["sdpa"]),
        "prefill_ms_median_cached": 1000 * statistics.median(med["cached"]),
        "machine": machine(),
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
    e2e, bound = res["e2e_speedup_vs_sdpa"], res["bound_e2e_speedup"]
    res["fraction_of_bound"] = e2e / bound if e2e and bound else None
    if res["lookup_ms_median"] is not None and res["prefill_ms_median_sdpa"]:
        res["lookup_fetch_share_of_prefill"] = (
            res["lookup_ms_median"] + (res["fetch_ms_median"] or 0.0)
        ) / res["prefill_ms_median_sdpa"]
    return res


def _workload_passes(s: Session, plan, pol, threshold, cfg: BenchConfig) -> dict:
    """Whole-workload passes at batch 1 (lookups, fetches, prefix matching and insertion all timed),
    interleaved per repeat; each tiered pass starts from an empty prefix tree."""
    model, tok, cache = s.model, s.tokenizer, s.cache
    stats = {}

    def one(use_map: bool, use_prefix: bool):
        def fn(_i: int):
            prefix = s.prefix_tier(cfg.prefix_bytes) if use_prefix else None
            ctx = cache.attach(model, pol, threshold) if use_map else contextlib.nullcontext()
            with ctx as att:
                out = run_plan(
                    model,
                    tok,
                    plan,
                    batch_size=cfg.batch_size,
                    attached=att,
                    progress=False,
                    prefix=prefix,
                )
            if prefix is not None:
                stats["prefix"] = prefix.report()
            return {"e2e": out.seconds}

        return fn

    variants = {"sdpa": one(False, False), "map": one(True, False)}
    has_prefix = s.prefix_tier(cfg.prefix_bytes) is not None
    if has_prefix:
        variants["prefix"] = one(False, True)
        variants["both"] = one(True, True)
    t = {k: v["e2e"][0] for k, v in interleaved(variants, 1, cfg.pass_repeats, 1).items()}
    best = "both" if has_prefix else "map"
    return {
        "workload_speedup_vs_sdpa": t["sdpa"] / t[best],
        "workload_speedup_map_only": t["sdpa"] / t["map"],
        "workload_speedup_prefix_only": t["sdpa"] / t["prefix"] if has_prefix else None,
        "workload_seconds_sdpa": t["sdpa"],
        "workload_batch_size": cfg.batch_size,
        "prefix_cache": has_prefix,
        "prefix_tokens_reused_fraction": stats.get("prefix", {}).get(
            "prefix_tokens_reused_fraction", 0.0
        ),
        "prefix_bytes_peak": stats.get("prefix", {}).get("prefix_bytes_peak", 0),
        "prefix_bytes_cap": cfg.prefix_bytes if has_prefix else 0,
    }
