"""Reuse policy: which (layer, query head) maps of a hit may be used.

Specs:
- ``all``: every head of every layer (the paper's mode; measured to cost accuracy, see docs/results.md);
- ``default``: what the DB stores (at build: the most stable sixth of the layers; ``attncache calibrate``
  may replace it with layers or single heads);
- ``none``: never reuse (lookups still run and are counted);
- layer indices, e.g. ``17,20,23``: every head of those layers;
- ``heads:N``: the N (layer, head) maps that differed least between close build inputs.

In a layer where only some heads reuse, the others are computed exactly: their Q rows, the K of their KV
groups (with GQA, K is skipped only when a whole group reuses), rotary embedding and attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class Policy:
    heads: dict[int, tuple[int, ...]]  # layer -> reused query heads (sorted); absent layers compute normally
    n_heads: int
    name: str

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.heads))

    def allows(self, layer: int) -> bool:
        return layer in self.heads

    def full(self, layer: int) -> bool:
        return len(self.heads.get(layer, ())) == self.n_heads

    def head_maps(self, stored_layers) -> float:
        """Reused head maps per hit, in units of whole layers."""
        return sum(len(h) for layer, h in self.heads.items() if layer in stored_layers) / self.n_heads

    def to_json(self) -> dict:
        return {"layers": [layer for layer in self.layers if self.full(layer)],
                "heads": {str(layer): list(h) for layer, h in self.heads.items() if not self.full(layer)}}


def from_layers(layers, n_heads: int, name: str) -> Policy:
    return Policy({int(x): tuple(range(n_heads)) for x in layers}, n_heads, name)


def from_json(obj: dict, n_heads: int, name: str = "default") -> Policy:
    heads = {int(x): tuple(range(n_heads)) for x in obj.get("layers", [])}
    for layer, hs in obj.get("heads", {}).items():
        heads.setdefault(int(layer), tuple(sorted(int(h) for h in hs)))
    return Policy(heads, n_heads, name)


def top_heads(head_distance: np.ndarray, k: int, name: str) -> Policy:
    """The k (layer, head) pairs with the smallest build-time map distance."""
    n_layers, n_heads = head_distance.shape
    flat = np.argsort(head_distance.ravel(), kind="stable")[:k]
    heads: dict[int, list[int]] = {}
    for i in flat.tolist():
        heads.setdefault(i // n_heads, []).append(i % n_heads)
    return Policy({layer: tuple(sorted(h)) for layer, h in heads.items()}, n_heads, name)


def parse_policy(spec: str | None, n_layers: int, n_heads: int, default: dict,
                 head_distance: np.ndarray | None = None) -> Policy:
    if spec is None or spec == "default":
        return from_json(default, n_heads, "default")
    if spec == "all":
        return from_layers(range(n_layers), n_heads, "all")
    if spec == "none":
        return Policy({}, n_heads, "none")
    if spec.startswith("heads:"):
        if head_distance is None:
            raise UserError("--policy heads:N needs per-head distances, which this DB does not have; rebuild it")
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--policy: expected heads:N with an integer N, got '{spec}'") from None
        if not 0 < k <= n_layers * n_heads:
            raise UserError(f"--policy heads:N: N must be in 1..{n_layers * n_heads}, got {k}")
        return top_heads(head_distance, k, spec)
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--policy: expected 'all', 'default', 'none', 'heads:N' or layer indices like '17,20', "
                        f"got '{spec}'") from None
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise UserError(f"--policy: layer(s) {bad} out of range 0..{n_layers - 1}")
    return from_layers(layers, n_heads, ",".join(map(str, layers)))
