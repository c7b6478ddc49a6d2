"""How results are printed: one JSON object (``--json``) or an aligned table."""

from __future__ import annotations

import json


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, list):
        return ",".join(map(str, value)) if len(value) <= 8 else f"{len(value)} items"
    return "-" if value is None else str(value)


def table(rows: list[dict], keys: list[str] | None = None) -> str:
    """Keys down, one column per result."""
    keys = keys or [k for k in rows[0] if not isinstance(rows[0][k], dict)]
    cells = [[k] + [fmt(r.get(k)) for r in rows] for k in keys if any(k in r for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(rows) + 1)]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(c))) for c in cells)


def rows_table(rows: list[dict], keys: list[str]) -> str:
    """One line per result (sweeps)."""
    keys = [k for k in keys if any(k in r for r in rows)]
    lines = ["  ".join(f"{k:>12.12s}" for k in keys)]
    for r in rows:
        lines.append(
            "  ".join(
                f"{r[k]:>12.4f}" if isinstance(r.get(k), float) else f"{fmt(r.get(k)):>12.12s}"
                for k in keys
            )
        )
    return "\n".join(lines)


def emit(obj: dict, as_json: bool, keys: list[str] | None = None) -> None:
    print(json.dumps(obj) if as_json else table([obj], keys))
