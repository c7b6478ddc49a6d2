"""Reuse policy: which layers of a hit may use the retrieved map.

- ``all``: every layer (the paper's mode; measured to cost accuracy, see docs/results.md);
- ``default``: what the DB stores (at build: the most stable sixth of the layers, ranked by the
  measured map distance between similar build inputs; ``attncache calibrate`` may replace it);
- ``none``: never reuse (lookups still run and are counted);
- a comma-separated list of layer indices, e.g. ``17,20,23``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Policy:
    layers: tuple[int, ...]
    name: str

    def allows(self, layer: int) -> bool:
        return layer in self.layers


def parse_policy(spec: str | None, n_layers: int, default_layers: list[int]) -> Policy:
    if spec is None or spec == "default":
        return Policy(tuple(sorted(default_layers)), "default")
    if spec == "all":
        return Policy(tuple(range(n_layers)), "all")
    if spec == "none":
        return Policy((), "none")
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--policy: expected 'all', 'default', 'none' or layer indices like '17,20', got '{spec}'") from None
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise UserError(f"--policy: layer(s) {bad} out of range 0..{n_layers - 1}")
    return Policy(tuple(layers), ",".join(map(str, layers)))
