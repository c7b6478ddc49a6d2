"""Reuse policy: which (layer, query head) maps of a hit may be used.

Specs:
- ``all``: every head of every layer (the paper's mode; measured to cost accuracy, see
docs/results.md);
- ``default``: what the DB stores (at build: the most stable sixth of the layers; ``attncache
calibrate``
  may replace it with layers or single heads);
- ``none``: never reuse (lookups still run and are counted);
- layer indices, e.g. ``17,20,23``: every head of those layers;
- ``heads:N``: the N (layer, head) maps that differed least between close build inputs;
- ``fixed`` / ``fixed:N``: the (first N) heads the DB has *template* maps for (``templates.py``):
served to
  every input from one stored mean map, with no lookup at all;
- ``A+B``: the union of two specs, e.g. ``fixed:40+17,20`` (templates where the DB has them, else
the
  retrieved maps of a hit).

In a layer where only some heads reuse, the others are computed exactly: their Q rows, the K of
their KV groups (with GQA, K is skipped only when a whole group reuses), rotary embedding and
attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class Policy:
    heads: dict[int, tuple[int, ...]]  # layer -> query heads reused from a hit's maps (sorted)
    n_heads: int
    name: str
    fixed: dict[int, tuple[int, ...]] = field(
        default_factory=dict
    )  # layer -> heads served by templates

    def __post_init__(self) -> None:
        for layer, hs in self.fixed.items():
            overlap = set(hs) & set(self.heads.get(layer, ()))
            assert not overlap, f"layer {layer}: heads {sorted(overlap)} both fixed and retrieved"

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.heads))

    def allows(self, layer: int) -> bool:
        return layer in self.heads

    def full(self, layer: int) -> bool:
        return len(self.heads.get(layer, ())) == self.n_heads

    def head_maps(self, stored_layers) -> float:
        """Head maps reused from a hit, in units of whole layers."""
        return (
            sum(len(h) for layer, h in self.heads.items() if layer in stored_layers) / self.n_heads
        )

    def fixed_maps(self) -> float:
        """Head maps served by templates (every input), in units of whole layers."""
        return sum(len(h) for h in self.fixed.values()) / self.n_heads

    @property
    def retrieves(self) -> bool:
        """Whether any map comes from a lookup."""
        return bool(self.heads)

    @property
    def looks_up(self) -> bool:
        """Whether a forward looks inputs up: when it retrieves, or for an explicit ``none`` (which
        measures lookups and hit rates). A default that reuses nothing costs nothing."""
        return bool(self.heads) or self.name == "none"

    def work_saved(self, shape, length: int, causal: bool, stored_layers, hit: bool) -> float:
        """Share of the attention modules' FLOPs an item of ``length`` tokens skips (projections,
        QK^T, A @ V).

        A reused head skips its Q rows and its QK^T; a KV group's K projection is skipped only when
        every query head of the group reuses. V, A @ V and the output projection always run.
        """
        d, H, G = shape.head_dim, shape.n_heads, shape.n_kv_heads
        D = (
            H * d
        )  # model width (exact for the supported families' usual configs; an estimate otherwise)
        ctx = (length + 1) / 2 if causal else length  # mean keys per query
        per_layer = 2 * D * (H * d) + 2 * 2 * D * (G * d) + 2 * (H * d) * D + 2 * 2 * H * d * ctx
        saved = 0.0
        for layer in range(shape.n_layers):
            heads = set(self.fixed.get(layer, ()))
            if hit and layer in stored_layers:
                heads |= set(self.heads.get(layer, ()))
            full_groups = sum(
                all(g * shape.group + i in heads for i in range(shape.group)) for g in range(G)
            )
            saved += len(heads) * (2 * D * d + 2 * d * ctx) + full_groups * 2 * D * d
        return saved / (per_layer * shape.n_layers)

    def to_json(self) -> dict:
        out = {
            "layers": [layer for layer in self.layers if self.full(layer)],
            "heads": {
                str(layer): list(h) for layer, h in self.heads.items() if not self.full(layer)
            },
        }
        if self.fixed:
            out["fixed"] = {str(layer): list(h) for layer, h in sorted(self.fixed.items())}
        return out


def from_layers(layers, n_heads: int, name: str) -> Policy:
    return Policy({int(x): tuple(range(n_heads)) for x in layers}, n_heads, name)


def from_json(obj: dict, n_heads: int, name: str = "default") -> Policy:
    heads = {int(x): tuple(range(n_heads)) for x in obj.get("layers", [])}
    for layer, hs in obj.get("heads", {}).items():
        heads.setdefault(int(layer), tuple(sorted(int(h) for h in hs)))
    fixed = {
        int(layer): tuple(sorted(int(h) for h in hs)) for layer, hs in obj.get("fixed", {}).items()
    }
    return union([Policy(heads, n_heads, name), Policy({}, n_heads, name, fixed)], name)


def union(parts: list[Policy], name: str) -> Policy:
    """Every head any part reuses; a head both fixed and retrieved is served by its template (no
    lookup)."""
    n_heads = parts[0].n_heads
    fixed: dict[int, set[int]] = {}
    for p in parts:
        for layer, hs in p.fixed.items():
            fixed.setdefault(layer, set()).update(hs)
    heads: dict[int, set[int]] = {}
    for p in parts:
        for layer, hs in p.heads.items():
            rest = set(hs) - fixed.get(layer, set())
            if rest:
                heads.setdefault(layer, set()).update(rest)
    return Policy(
        {k: tuple(sorted(v)) for k, v in heads.items()},
        n_heads,
        name,
        {k: tuple(sorted(v)) for k, v in fixed.items() if v},
    )


def from_templates(
    template_heads: list[tuple[int, int]], k: int, n_heads: int, name: str
) -> Policy:
    """The first ``k`` template heads (they are stored in rank order, least output effect first)."""
    fixed: dict[int, list[int]] = {}
    for layer, h in template_heads[:k]:
        fixed.setdefault(int(layer), []).append(int(h))
    return Policy({}, n_heads, name, {k_: tuple(sorted(v)) for k_, v in fixed.items()})


def top_heads(head_distance: np.ndarray, k: int, name: str) -> Policy:
    """The k (layer, head) pairs with the smallest build-time map distance."""
    n_layers, n_heads = head_distance.shape
    flat = np.argsort(head_distance.ravel(), kind="stable")[:k]
    heads: dict[int, list[int]] = {}
    for i in flat.tolist():
        heads.setdefault(i // n_heads, []).append(i % n_heads)
    return Policy({layer: tuple(sorted(h)) for layer, h in heads.items()}, n_heads, name)


def parse_policy(
    spec: str | None,
    n_layers: int,
    n_heads: int,
    default: dict,
    head_distance: np.ndarray | None = None,
    template_heads: list[tuple[int, int]] | None = None,
) -> Policy:
    if spec is not None and "+" in spec:
        parts = [
            parse_policy(p.strip(), n_layers, n_heads, default, head_distance, template_heads)
            for p in spec.split("+")
        ]
        return union(parts, spec)
    if spec is None or spec == "default":
        return from_json(default, n_heads, "default")
    if spec == "all":
        return from_layers(range(n_layers), n_heads, "all")
    if spec == "none":
        return Policy({}, n_heads, "none")
    if spec == "fixed" or spec.startswith("fixed:"):
        if not template_heads:
            raise UserError(
                f"--policy {spec}: this DB has no template maps; run 'attncache calibrate' "
                f"(or 'attncache templates') first"
            )
        k = len(template_heads)
        if spec != "fixed":
            try:
                k = int(spec.split(":", 1)[1])
            except ValueError:
                raise UserError(
                    f"--policy: expected fixed:N with an integer N, got '{spec}'"
                ) from None
            if not 0 < k <= len(template_heads):
                raise UserError(
                    f"--policy fixed:N: this DB has templates for {len(template_heads)} heads, "
                    f"got N={k}"
                )
        return from_templates(template_heads, k, n_heads, spec)
    if spec.startswith("heads:"):
        if head_distance is None:
            raise UserError(
                "--policy heads:N needs per-head distances, which this DB does not have; rebuild it"
            )
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
        raise UserError(
            f"--policy: expected 'all', 'default', 'none', 'heads:N', 'fixed[:N]', layer indices "
            f"like '17,20', or a union like 'fixed+17,20'; got '{spec}'"
        ) from None
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise UserError(f"--policy: layer(s) {bad} out of range 0..{n_layers - 1}")
    return from_layers(layers, n_heads, ",".join(map(str, layers)))
