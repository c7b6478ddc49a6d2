"""PNG plots of sweep and bench results (matplotlib, an optional dependency:
``attncache[plot]``)."""

from __future__ import annotations

import re

from .errors import UserError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'attncache[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(rows: list[dict], path: str, title: str = "") -> None:
    """Reuse vs accuracy loss / agreement (or cosine), one curve per policy; ``fixed:N`` points as
    one."""
    plt = _pyplot()

    def series(policy: str) -> str:
        return "templates (fixed:N)" if re.fullmatch(r"fixed:\d+", policy) else policy

    ykeys = (
        [("accuracy_loss", "accuracy loss (points)")]
        if any("accuracy_loss" in r for r in rows)
        else []
    )
    ykeys.append(
        ("agreement", "agreement with exact")
        if "agreement" in rows[0]
        else ("cosine_to_exact_mean", "cosine to exact (mean)")
    )
    fig, axes = plt.subplots(1, len(ykeys), figsize=(5 * len(ykeys), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], ykeys, strict=True):
        for name in dict.fromkeys(series(r["policy"]) for r in rows):
            pts = sorted(
                (r["reuse_fraction"], r[key] * (100 if key == "accuracy_loss" else 1))
                for r in rows
                if series(r["policy"]) == name
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
        ax.set_xlabel("reused (layer, head) maps / all maps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bench(res: dict, path: str) -> None:
    """Per-item speedups vs SDPA by input length, hits and misses apart."""
    plt = _pyplot()
    items = res["per_item"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for hit, color, label in ((True, "tab:blue", "hit"), (False, "tab:gray", "miss")):
        xs = [it["tokens"] for it in items if it["hit"] == hit]
        ys = [it["sdpa_ms"] / it["cached_ms"] for it in items if it["hit"] == hit]
        ax.scatter(xs, ys, c=color, label=label, s=18)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("tokens")
    ax.set_ylabel("speedup vs SDPA (median)")
    ax.set_title(f"policy {res['policy']}: workload {res['workload_speedup_vs_sdpa']:.2f}x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
