"""Markdown tables from the JSON that benchmarks/experiments.sh writes to runs/exp/ (for docs/results.md).

    python benchmarks/summarize.py [runs/exp]
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


def f(v, nd=3, suffix=""):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}{suffix}"
    return f"{v}{suffix}"


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def evals(obj) -> list[dict]:
    if obj is None:
        return []
    return obj.get("results", [obj])


def section_eval(title: str, name: str) -> None:
    rows = []
    for r in evals(load(name)):
        rows.append([r["policy"], r["n"], f(r.get("accuracy_baseline")), f(r.get("accuracy_cached")),
                     f(r.get("agreement")), f(r.get("hit_rate"), 2), f(r.get("reuse_fraction")),
                     f(r.get("prefix_tokens_reused_fraction"), 2)])
    if rows:
        print(f"\n#### {title}\n")
        print(table(["policy", "n", "acc exact", "acc cached", "agreement", "hit rate", "maps reused",
                     "prefix tokens reused"], rows))


def section_bench(title: str, names: list[str]) -> None:
    rows = []
    for n in names:
        r = load(n)
        if r is None:
            continue
        rows.append([r["policy"], r.get("dtype", "float32"), r["n"], f(r["tokens_median"], 0), f(r["hit_rate"], 2),
                     f(r["attn_speedup_vs_sdpa"], 2, "x"), f(r["attn_speedup_vs_eager"], 2, "x"),
                     f(r["e2e_speedup_vs_sdpa"], 2, "x"), f(r["e2e_speedup_vs_eager"], 2, "x"),
                     f(r["bound_e2e_speedup"], 2, "x"), f(r["fraction_of_bound"], 2),
                     f(r["workload_speedup_vs_sdpa"], 2, "x"), f(r.get("workload_speedup_map_only"), 2, "x"),
                     f(r.get("workload_speedup_prefix_only"), 2, "x"), f(r["lookup_ms_median"], 2),
                     f(r["fetch_ms_median"], 2), f(r["prefill_ms_median_sdpa"], 0)])
    if rows:
        print(f"\n#### {title}\n")
        print(table(["policy", "dtype", "n", "tokens", "hit rate", "attn/SDPA", "attn/eager", "e2e/SDPA", "e2e/eager",
                     "bound e2e", "of bound", "workload", "workload map only", "workload prefix only", "lookup ms",
                     "fetch ms", "SDPA prefill ms"], rows))


def section_sweep(title: str, name: str) -> None:
    obj = load(name)
    if obj is None:
        return
    rows = []
    for r in obj["points"]:
        rows.append([r["policy"], f(r["threshold"], 4), f(r["hit_rate"], 2), f(r["reuse_fraction"]),
                     f(r.get("accuracy_cached")), f(r.get("accuracy_loss")), f(r.get("agreement")),
                     f(r.get("cosine_to_exact_mean"), 4)])
    print(f"\n#### {title}\n")
    print(table(["policy", "threshold", "hit rate", "maps reused", "acc cached", "acc loss", "agreement",
                 "cosine"], rows))


def section_mmlu() -> None:
    rows = []
    for k in range(6):
        ins, ev, be = load(f"mmlu{k}_inspect.json"), evals(load(f"mmlu{k}_eval.json")), load(f"mmlu{k}_bench_all.json")
        if ins is None:
            continue
        by = {r["policy"]: r for r in ev}
        a, d = by.get("all", {}), by.get("default", {})
        rows.append([k, ins["length_median"], f"{ins['length_min']}–{ins['length_max']}",
                     f(ins["bytes_per_entry"] / 2**20, 1), f(a.get("hit_rate"), 2), f(a.get("agreement"), 2),
                     f(d.get("agreement"), 2), f(a.get("accuracy_baseline"), 2),
                     f(be and be["attn_speedup_vs_sdpa"], 2, "x"), f(be and be["attn_speedup_vs_eager"], 2, "x"),
                     f(be and be["e2e_speedup_vs_sdpa"], 2, "x"), f(be and be["e2e_speedup_vs_eager"], 2, "x"),
                     f(be and be["bound_e2e_speedup"], 2, "x"), f(be and be["prefill_ms_median_sdpa"], 0)])
    if rows:
        print("\n#### MMLU 0- to 5-shot (SmolLM2)\n")
        print(table(["shots", "median tokens (cache)", "range", "MiB / entry", "hit rate", "agreement (all)",
                     "agreement (default)", "acc exact", "attn/SDPA", "attn/eager", "e2e/SDPA", "e2e/eager",
                     "bound e2e", "SDPA prefill ms"], rows))


def section_length() -> None:
    rows = load("length_scaling.json")
    if not rows:
        return
    print("\n#### Speedup vs length (SmolLM2, all layers, hits, fp16 maps)\n")
    print(table(["tokens", "attn/SDPA", "e2e/SDPA", "e2e/eager", "bound e2e", "of bound", "fetch ms", "SDPA ms"],
                [[f(r["tokens_median"], 0), f(r["attn_speedup_vs_sdpa"], 2, "x"), f(r["e2e_speedup_vs_sdpa"], 2, "x"),
                  f(r["e2e_speedup_vs_eager"], 2, "x"), f(r["bound_e2e_speedup"], 2, "x"), f(r["fraction_of_bound"], 2),
                  f(r["fetch_ms_median"], 1), f(r["prefill_ms_median_sdpa"], 0)] for r in rows]))


if __name__ == "__main__":
    section_eval("SST-2, SmolLM2 (cache sst2[0:436], eval sst2[436:872])", "sst2_eval.json")
    section_bench("SST-2 timing (40 held-out prompts, batch 1)", ["sst2_bench_all.json", "sst2_bench_default.json"])
    section_sweep("SST-2 sweep", "sst2_sweep.json")
    section_eval("PIQA, SmolLM2 (cache piqa[0:400], eval piqa[400:800])", "piqa_eval.json")
    section_bench("PIQA timing", ["piqa_bench_default.json"])
    section_sweep("PIQA sweep", "piqa_sweep.json")
    section_mmlu()
    section_eval("Prefix tier: MMLU 5-shot in dataset order (batch 1)", "prefix_mmlu5_eval.json")
    section_bench("Prefix tier timing: MMLU 5-shot", ["prefix_mmlu5_bench.json"])
    section_eval("Prefix tier: PIQA choices (batch 1)", "prefix_piqa_eval.json")
    section_bench("Prefix tier timing: PIQA", ["prefix_piqa_bench.json"])
    section_eval("MiniLM, SST-2 sentences", "minilm_sst2_eval.json")
    section_eval("MiniLM, RTE pairs", "minilm_rte_eval.json")
    section_bench("MiniLM timing", ["minilm_bench_b1.json", "minilm_bench_b32.json"])
    section_length()
    section_eval("int8 dynamic quantization, SST-2", "quant_sst2_eval.json")
    section_bench("int8 dynamic quantization timing", ["quant_sst2_bench.json", "quant_mmlu5_bench.json"])
