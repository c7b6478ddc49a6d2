"""Per batch, which item replays which (layer, head) maps: computed once before layer 0, pure.

An item reuses a head in a layer if the policy serves that head from a template (every item that
fits the templates, unless the caller asked for a KV cache) or retrieves it and the item hit an
entry that stores the layer. Items with the same head set in a layer form one group, replayed
together; the group with no heads runs the module's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from .features import Span
from .lookup import Hit
from .policy import Policy

HeadGroups = dict[tuple[int, ...], list[int]]  # heads reused -> items of the batch


@dataclass(frozen=True)
class BatchPlan:
    spans: list[Span | None]
    hits: list[Hit | None]  # per item: the hit whose maps it reuses, or None
    fixed: list[bool]  # per item: whether the policy's template heads serve it
    groups: dict[int, HeadGroups]  # per layer where any item reuses

    @property
    def reused(self) -> list[bool]:
        """Per item: whether it replays any map."""
        return [h is not None or f for h, f in zip(self.hits, self.fixed, strict=True)]


def plan_batch(
    policy: Policy,
    stored_layers: set[int],
    n_layers: int,
    spans: list[Span | None],
    hits: list[Hit | None],
    fixed: list[bool],
) -> BatchPlan | None:
    """The plan of one batch, or None when no item reuses anything."""
    if not any(h is not None for h in hits) and not any(fixed):
        return None
    groups: dict[int, HeadGroups] = {}
    for layer in range(n_layers):
        retrieved = policy.heads.get(layer, ()) if layer in stored_layers else ()
        templated = policy.fixed.get(layer, ())
        if not retrieved and not templated:
            continue
        per_layer: HeadGroups = {}
        for b in range(len(hits)):
            heads = set(templated) if fixed[b] else set()
            if hits[b] is not None:
                heads.update(retrieved)
            per_layer.setdefault(tuple(sorted(heads)), []).append(b)
        if set(per_layer) != {()}:
            groups[layer] = per_layer
    return BatchPlan(spans, hits, fixed, groups)
