"""Speedup of map reuse vs sequence length (issue: honest benchmarks, experiment 4).

Long inputs are made from real text (SST-2 sentences joined), cut to about N tokens. One cache entry
per length is built from the very inputs that are then timed, so every item is a hit and the numbers
show the mechanism's speed on hits — compute saved vs maps read — not retrieval quality.

    python benchmarks/length_scaling.py --lengths 64,128,256,512,1024,2048 --out runs/length.json
    --plot docs/length_scaling.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from attncache import BuildConfig, data, models
from attncache.bench import BenchConfig, bench
from attncache.workflows import BuildOptions, build


def texts_of_lengths(tok, lengths: list[int], per_length: int) -> list[str]:
    sentences = [r.text for r in data.load("sst2", encoder=True).rows]
    out, k = [], 0
    for L in lengths:
        for _ in range(per_length):
            ids: list[int] = []
            while len(ids) < L:
                ids += tok(" " + sentences[k % len(sentences)], add_special_tokens=False)[
                    "input_ids"
                ]
                k += 1
            out.append(tok.decode(ids[: L - 1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="64,128,256,512,1024")
    ap.add_argument("--per-length", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policy", default="all")
    ap.add_argument("--out", default="runs/length_scaling.json")
    ap.add_argument("--plot")
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    _, tok = models.load(a.model)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for L in lengths:
            jsonl = Path(d) / f"len{L}.jsonl"
            jsonl.write_text(
                "".join(
                    json.dumps({"text": t}) + "\n" for t in texts_of_lengths(tok, [L], a.per_length)
                )
            )
            db = Path(d) / f"len{L}.db"
            opts = BuildOptions(config=BuildConfig(codec="float16"), progress=False)
            build(a.model, str(jsonl), str(db), opts)  # the timing tables' codec
            r = bench(
                str(db), str(jsonl), a.policy, None, BenchConfig(repeats=a.repeats), progress=False
            )
            r.pop("per_item")
            r["target_tokens"] = L
            rows.append(r)
            print(
                json.dumps(
                    {
                        k: r[k]
                        for k in (
                            "target_tokens",
                            "tokens_median",
                            "hit_rate",
                            "attn_speedup_vs_sdpa",
                            "e2e_speedup_vs_sdpa",
                            "e2e_speedup_vs_eager",
                            "bound_e2e_speedup",
                            "fraction_of_bound",
                            "fetch_ms_median",
                            "prefill_ms_median_sdpa",
                        )
                    }
                ),
                flush=True,
            )
            import shutil

            shutil.rmtree(db)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [r["tokens_median"] for r in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (
            ("attn_speedup_vs_sdpa", "attention vs SDPA"),
            ("e2e_speedup_vs_sdpa", "end-to-end vs SDPA"),
            ("bound_e2e_speedup", "end-to-end bound (maps in RAM)"),
            ("e2e_speedup_vs_eager", "end-to-end vs eager"),
        ):
            ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("speedup (median, hits, all layers)")
        m = rows[0]["machine"]
        ax.set_title(f"{a.model}, {m['cpu'][:28]}, {m['threads']} threads")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)


if __name__ == "__main__":
    main()
