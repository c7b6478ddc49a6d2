"""Speedup vs accuracy per threshold (the paper's figure, measured honestly): for each policy and
a few thresholds of an `eval --sweep`, the whole-workload speedup vs SDPA (hits, misses, lookups,
fetches) from `bench`, next to the accuracy and agreement the sweep measured at that threshold.

    python benchmarks/speed_accuracy.py --db runs/sst2-smollm2.db --data "sst2[436:]" \
        --sweep runs/exp/sst2_sweep.json --out runs/exp/speed_accuracy_sst2.json --plot
        docs/speed_accuracy_sst2.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attncache.bench import BenchConfig, bench


def pick(points: list[dict], policy: str, hit_rates: list[float]) -> list[dict]:
    """The sweep's points of ``policy`` nearest each hit rate (none for a policy that never looks
    up)."""
    pts = [p for p in points if p["policy"] == policy and p["threshold"] >= 0]
    if not pts:
        return []
    nearest = [min(pts, key=lambda p, h=h: abs(p["hit_rate"] - h)) for h in hit_rates]
    return list({p["threshold"]: p for p in nearest}.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--sweep", required=True, help="JSON from `attncache eval --sweep --json`")
    ap.add_argument("--policies", default="all,default")
    ap.add_argument("--hit-rates", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot")
    a = ap.parse_args()
    points = json.loads(Path(a.sweep).read_text())["points"]
    cfg = BenchConfig(repeats=3, pass_repeats=2, eager=False)
    rows = []
    for pol in a.policies.split(","):
        for p in pick(points, pol, [float(x) for x in a.hit_rates.split(",")]):
            r = bench(a.db, a.data, pol, a.limit, cfg, progress=False, threshold=p["threshold"])
            rows.append(
                {
                    "policy": pol,
                    "threshold": p["threshold"],
                    "hit_rate_sweep": p["hit_rate"],
                    "hit_rate_bench": r["hit_rate"],
                    "accuracy_cached": p.get("accuracy_cached"),
                    "accuracy_loss": p.get("accuracy_loss"),
                    "agreement": p.get("agreement"),
                    "reuse_fraction": p["reuse_fraction"],
                    "workload_speedup_vs_sdpa": r["workload_speedup_vs_sdpa"],
                    "e2e_speedup_hits": r["e2e_speedup_vs_sdpa"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            # saved after every point, so an interrupted run keeps what it measured
            Path(a.out).write_text(
                json.dumps({"db": a.db, "data": a.data, "limit": a.limit, "rows": rows}, indent=1)
            )
    if a.plot:
        plot(rows, points, a.data, a.plot)


def plot(rows: list[dict], points: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    for ax, key, label in (
        (axes[0], "accuracy_cached", "accuracy"),
        (axes[1], "agreement", "agreement with exact"),
    ):
        for pol in policies:  # in threshold order, each point labelled with its hit rate
            pts = sorted(
                (r["threshold"], r["workload_speedup_vs_sdpa"], r[key], r["hit_rate_sweep"])
                for r in rows
                if r["policy"] == pol
            )
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=pol)
            for _, x, y, h in pts:
                ax.annotate(
                    f"{h:.0%}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        ax.axvline(1.0, color="k", lw=0.6)
        ax.set_xlabel("workload speedup vs SDPA (hits + misses + lookup)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    exact = next((p["accuracy_baseline"] for p in points if "accuracy_baseline" in p), None)
    if exact is not None:
        axes[0].axhline(exact, color="tab:green", ls="--", lw=0.8, label="exact")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"{title}: each point is one threshold (labels: hit rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
