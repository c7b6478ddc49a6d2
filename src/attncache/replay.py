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
from .errors import UserError
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
    hits: list[Hit | None]  # per item: the hit whose maps it reuses, or None
    fixed: list[bool]  # per item: whether the policy's template heads serve it


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
        self.templates = cache.templates
        if policy.fixed and (self.templates is None or not all(self.templates.has(layer, hs)
                                                                  for layer, hs in policy.fixed.items())):
            raise UserError(f"policy '{policy.name}' serves heads from templates this DB does not have; "
                            f"run 'attncache calibrate' first")
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
        B, T = inputs.input_ids.shape
        if self.preset is not None:
            sp = spans(inputs.attention_mask, B, T)
            hits = list(self.preset)
        elif self.policy.looks_up:
            feats, sp = features(self.model, self.adapter, inputs)
            lengths = [0 if s is None else s[1] - s[0] for s in sp]
            hits = self.cache.lookup(feats, lengths, threshold=self.threshold)
        else:  # templates only: nothing to look up
            sp = spans(inputs.attention_mask, B, T)
            hits = [None] * B
        hits = [h if s is not None else None for h, s in zip(hits, sp)]
        # Template heads serve every item, except where the caller wants a KV cache (the prefix tier
        # inserting it: its keys must all be computed) or the item is longer than the templates.
        tmax = self.templates.max_len if self.templates is not None else 0
        fixed = [bool(self.policy.fixed) and not inputs.wants_cache and s is not None and s[1] - s[0] <= tmax
                 for s in sp]
        n_hit = sum(h is not None for h in hits)
        n_fixed = sum(fixed)
        reused = self.policy.head_maps(self.cache.store.layer_pos)  # in whole-layer units
        looked = B if self.policy.looks_up or self.preset is not None else 0
        self.cache.stats.add(lookups=looked, hits=n_hit, misses=looked - n_hit, lookup_s=time.perf_counter() - t0,
                             layer_maps_reused=n_hit * reused + n_fixed * self.policy.fixed_maps(),
                             layer_maps_total=B * self.shape.n_layers)
        # An item with a hit but no reusable map (policy 'none') is counted as a hit above and
        # simply computes normally below.
        self.plan = BatchPlan(sp, hits if reused else [None] * B, fixed) if (reused and n_hit) or n_fixed else None
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
        self.last_reused = [(h is not None and bool(reused)) or f for h, f in zip(hits, fixed)]

    def _heads_of(self, layer: int, b: int) -> tuple[int, ...]:
        """The query heads item ``b`` of the current batch reuses in ``layer`` (sorted)."""
        plan = self.plan
        heads = set(self.policy.fixed.get(layer, ())) if plan.fixed[b] else set()
        if plan.hits[b] is not None and layer in self.cache.store.layer_pos:
            heads.update(self.policy.heads.get(layer, ()))
        return tuple(sorted(heads))

    def _on_attention(self, layer: int, module: nn.Module, original, hidden, args, kwargs):
        plan = self.plan
        if plan is None:
            return original(hidden, *args, **kwargs)
        B, T, _ = hidden.shape
        groups: dict[tuple[int, ...], list[int]] = {}
        for b in range(B):
            groups.setdefault(self._heads_of(layer, b), []).append(b)
        if () in groups and len(groups) == 1:
            return original(hidden, *args, **kwargs)
        if len(groups) == 1:
            heads = next(iter(groups))
            return self._replay(layer, module, hidden, plan.spans, plan.hits, heads, T, kwargs), None
        out = None
        for heads, items in groups.items():
            idx = torch.tensor(items)
            sub_args, sub_kwargs = slice_batch(args, idx, B), slice_batch(kwargs, idx, B)
            if heads:
                o = self._replay(layer, module, hidden[idx], [plan.spans[b] for b in items],
                                 [plan.hits[b] for b in items], heads, T, sub_kwargs)
            else:
                o = original(hidden[idx], *sub_args, **sub_kwargs)[0]
            if out is None:
                out = o.new_empty((B, T, o.shape[-1]))
            out[idx] = o.to(out.dtype)
        return out, None

    def _maps(self, layer: int, heads: tuple[int, ...], hits: list[Hit | None], spans, device) -> list[torch.Tensor]:
        """Per item, the [len(heads), L, L] maps of ``heads``: templates where the policy fixes the head,
        else the hit's stored maps."""
        fixed = set(self.policy.fixed.get(layer, ()))
        t_heads = tuple(h for h in heads if h in fixed)
        r_heads = [h for h in heads if h not in fixed]
        fetched = self._fetch(layer, hits, device) if r_heads else [None] * len(hits)
        out = []
        for (s, e), m in zip(spans, fetched):
            if not t_heads:  # all from the hit (a zero-copy view when the layer is whole)
                out.append(m if len(r_heads) == self.shape.n_heads else m.index_select(0, torch.tensor(r_heads)))
                continue
            t = self.templates.get(layer, t_heads, e - s).to(device)
            if not r_heads:
                out.append(t)
                continue
            both = t.new_empty((len(heads), e - s, e - s))
            both[[heads.index(h) for h in t_heads]] = t
            both[[heads.index(h) for h in r_heads]] = m.index_select(0, torch.tensor(r_heads)).to(t.dtype)
            out.append(both)
        return out

    def _replay(self, layer: int, module: nn.Module, hidden: torch.Tensor, spans, hits: list[Hit | None],
                heads: tuple[int, ...], T: int, kwargs: dict):
        v = self.adapter.values(module, hidden, self.shape)  # [b, H_kv, T, d]
        maps = self._maps(layer, heads, hits, spans, v.device)
        if len(heads) < self.shape.n_heads:
            return self._replay_heads(module, hidden, v, spans, maps, heads, T, kwargs)
        g = self.shape.group
        if all(s == (0, T) for s in spans):
            out = torch.stack([apply_maps(a, v[j], g) for j, a in enumerate(maps)])
        else:
            out = v.new_zeros((len(maps), self.shape.n_heads, T, self.shape.head_dim))
            for j, (a, (s, e)) in enumerate(zip(maps, spans)):
                out[j, :, s:e] = apply_maps(a, v[j, :, s:e], g)
        return self.adapter.output(module, out)

    def _replay_heads(self, module, hidden, v, spans, maps, reused: tuple[int, ...], T, kwargs):
        """Some heads from maps, the others computed exactly (only their Q rows and their groups' K)."""
        computed = [h for h in range(self.shape.n_heads) if h not in set(reused)]
        heads = v.new_zeros((len(maps), self.shape.n_heads, T, self.shape.head_dim))
        exact = self.adapter.attend(module, hidden, v, computed, kwargs, self.shape)
        heads[:, computed] = exact.to(heads.dtype)
        kv_of = torch.tensor([h // self.shape.group for h in reused], device=v.device)
        sel = list(reused)
        for j, (a, (s, e)) in enumerate(zip(maps, spans)):
            heads[j, :, :s] = 0  # padded rows: whatever the exact path produced there is unused
            heads[j, :, e:] = 0
            heads[j, sel, s:e] = apply_head_maps(a.to(v.device), v[j, :, s:e], kv_of)
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
