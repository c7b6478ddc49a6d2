"""Replay: the attention forward of an attached model.

Per forward (one batch), the model pre-hook asks the cache for a hit per item. Then in each layer:

- items that hit *and* whose policy allows this layer: ``out = o_proj(A_cached @ v_proj(h))``; the Q and
  K projections, rotary embedding and QK^T/softmax never run for them;
- every other item: the module's original forward (SDPA by default) on that sub-batch, unchanged.

Padding: only the real-token block ``[s:e, s:e]`` of a padded item carries the map; padded rows get
zero heads (they are never attended to by real tokens, since the mask hides them).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import Adapter, Shape, apply_head_maps, apply_maps
from .patch import ForwardInputs, patched, slice_batch
from .policy import Policy
from .record import features, spans


@dataclass
class Hit:
    entry: int
    length: int  # the query's length; < the entry's length means an exact causal crop
    distance: float


@dataclass
class Stats:
    """Cumulative counters; updated under a lock so concurrent forwards count exactly."""

    lookups: int = 0
    hits: int = 0
    misses: int = 0
    layer_maps_reused: int = 0
    layer_maps_total: int = 0
    lookup_s: float = 0.0
    fetch_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        with self._lock:
            d = {k: getattr(self, k) for k in
                 ("lookups", "hits", "misses", "layer_maps_reused", "layer_maps_total", "lookup_s", "fetch_s")}
        d["hit_rate"] = d["hits"] / d["lookups"] if d["lookups"] else 0.0
        d["reuse_fraction"] = d["layer_maps_reused"] / d["layer_maps_total"] if d["layer_maps_total"] else 0.0
        return d

    def reset(self) -> None:
        with self._lock:
            self.lookups = self.hits = self.misses = self.layer_maps_reused = self.layer_maps_total = 0
            self.lookup_s = self.fetch_s = 0.0


@dataclass
class BatchPlan:
    spans: list
    hits: list[Hit | None]

    @property
    def hit_items(self) -> list[int]:
        return [b for b, h in enumerate(self.hits) if h is not None]


class Attached:
    """A cache attached to a model; use as a context manager (``with cache.attach(model): ...``)."""

    def __init__(self, cache, model: nn.Module, policy: Policy, threshold: float, learn: bool = False,
                 prefetch: bool | None = None, preset: list[Hit | None] | None = None, preloaded: dict | None = None):
        self.cache, self.model, self.policy, self.threshold = cache, model, policy, threshold
        # Prefetch: decode the hits' maps in a background thread, layer by layer, while the model runs.
        # Worth it when maps need decoding (compact codecs); a float16 store is read zero-copy.
        self.prefetch = cache.store.layout.codec != "float16" if prefetch is None else prefetch
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict = {}
        self.learn = learn
        self.pending: list[list[int]] = []  # inputs that missed, to insert (learn mode)
        self.learned = 0
        # Benchmark hooks: ``preset`` hits skip the lookup; ``preloaded[(entry, layer)]`` maps skip the
        # fetch. Together they give the ceiling of the method (maps already in memory, no retrieval).
        self.preset, self.preloaded = preset, preloaded or {}
        self.adapter: Adapter = cache.adapter
        self.shape: Shape = cache.shape
        self.plan: BatchPlan | None = None
        self.last_hits: list[Hit | None] = []
        self.last_reused: list[bool] = []
        self._ctx = None

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> Attached:
        self.cache.check_model(self.model)
        if self.prefetch:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="attncache-prefetch")
        self._ctx = patched(self.model, self.adapter, self._on_forward, self._on_attention)
        self._ctx.__enter__()
        self.model._attncache_attached = self  # lets other tiers (prefix) see this forward's hits
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool, self._ahead = None, {}
        self._ctx.__exit__(*exc)
        self._ctx = None
        self.model._attncache_attached = None
        self.plan = None

    def learn_pending(self) -> int:
        """Record and insert the inputs that missed since the last call (learn mode); returns how many.

        Runs between batches: the model is detached for the recording pass (which needs eager attention)
        and attached again, so the new entries are visible to the next lookup.
        """
        if not self.pending:
            return 0
        seqs, self.pending = self.pending, []
        self._ctx.__exit__(None, None, None)
        self.model._attncache_attached = None
        try:
            n = self.cache.learn(self.model, seqs)
        finally:
            self._ctx = patched(self.model, self.adapter, self._on_forward, self._on_attention)
            self._ctx.__enter__()
            self.model._attncache_attached = self
        self.learned += n
        return n

    # -- per forward ------------------------------------------------------------------------------
    def _on_forward(self, inputs: ForwardInputs) -> None:
        self.plan = None
        if inputs.input_ids is None or inputs.has_past:
            return
        t0 = time.perf_counter()
        if self.preset is not None:
            B, T = inputs.input_ids.shape
            sp = spans(inputs.attention_mask, B, T)
            hits = list(self.preset)
        else:
            feats, sp = features(self.model, self.adapter, inputs)
            lengths = [0 if s is None else s[1] - s[0] for s in sp]
            hits = self.cache.lookup(feats, lengths, threshold=self.threshold)
        hits = [h if s is not None else None for h, s in zip(hits, sp)]
        n_hit = sum(h is not None for h in hits)
        B = len(hits)
        reused = self.policy.head_maps(self.cache.store.layer_pos)  # in whole-layer units
        self.cache.stats.add(lookups=B, hits=n_hit, misses=B - n_hit, lookup_s=time.perf_counter() - t0,
                             layer_maps_reused=n_hit * reused, layer_maps_total=B * self.shape.n_layers)
        # An item with a hit but no reusable map (policy 'none') is counted as a hit above and
        # simply computes normally below.
        self.plan = BatchPlan(sp, hits) if reused else None
        self._ahead = {}
        if self.plan is not None and self._pool is not None and n_hit:
            for layer in self.cache.store.layout.layers:
                if self.policy.allows(layer):
                    for h in hits:
                        key = (h.entry, layer, h.length) if h is not None else None
                        if key is not None and key not in self._ahead and key not in self.preloaded:
                            self._ahead[key] = self._pool.submit(self.cache.fetch, *key)
        self.last_hits = hits
        if self.learn:
            ids = inputs.input_ids
            self.pending += [ids[b, s[0]: s[1]].tolist() for b, (h, s) in enumerate(zip(hits, sp))
                             if h is None and s is not None]
        # which items actually replayed maps (a hit under policy 'none' computes everything)
        self.last_reused = [h is not None and bool(reused) for h in hits]

    def _on_attention(self, layer: int, module: nn.Module, original, hidden, args, kwargs):
        plan = self.plan
        if plan is None or not self.policy.allows(layer) or layer not in self.cache.store.layer_pos:
            return original(hidden, *args, **kwargs)
        hit = plan.hit_items
        if not hit:
            return original(hidden, *args, **kwargs)
        B, T, _ = hidden.shape
        all_hit = len(hit) == B
        if all_hit:
            out_hit = self._replay(layer, module, hidden, [plan.spans[b] for b in hit],
                                   [plan.hits[b] for b in hit], T, kwargs)
            return out_hit, None
        hit_idx = torch.tensor(hit)
        miss_idx = torch.tensor([b for b in range(B) if plan.hits[b] is None])
        out_miss = original(hidden[miss_idx], *slice_batch(args, miss_idx, B), **slice_batch(kwargs, miss_idx, B))[0]
        out_hit = self._replay(layer, module, hidden[hit_idx], [plan.spans[b] for b in hit],
                               [plan.hits[b] for b in hit], T, slice_batch(kwargs, hit_idx, B))
        out = out_hit.new_empty((B, T, out_hit.shape[-1]))
        out[hit_idx] = out_hit
        out[miss_idx] = out_miss.to(out.dtype)
        return out, None

    def _replay(self, layer: int, module: nn.Module, hidden: torch.Tensor, spans, hits: list[Hit], T: int,
                kwargs: dict):
        v = self.adapter.values(module, hidden, self.shape)  # [b, H_kv, T, d]
        if not self.policy.full(layer):
            return self._replay_heads(layer, module, hidden, v, spans, hits, T, kwargs)
        maps = self._fetch(layer, hits, v.device)
        g = self.shape.group
        if all(s == (0, T) for s in spans):
            heads = torch.stack([apply_maps(a, v[j], g) for j, a in enumerate(maps)])
        else:
            heads = v.new_zeros((len(hits), self.shape.n_heads, T, self.shape.head_dim))
            for j, (a, (s, e)) in enumerate(zip(maps, spans)):
                heads[j, :, s:e] = apply_maps(a, v[j, :, s:e], g)
        return self.adapter.output(module, heads)

    def _replay_heads(self, layer, module, hidden, v, spans, hits, T, kwargs):
        """Some heads from maps, the others computed exactly (only their Q rows and their groups' K)."""
        reused = list(self.policy.heads[layer])
        computed = [h for h in range(self.shape.n_heads) if h not in set(reused)]
        heads = v.new_zeros((len(hits), self.shape.n_heads, T, self.shape.head_dim))
        exact = self.adapter.attend(module, hidden, v, computed, kwargs, self.shape)
        heads[:, computed] = exact.to(heads.dtype)
        kv_of = torch.tensor([h // self.shape.group for h in reused], device=v.device)
        sel = torch.tensor(reused)
        for j, (a, (s, e)) in enumerate(zip(self._fetch(layer, hits, v.device), spans)):
            heads[j, :, :s] = 0  # padded rows: whatever the exact path produced there is unused
            heads[j, :, e:] = 0
            heads[j, reused, s:e] = apply_head_maps(a.index_select(0, sel.to(a.device)), v[j, :, s:e], kv_of)
        return self.adapter.output(module, heads)

    def _fetch(self, layer: int, hits: list[Hit], device) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        maps = []
        for h in hits:
            key = (h.entry, layer, h.length)
            m = self.preloaded.get(key)
            if m is None:
                fut = self._ahead.pop(key, None)
                m = fut.result().to(device) if fut is not None else self.cache.fetch(h.entry, layer, h.length, device)
            maps.append(m)
        self.cache.stats.add(fetch_s=time.perf_counter() - t0)
        return maps
