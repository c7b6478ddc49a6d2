"""Markdown tables for the exact tiers, build/calibrate speed and peers (docs/results.md), from the
JSON that ``benchmarks/experiments.sh SECTION`` writes to runs/exp/ (sections redesign, buildspeed,
calspeed, calgoal, batchscale, memo, plain, allhit, peers).

    python benchmarks/summarize_tiers.py [runs/exp]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

D = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/exp")


def load(name: str):
    p = D / name
    if not p.exists() or p.stat().st_size == 0:
        return None
    return json.loads(p.read_text())


def f(v, nd=2, suffix=""):
    if v is None:
        return "–"
    return f"{v:.{nd}f}{suffix}" if isinstance(v, float) else f"{v}{suffix}"


def table(title: str, headers: list[str], rows: list[list]) -> None:
    if not rows:
        return
    print(f"\n#### {title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


def redesign() -> None:
    rows = []
    for label, prefix in (("before", "redesign_before_"), ("after", "redesign_")):
        for p in ("all", "default"):
            b = load(f"{prefix}sst2_bench_{p}.json")
            if b:
                rows.append(
                    [
                        f"SST-2, {p}",
                        label,
                        f(b["attn_speedup_vs_sdpa"], 3, "x"),
                        f(b["e2e_speedup_vs_sdpa"], 3, "x"),
                        f(b["bound_e2e_speedup"], 3, "x"),
                        f(b["fraction_of_bound"], 3),
                        f(b["workload_speedup_vs_sdpa"], 2, "x"),
                    ]
                )
        b = load(f"{prefix}prefix_mmlu5_bench.json")
        if b:
            rows.append(
                [
                    "MMLU 5-shot, prefix tier",
                    label,
                    "–",
                    "–",
                    "–",
                    "–",
                    f"{b['workload_speedup_vs_sdpa']:.2f}x "
                    f"(prefix only {b['workload_speedup_prefix_only']:.2f}x, "
                    f"{b['prefix_tokens_reused_fraction']:.0%} of tokens)",
                ]
            )
    table(
        "Redesign (issue 14): before vs after, same machine, batch 1",
        ["job", "code", "attn", "e2e", "bound", "of bound", "workload"],
        rows,
    )


def buildspeed() -> None:
    rows = []
    for c in ("smollm2", "int8"):
        before, after = load(f"pair_labels_before_{c}.json"), load(f"pair_labels_after_{c}.json")
        if before and after:
            rows.append(
                [
                    after["codec"],
                    after["pairs"],
                    f(before["seconds"], 1, " s"),
                    f(after["seconds"], 1, " s"),
                    f(before["seconds"] / after["seconds"], 1, "x"),
                ]
            )
    table(
        "Pair labels (4,000 pairs of sst2[0:436] maps)",
        ["maps", "pairs", "before", "after", "speedup"],
        rows,
    )


def build_log(name: str) -> tuple[float | None, dict[str, str]]:
    """Total seconds (``time``'s real) and the stage lines of a logged ``attncache build``."""
    p = D / name
    if not p.exists():
        return None, {}
    total, stages = None, {}
    for line in p.read_text().splitlines():
        if line.startswith("real"):
            minutes, seconds = line.split()[1].rstrip("s").split("m")
            total = 60 * float(minutes) + float(seconds)
        elif ": " in line and line.rstrip().endswith(" s"):
            stage, rest = line.split(": ", 1)
            stages[stage] = rest.split(" in ")[-1]
    return total, stages


def buildtime() -> None:
    rows = []
    for label, name in (
        ("before", "build_sst2_stages_before.log"),
        ("after", "build_sst2_stages.log"),
    ):
        total, stages = build_log(name)
        if total is not None:
            rows.append([label, f(total / 60, 1, " min")] + [stages.get(k, "–") for k in STAGES])
    table(
        "`attncache build --data sst2[0:436]`, default settings (after: with its own calibration)",
        ["code", "total", *STAGES],
        rows,
    )


STAGES = ("recording maps", "pair labels", "projector", "exact", "calibration candidates")


def search_columns(c: dict) -> list:
    """A calibration result's rows, time, candidates, passes, choice, reuse and bound."""
    return [
        f"{c.get('selection_rows', c['n'])} / {c['n']}",
        f(c["seconds"] / 60, 1, " min"),
        c["candidates"],
        f(c["passes"], 1),
        c["policy"],
        f(c["reuse_fraction"], 3),
        f(c["disagreement_bound"], 3),
    ]


def calspeed() -> None:
    rows = []
    modes = ("search_presplit", "exhaustive_presplit", "search", "exhaustive")
    for data in ("mmlu0", "sst2"):
        for mode in modes:
            c = load(f"calspeed_{data}_{mode}.json")
            if c:
                rows.append(
                    [
                        c["data"],
                        mode.replace("_presplit", ", bound on the choosing rows"),
                        *search_columns(c)[:-1],
                        f(c["agreement"], 3),
                        f(c["disagreement_bound"], 3),
                    ]
                )
    table(
        "Calibration: pruned search vs every candidate to the end (--max-loss 0.05)",
        [
            "rows",
            "search",
            "choose / bound rows",
            "time",
            "candidates",
            "passes",
            "chosen",
            "reuse",
            "agreement",
            "bound",
        ],
        rows,
    )


def calgoal() -> None:
    """Issue 16's goal under the select/verify statistics: 150 MMLU rows at --max-loss 0.10."""
    rows = []
    for mode in ("search", "exhaustive"):
        c = load(f"calgoal_mmlu0_{mode}.json")
        if c:
            rows.append(
                [
                    mode,
                    *search_columns(c),
                ]
            )
    fresh = load("calgoal_mmlu0_fresh.json")
    if fresh:
        e = fresh[0] if isinstance(fresh, list) else fresh
        rows.append(
            [
                "stored (search), on 300 untouched rows",
                "–",
                "–",
                "–",
                "–",
                e.get("policy", "default"),
                f(e.get("reuse_fraction"), 3),
                f"changed {f(1 - e['agreement'], 3)}",
            ]
        )
    table(
        "Calibration on 150 rows of mmlu[1::10] at --max-loss 0.10: search vs every candidate",
        [
            "search",
            "choose / bound rows",
            "time",
            "candidates",
            "passes",
            "chosen",
            "reuse",
            "bound",
        ],
        rows,
    )


JOBS = (
    ("mmlu5", "MMLU 5-shot, dataset order (mmlu:5shot[0:30])"),
    ("mmlu5_100", "MMLU 5-shot, dataset order (mmlu:5shot[0:100])"),
    ("sst2_4shot", "SST-2 4-shot (sst2:4shot[0:64])"),
    ("arc5", "ARC-Easy 5-shot (arc_easy:5shot[0:40])"),
    ("hellaswag", "HellaSwag (hellaswag[0:40])"),
    ("piqa", "PIQA (piqa[0:64])"),
    ("sst2_0shot", "SST-2 zero-shot, no DB (sst2[436:500])"),
)


def batchscale() -> None:
    rows = []
    for key, label in JOBS:
        b, e = load(f"batchscale_{key}_bench.json"), load(f"batchscale_{key}_eval.json")
        if b:
            ev = e["results"][0] if e and "results" in e else e
            rows.append(
                [
                    label,
                    b.get("workload_tokens"),
                    f"{b['workload_seconds_best_sdpa']:.2f} s (b{b['best_sdpa_batch_size']})",
                    f"{b['workload_seconds']:.2f} s (b{b['workload_batch_size']})",
                    f(b["workload_speedup_vs_best_sdpa"], 2, "x"),
                    f(b.get("prefix_tokens_reused_fraction"), 2),
                    f(ev.get("agreement") if ev else None, 3),
                ]
            )
    ev = load("batchscale_sst2_db_eval.json")
    by_policy = {r["policy"]: r for r in ev["results"]} if ev else {}
    for p in ("default", "all"):
        b = load(f"batchscale_sst2_db_{p}.json")
        if b:
            r = by_policy.get(p, {})
            rows.append(
                [
                    f"SST-2 zero-shot, map DB, policy {p} (agreement on sst2[436:])",
                    b.get("workload_tokens"),
                    f"{b['workload_seconds_best_sdpa']:.2f} s (b{b['best_sdpa_batch_size']})",
                    f"{b['workload_seconds']:.2f} s (b{b['workload_batch_size']})",
                    f(b["workload_speedup_vs_best_sdpa"], 2, "x"),
                    f(b.get("prefix_tokens_reused_fraction"), 2),
                    f(r.get("agreement"), 3),
                ]
            )
    table(
        "Workloads vs plain SDPA at its best batch size (medians of 3 interleaved passes)",
        [
            "job",
            "tokens",
            "best SDPA",
            "attncache",
            "speedup",
            "prefix tokens reused",
            "agreement",
        ],
        rows,
    )


def memo() -> None:
    rows = []
    for k in (1, 2):
        e = load(f"memo_eval_{k}.json")
        if e:
            r = e["results"][0] if "results" in e else e
            rows.append(
                [
                    k,
                    f(r.get("memo_hit_rate"), 3),
                    f(r.get("seconds_cached"), 2, " s"),
                    f(r.get("seconds_exact"), 2, " s"),
                    f(r.get("agreement"), 3),
                ]
            )
    table(
        "Result memo: the same eval twice on one DB (sst2[436:636], policy default)",
        ["run", "memo hit rate", "seconds (tiers)", "seconds (exact pass)", "agreement"],
        rows,
    )


def plain() -> None:
    p = load("plain_path_sst2.json")
    if p:
        table(
            f"The plain path ({p['data']}, {p['rows']} rows, {p['tokens']} tokens)",
            ["variant", "best batch", "seconds", "vs fp32 sorted", "agreement"],
            [
                [
                    name,
                    v["batch_size"],
                    f(v["seconds"], 2),
                    f(v["speedup_vs_fp32_best"], 2, "x"),
                    f(v["agreement"], 3),
                ]
                for name, v in sorted(p["best"].items(), key=lambda kv: kv[1]["seconds"])
            ],
        )


def allhit() -> None:
    b = load("allhit_mmlu.json")
    if not b or b.get("workload_seconds_bound") is None:
        return
    table(
        f"All-hit workload ({b['n']} items, every one a hit, policy {b['policy']})",
        ["bound", "batch", "speedup vs SDPA, same batch", "attncache", "fraction kept"],
        [
            [
                "per item, maps in RAM, no lookup",
                1,
                f(b["bound_e2e_speedup"], 3, "x"),
                f(b["e2e_speedup_vs_sdpa"], 3, "x"),
                f(b["fraction_of_bound"], 3),
            ],
            [
                "workload pass, hits replayed, maps in RAM, no lookup",
                b["workload_batch_size"],
                f(b["workload_bound_speedup_vs_sdpa"], 3, "x"),
                f(b["workload_speedup_vs_sdpa"], 3, "x"),
                f(b["workload_fraction_of_bound"], 3),
            ],
        ],
    )


def peers() -> None:
    for key in ("sst2", "mmlu5"):
        p = load(f"peers_{key}.json")
        cold = load(f"peers_{key}_cold.json")  # engines rerun with every pass starting empty
        if p and cold:
            again = {e["engine"]: e for e in cold["engines"] if e["engine"] != "hf fp32 sdpa"}
            known = {e["engine"] for e in p["engines"]}
            p["engines"] = [again.get(e["engine"], e) for e in p["engines"]]
            p["engines"] += [e for name, e in again.items() if name not in known]
        if p:
            rows = [
                [
                    e["engine"],
                    e.get("batch_size", "–"),
                    f(e.get("seconds"), 2),
                    f(e.get("agreement"), 3),
                ]
                if "skipped" not in e
                else [e["engine"], "–", "skipped: " + e["skipped"], "–"]
                for e in p["engines"]
            ]
            table(
                f"Peers on {p['data']} ({p['rows']} rows, {p['tokens']} tokens)",
                ["engine", "batch / slots", "seconds per pass", "agreement"],
                rows,
            )


if __name__ == "__main__":
    redesign()
    buildspeed()
    buildtime()
    calspeed()
    calgoal()
    batchscale()
    memo()
    plain()
    allhit()
    peers()
