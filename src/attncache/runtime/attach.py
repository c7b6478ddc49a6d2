"""A cache attached to a model: the patch lifecycle and, per forward, plan -> maps -> replay.

Per forward (one batch) the model pre-hook asks the hit source for a hit per item and computes the
batch plan once (``plan.py``). Then in each layer, for every group of items reusing the same heads:

- items that reuse heads in this layer: ``replay.replay`` from maps fetched by ``maps.py``;
- every other item: the module's original forward (SDPA by default) on that sub-batch, unchanged.

Learning (optional): inputs that miss are kept; ``learn_pending`` hands them to a learner function
(given by the caller: recording and inserting is build's business) with replay paused, between
batches.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..db import Shape, Templates
from ..errors import UserError
from ..stats import Counters, ratio
from .adapters import Adapter
from .features import features, spans
from .lookup import Hit, HitSource
from .maps import LayerWant, StoreMaps, layer_maps
from .patch import ForwardInputs, patched, slice_batch
from .plan import BatchPlan, plan_batch
from .policy import Policy
from .replay import ModuleCall, replay

Learner = Callable[[list[list[int]]], int]  # token sequences -> how many were stored


@dataclass
class MapStats(Counters):
    """Cumulative counters of map reuse (``layer_maps_*`` in units of whole layers)."""

    lookups: int = 0
    hits: int = 0
    misses: int = 0
    layer_maps_reused: float = 0.0
    layer_maps_total: int = 0
    lookup_s: float = 0.0
    fetch_s: float = 0.0

    def derived(self, c: dict[str, float]) -> dict[str, float]:
        return {
            "hit_rate": ratio(c["hits"], c["lookups"]),
            "reuse_fraction": ratio(c["layer_maps_reused"], c["layer_maps_total"]),
        }


@dataclass
class CacheParts:
    """What a map cache hands an attachment: the model family's adapter, the shapes, the layers
    it stores, its template maps, the counters it adds to and its lookup threshold."""

    adapter: Adapter
    shape: Shape
    stored_layers: list[int]
    templates: Templates | None
    stats: MapStats
    threshold: float


class Attachment:
    """Use as a context manager (``with cache.attach(model): ...``); leaving restores the model.
    ``hits``: which stored entry each input reuses; ``maps``: where their maps are read from."""

    def __init__(
        self,
        model: nn.Module,
        parts: CacheParts,
        policy: Policy,
        hits: HitSource,
        maps: StoreMaps,
        learner: Learner | None = None,
    ):
        self.model, self.policy, self.hits, self.maps = model, policy, hits, maps
        self.adapter, self.shape, self.templates = parts.adapter, parts.shape, parts.templates
        self.stats = parts.stats
        self.stored_layers = set(parts.stored_layers)
        self.threshold = parts.threshold
        templates = parts.templates
        covered = templates is not None and all(
            templates.has(x, hs) for x, hs in policy.fixed.items()
        )
        if policy.fixed and not covered:
            raise UserError(
                f"policy '{policy.name}' serves heads from templates this DB does not have; "
                "run 'attncache calibrate' first"
            )
        self.learner = learner
        self.pending: list[list[int]] = []  # inputs that missed, to learn (learn mode)
        self.learned = 0
        self.plan: BatchPlan | None = None
        self.last_hits: list[Hit | None] = []
        self.last_reused: list[bool] = []
        self._paused = False
        self._stack: contextlib.ExitStack | None = None
        self._fetch_timer = [0.0]

    @property
    def learning(self) -> bool:
        return self.learner is not None

    @property
    def inert(self) -> bool:
        """Nothing to reuse, look up or learn: the model is left unpatched (costs nothing)."""
        return not (self.policy.heads or self.policy.fixed or self.policy.looks_up or self.learner)

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> Attachment:
        stack = contextlib.ExitStack()
        if self.inert:
            self._stack = stack
            return self
        stack.enter_context(patched(self.model, self.adapter, self._on_forward, self._on_attention))
        self.maps.open()
        stack.callback(self.maps.close)
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self.plan = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The model runs as if detached (its own attention everywhere), e.g. to record maps."""
        self._paused, self.plan = True, None
        try:
            yield
        finally:
            self._paused = False

    def learn_pending(self) -> int:
        """Record and insert the inputs that missed since the last call (learn mode); how many."""
        if not self.pending or self.learner is None:
            return 0
        seqs, self.pending = self.pending, []
        with self.paused():
            n = self.learner(seqs)
        self.learned += n
        return n

    # -- per forward ------------------------------------------------------------------------------
    def _on_forward(self, inputs: ForwardInputs) -> None:
        self.plan = None
        if self._paused or inputs.input_ids is None or inputs.has_past:
            return
        t0 = time.perf_counter()
        ids = inputs.input_ids
        batch, width = ids.shape
        item_spans = spans(inputs.attention_mask, batch, width)
        lengths = [0 if s is None else s[1] - s[0] for s in item_spans]
        looks_up = self.policy.looks_up or not self.hits.needs_features
        if looks_up:
            feats = (
                features(self.model, self.adapter, ids, item_spans, inputs.token_type_ids)
                if self.hits.needs_features
                else None
            )
            hits = self.hits.find(feats, lengths)
        else:  # templates only: nothing to look up
            hits = [None] * batch
        hits = [h if s is not None else None for h, s in zip(hits, item_spans, strict=True)]
        # Template heads serve every item, except where the caller wants a KV cache (the prefix tier
        # inserting it: its keys must all be computed) or the item is longer than the templates.
        tmax = self.templates.max_len if self.templates is not None else 0
        fixed = [
            bool(self.policy.fixed)
            and not inputs.wants_cache
            and s is not None
            and s[1] - s[0] <= tmax
            for s in item_spans
        ]
        n_hit = sum(h is not None for h in hits)
        retrieved = self.policy.head_maps(self.stored_layers)  # per hit, in whole-layer units
        looked = batch if looks_up else 0
        self.stats.add(
            lookups=looked,
            hits=n_hit,
            misses=looked - n_hit,
            lookup_s=time.perf_counter() - t0,
            layer_maps_reused=n_hit * retrieved + sum(fixed) * self.policy.fixed_maps(),
            layer_maps_total=batch * self.shape.n_layers,
        )
        # An item with a hit but nothing to reuse (policy 'none') counts as a hit above and
        # computes.
        replay_hits = hits if retrieved else [None] * batch
        self.plan = plan_batch(
            self.policy, self.stored_layers, self.shape.n_layers, item_spans, replay_hits, fixed
        )
        if self.plan is not None and n_hit and retrieved:
            self.maps.plan(replay_hits, [x for x in self.policy.layers if x in self.stored_layers])
        self.last_hits = hits
        self.last_reused = self.plan.reused if self.plan is not None else [False] * batch
        if self.learner is not None:
            self.pending += [
                ids[b, s[0] : s[1]].tolist()
                for b, (h, s) in enumerate(zip(hits, item_spans))
                if h is None and s is not None
            ]

    def _on_attention(self, layer: int, module: nn.Module, original, hidden, args, kwargs):
        plan = self.plan
        groups = plan.groups.get(layer) if plan is not None else None
        if groups is None:
            return original(hidden, *args, **kwargs)
        batch, width, _ = hidden.shape
        if len(groups) == 1:
            heads = next(iter(groups))
            call = ModuleCall(module, hidden, plan.spans, kwargs)
            return self._replay(layer, call, plan.hits, heads), None
        out = None
        for heads, items in groups.items():
            idx = torch.tensor(items, device=hidden.device)
            sub_kwargs = slice_batch(kwargs, idx, batch)
            if heads:
                call = ModuleCall(module, hidden[idx], [plan.spans[b] for b in items], sub_kwargs)
                o = self._replay(layer, call, [plan.hits[b] for b in items], heads)
            else:
                o = original(hidden[idx], *slice_batch(args, idx, batch), **sub_kwargs)[0]
            if out is None:
                out = o.new_empty((batch, width, o.shape[-1]))
            out[idx] = o.to(out.dtype)
        return out, None

    def _replay(
        self, layer: int, call: ModuleCall, hits: list[Hit | None], heads: tuple[int, ...]
    ) -> torch.Tensor:
        want = LayerWant(layer, heads, self.policy.fixed.get(layer, ()), hits, call.spans)
        before = self._fetch_timer[0]
        device = call.hidden.device
        maps = layer_maps(
            self.maps, self.templates, want, self.shape.n_heads, device, self._fetch_timer
        )
        self.stats.add(fetch_s=self._fetch_timer[0] - before)
        return replay(self.adapter, self.shape, call, maps, heads)
