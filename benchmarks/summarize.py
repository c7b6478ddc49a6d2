"""Markdown tables from the JSON that benchmarks/experiments.sh writes to runs/exp/ (for
docs/results.md).

python benchmarks/summarize.py [runs/exp] [--plots]   # --plots: redraw docs/fidelity_*.png from the
JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
D = Path(ARGS[0] if ARGS else "runs/exp")


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
        rows.append(
            [
                r["policy"],
                r["n"],
                f(r.get("accuracy_baseline")),
                f(r.get("accuracy_cached")),
                f(r.get("agreement")),
                f(r.get("hit_rate"), 2),
                f(r.get("reuse_fraction")),
                f(r.get("prefix_tokens_reused_fraction"), 2),
            ]
        )
    if rows:
        print(f"\n#### {title}\n")
        print(
            table(
                [
                    "policy",
                    "n",
                    "acc exact",
                    "acc cached",
                    "agreement",
                    "hit rate",
                    "maps reused",
                    "prefix tokens reused",
                ],
                rows,
            )
        )


def section_bench(title: str, names: list[str]) -> None:
    rows = []
    for n in names:
        r = load(n)
        if r is None:
            continue
        rows.append(
            [
                r["policy"],
                r.get("dtype", "float32"),
                r["n"],
                f(r["tokens_median"], 0),
                f(r["hit_rate"], 2),
                f(r["attn_speedup_vs_sdpa"], 2, "x"),
                f(r["attn_speedup_vs_eager"], 2, "x"),
                f(r["e2e_speedup_vs_sdpa"], 2, "x"),
                f(r["e2e_speedup_vs_eager"], 2, "x"),
                f(r["bound_e2e_speedup"], 2, "x"),
                f(r["fraction_of_bound"], 2),
                f(r["workload_speedup_vs_sdpa"], 2, "x"),
                f(r.get("workload_speedup_map_only"), 2, "x"),
                f(r.get("workload_speedup_prefix_only"), 2, "x"),
                f(r["lookup_ms_median"], 2),
                f(r["fetch_ms_median"], 2),
                f(r["prefill_ms_median_sdpa"], 0),
            ]
        )
    if rows:
        print(f"\n#### {title}\n")
        print(
            table(
                [
                    "policy",
                    "dtype",
                    "n",
                    "tokens",
                    "hit rate",
                    "attn/SDPA",
                    "attn/eager",
                    "e2e/SDPA",
                    "e2e/eager",
                    "bound e2e",
                    "of bound",
                    "workload",
                    "workload map only",
                    "workload prefix only",
                    "lookup ms",
                    "fetch ms",
                    "SDPA prefill ms",
                ],
                rows,
            )
        )


def section_sweep(title: str, name: str) -> None:
    obj = load(name)
    if obj is None:
        return
    rows = []
    for r in obj["points"]:
        rows.append(
            [
                r["policy"],
                f(r["threshold"], 4),
                f(r["hit_rate"], 2),
                f(r["reuse_fraction"]),
                f(r.get("accuracy_cached")),
                f(r.get("accuracy_loss")),
                f(r.get("agreement")),
                f(r.get("cosine_to_exact_mean"), 4),
            ]
        )
    print(f"\n#### {title}\n")
    print(
        table(
            [
                "policy",
                "threshold",
                "hit rate",
                "maps reused",
                "acc cached",
                "acc loss",
                "agreement",
                "cosine",
            ],
            rows,
        )
    )


def section_fidelity(name: str, title: str) -> None:
    """Template heads vs the paper's all-layer reuse (Pareto points), and the calibrated setting on
    fresh data."""
    sw = load(f"fid_{name}_sweep.json")
    if sw is None:
        return
    rows = []
    for r in sw["points"]:
        if r["policy"] in ("all", "default") and r["threshold"] < 0:
            continue  # the exact end of the curve, once is enough (below)
        rows.append(
            [
                r["policy"],
                f(r["threshold"], 4),
                f(r["hit_rate"], 2),
                f(r["reuse_fraction"]),
                f(r.get("attention_work_saved")),
                f(r.get("accuracy_cached")),
                f(r.get("accuracy_loss")),
                f(r.get("agreement")),
            ]
        )
    base = sw["points"][0]
    print(
        f"\n#### {title}: reuse vs fidelity (exact accuracy {f(base.get('accuracy_baseline'))})\n"
    )
    print(
        table(
            [
                "policy",
                "threshold",
                "hit rate",
                "maps reused",
                "attn FLOPs saved",
                "acc cached",
                "acc loss",
                "agreement",
            ],
            rows,
        )
    )
    cal, fresh = load(f"fid_{name}_calibrate.json"), load(f"fid_{name}_fresh.json")
    if cal and fresh:
        print(
            f"\nCalibrated (max-loss {cal['max_loss']}): policy `{cal['policy']}`, "
            f"threshold {f(cal['threshold'], 4)}, {cal['policy_fixed_heads']} template heads; "
            f"on the calibration rows: reuse {f(cal['reuse_fraction'])}, "
            f"agreement {f(cal['agreement'])}, bound {f(cal['disagreement_bound'])}. "
            "On the untouched test rows: "
            f"reuse {f(fresh['reuse_fraction'])}, accuracy {f(fresh.get('accuracy_baseline'))} -> "
            f"{f(fresh.get('accuracy_cached'))}, agreement {f(fresh['agreement'])}."
        )


def section_retrieval() -> None:
    r = load("retrieval_features_sst2.json")
    if r is None:
        return
    print(f"\n#### Retrieval features ({r['data']}, {r['n']} inputs)\n")
    print(
        table(
            ["neighbour chosen by", "median row TV to the input's own maps", "mean"],
            [[k, f(r["median_tv"][k]), f(r["mean_tv"][k])] for k in r["median_tv"]],
        )
    )


def section_template_ranking() -> None:
    r = load("template_ranking_sst2.json")
    g = load("fid_sst2_greedy_sweep.json")
    rows = [
        [x["ranking"], x["k"], f(x["reuse_fraction"]), f(x["accuracy_cached"]), f(x["agreement"])]
        for x in (r or {}).get("rows", [])
    ]
    rows += [
        [
            "attribution, 6 rounds",
            int(p["policy"].split(":")[1]),
            f(p["reuse_fraction"]),
            f(p.get("accuracy_cached")),
            f(p.get("agreement")),
        ]
        for p in (g or {}).get("points", [])
    ]
    if rows:
        print("\n#### SST-2: ranking heads for templates (test sst2[654:872])\n")
        print(table(["ranking", "template heads", "maps reused", "acc cached", "agreement"], rows))


def section_fidbench() -> None:
    rows = []
    for task in ("sst2", "mmlu2"):
        for pol in ("fixed54", "fixed135"):
            b = load(f"fidbench_{task}_{pol}.json")
            if b:
                rows.append(
                    [
                        task,
                        b["policy"],
                        b["n"],
                        f(b["tokens_median"], 0),
                        f(b["template_layers"] / 30),
                        f(b["attn_speedup_vs_sdpa"], 2, "x"),
                        f(b["e2e_speedup_vs_sdpa"], 2, "x"),
                        f(b.get("workload_speedup_map_only") or b.get("workload_speedup"), 2, "x"),
                        f(b["prefill_ms_median_sdpa"], 0),
                    ]
                )
    if rows:
        print("\n#### What template heads buy in time (batch 1, interleaved, medians of 3)\n")
        print(
            table(
                [
                    "task",
                    "policy",
                    "n",
                    "tokens",
                    "maps reused",
                    "attn/SDPA",
                    "e2e/SDPA",
                    "workload/SDPA",
                    "SDPA prefill ms",
                ],
                rows,
            )
        )


def section_mmlu() -> None:
    rows = []
    for k in range(6):
        ins, ev, be = (
            load(f"mmlu{k}_inspect.json"),
            evals(load(f"mmlu{k}_eval.json")),
            load(f"mmlu{k}_bench_all.json"),
        )
        if ins is None:
            continue
        by = {r["policy"]: r for r in ev}
        a, d = by.get("all", {}), by.get("default", {})
        rows.append(
            [
                k,
                ins["length_median"],
                f"{ins['length_min']}–{ins['length_max']}",
                f(ins["bytes_per_entry"] / 2**20, 1),
                f(a.get("hit_rate"), 2),
                f(a.get("agreement"), 2),
                f(d.get("agreement"), 2),
                f(a.get("accuracy_baseline"), 2),
                f(be and be["attn_speedup_vs_sdpa"], 2, "x"),
                f(be and be["attn_speedup_vs_eager"], 2, "x"),
                f(be and be["e2e_speedup_vs_sdpa"], 2, "x"),
                f(be and be["e2e_speedup_vs_eager"], 2, "x"),
                f(be and be["bound_e2e_speedup"], 2, "x"),
                f(be and be["prefill_ms_median_sdpa"], 0),
            ]
        )
    if rows:
        print("\n#### MMLU 0- to 5-shot (SmolLM2)\n")
        print(
            table(
                [
                    "shots",
                    "median tokens (cache)",
                    "range",
                    "MiB / entry",
                    "hit rate",
                    "agreement (all)",
                    "agreement (default)",
                    "acc exact",
                    "attn/SDPA",
                    "attn/eager",
                    "e2e/SDPA",
                    "e2e/eager",
                    "bound e2e",
                    "SDPA prefill ms",
                ],
                rows,
            )
        )


def section_length() -> None:
    rows = load("length_scaling.json")
    if not rows:
        return
    print("\n#### Speedup vs length (SmolLM2, all layers, hits, fp16 maps)\n")
    print(
        table(
            [
                "tokens",
                "attn/SDPA",
                "e2e/SDPA",
                "e2e/eager",
                "bound e2e",
                "of bound",
                "fetch ms",
                "SDPA ms",
            ],
            [
                [
                    f(r["tokens_median"], 0),
                    f(r["attn_speedup_vs_sdpa"], 2, "x"),
                    f(r["e2e_speedup_vs_sdpa"], 2, "x"),
                    f(r["e2e_speedup_vs_eager"], 2, "x"),
                    f(r["bound_e2e_speedup"], 2, "x"),
                    f(r["fraction_of_bound"], 2),
                    f(r["fetch_ms_median"], 1),
                    f(r["prefill_ms_median_sdpa"], 0),
                ]
                for r in rows
            ],
        )
    )


def section_store() -> None:
    rows = []
    for task, evname in (
        ("SST-2", "store_sst2_{}.json"),
        ("PIQA, threshold 0.25", "store_piqa_t025_{}.json"),
    ):
        for c in ("float16", "int8", "sparse"):
            ins = load(evname.split("_")[0] + "_" + evname.split("_")[1] + f"_{c}_inspect.json")
            for r in evals(load(evname.format(c))):
                mib = ins and ins["map_bytes"] / ins["entries"] / 2**20
                rows.append(
                    [
                        task,
                        c,
                        f(ins and ins["map_bytes_vs_fp32"], 3),
                        f(mib, 2),
                        r["policy"],
                        f(r.get("accuracy_cached")),
                        f(r.get("agreement")),
                        f(r.get("hit_rate"), 2),
                    ]
                )
    ins, ev = load("store_sst2_auto_inspect.json"), evals(load("store_sst2_auto.json"))
    for r in ev if ins else []:
        rows.append(
            [
                "SST-2",
                f"int8, {ins['stored_layers']} layers (auto)",
                f(ins["map_bytes_vs_fp32"], 4),
                f(ins["map_bytes"] / ins["entries"] / 2**20, 3),
                r["policy"],
                f(r.get("accuracy_cached")),
                f(r.get("agreement")),
                f(r.get("hit_rate"), 2),
            ]
        )
    if rows:
        print(
            "\n#### Map compression (same entries, projector and hits; "
            "only the maps' encoding differs)\n"
        )
        print(
            table(
                [
                    "task",
                    "codec",
                    "bytes / fp32",
                    "MiB / entry",
                    "policy",
                    "acc cached",
                    "agreement",
                    "hit rate",
                ],
                rows,
            )
        )
    rows = []
    for pol, c in (
        ("all", "float16"),
        ("all", "int8"),
        ("default", "float16"),
        ("default", "int8"),
    ):
        r = load(
            f"store_mmlu2_bench_{c}.json" if pol == "all" else f"store_mmlu2_bench_default_{c}.json"
        )
        if r:
            share = (r["lookup_ms_median"] + r["fetch_ms_median"]) / r["prefill_ms_median_sdpa"]
            rows.append(
                [
                    pol,
                    c,
                    f(r["tokens_median"], 0),
                    f(r["lookup_ms_median"], 2),
                    f(r["fetch_ms_median"], 2),
                    f(r["prefill_ms_median_sdpa"], 0),
                    f(100 * share, 1, " %"),
                    f(r["e2e_speedup_vs_sdpa"], 2, "x"),
                    f(r["bound_e2e_speedup"], 2, "x"),
                ]
            )
    if rows:
        print("\n#### Lookup + fetch as a share of prefill, MMLU 2-shot (hits)\n")
        print(
            table(
                [
                    "policy",
                    "codec",
                    "tokens",
                    "lookup ms",
                    "fetch ms",
                    "SDPA prefill ms",
                    "lookup+fetch / prefill",
                    "e2e/SDPA",
                    "bound e2e",
                ],
                rows,
            )
        )
    sc = load("store_scale.json")
    if sc:
        ev = sc["eviction"]
        print("\n#### Eviction on a skewed stream\n")
        print(
            table(
                [
                    "stream",
                    "distinct inputs",
                    "Zipf a",
                    "cap (entries)",
                    "LRU hit rate",
                    "LFU hit rate",
                ],
                [
                    [
                        ev["stream"],
                        ev["distinct"],
                        ev["zipf_a"],
                        ev["cap_entries"],
                        f(ev["lru"]["hit_rate"]),
                        f(ev["lfu"]["hit_rate"]),
                    ]
                ],
            )
        )
        if "scale" in sc:
            s_ = sc["scale"]
            print(
                f"\n#### Store at scale ({s_['codec']}, {s_['stored_layers']} layers "
                f"x {s_['heads']} heads, "
                f"{s_['length']} tokens; memcpy {s_['memcpy_gbps']:.1f} GB/s)\n"
            )
            print(
                table(
                    [
                        "entries",
                        "map MiB",
                        "open s",
                        "lookup p50 ms",
                        "lookup p99 ms",
                        "fetch ms / entry",
                        "fetch GB/s (decoded)",
                        "fetch GB/s (stored)",
                    ],
                    [
                        [
                            r["entries"],
                            f(r["map_bytes"] / 2**20, 0),
                            f(r["open_s"], 3),
                            f(r["lookup_ms_p50"], 3),
                            f(r["lookup_ms_p99"], 3),
                            f(r["fetch_ms_per_entry"], 2),
                            f(r["fetch_decoded_gbps"], 2),
                            f(r["fetch_stored_gbps"], 3),
                        ]
                        for r in s_["curve"]
                    ],
                )
            )


def section_speed_accuracy() -> None:
    obj = load("speed_accuracy_sst2.json")
    if obj:
        print("\n#### SST-2: speedup vs accuracy per threshold\n")
        print(
            table(
                [
                    "policy",
                    "threshold",
                    "hit rate (eval)",
                    "hit rate (bench)",
                    "acc cached",
                    "agreement",
                    "workload/SDPA",
                    "e2e/SDPA on hits",
                ],
                [
                    [
                        r["policy"],
                        f(r["threshold"], 4),
                        f(r["hit_rate_sweep"], 2),
                        f(r["hit_rate_bench"], 2),
                        f(r["accuracy_cached"]),
                        f(r["agreement"]),
                        f(r["workload_speedup_vs_sdpa"], 2, "x"),
                        f(r["e2e_speedup_hits"], 2, "x"),
                    ]
                    for r in obj["rows"]
                ],
            )
        )


def section_load() -> None:
    r = load("load_test_minilm.json")
    if r:
        print(
            f"\n#### HTTP load test ({r['endpoint']}, concurrency {r['concurrency']}, "
            f"max batch {r['max_batch']})\n"
        )
        print(
            table(
                [
                    "server",
                    "requests",
                    "errors",
                    "throughput req/s",
                    "p50 ms",
                    "p99 ms",
                    "hit rate",
                ],
                [
                    [
                        k,
                        r[k]["requests"],
                        r[k]["errors"],
                        f(r[k]["throughput_rps"], 1),
                        f(r[k]["p50_ms"], 1),
                        f(r[k]["p99_ms"], 1),
                        f(r[k]["hit_rate"], 2),
                    ]
                    for k in ("detached", "attached")
                ],
            )
        )


if __name__ == "__main__":
    section_eval("SST-2, SmolLM2 (cache sst2[0:436], eval sst2[436:872])", "sst2_eval.json")
    section_bench(
        "SST-2 timing (40 held-out prompts, batch 1)",
        ["sst2_bench_all.json", "sst2_bench_default.json"],
    )
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
    section_bench(
        "int8 dynamic quantization timing", ["quant_sst2_bench.json", "quant_mmlu5_bench.json"]
    )
    section_bench(
        "Prefix tier timing v2 (suffix-only inserts), MMLU 5-shot, quiet machine",
        ["prefix_mmlu5_bench_v4.json"],
    )
    section_store()
    section_speed_accuracy()
    section_load()
    if "--plots" in sys.argv:
        from attncache.plots import plot_sweep

        for name, title in (
            ("sst2", "sst2[654:872]"),
            ("piqa", "piqa[800:1200]"),
            ("mmlu2", "mmlu:2shot[15::30]"),
        ):
            sw = load(f"fid_{name}_sweep.json")
            if sw is not None:
                plot_sweep(
                    sw["points"], f"docs/fidelity_{name}.png", title=f"{title}: reuse vs fidelity"
                )
    section_fidelity(
        "sst2",
        "SST-2 (cache sst2[0:436], templates and calibration sst2[436:654], test sst2[654:872])",
    )
    section_fidelity(
        "piqa",
        "PIQA (cache piqa[0:400], templates and calibration piqa[400:700], test piqa[800:1200])",
    )
    section_retrieval()
    section_template_ranking()
    section_fidbench()
    section_fidelity(
        "mmlu2", "MMLU 2-shot (cache [0::30], templates and calibration [20::30], test [15::30])"
    )
