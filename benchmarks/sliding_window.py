"""The exact tiers on a sliding-window family beside SmolLM2: same jobs, same baseline rule.

No Gemma-3 weights install offline, so the Gemma-3 model here has gemma-3-270m's shape (18 layers,
five sliding layers of a 512-token window to one full layer, 4 query heads, 1 K/V head of 256, the
262,144-token vocabulary) with random weights (seed 0) and SmolLM2's tokenizer. Speed depends on the
shape, not the weights' values; exactness is checked on these weights (agreement of every row and
the largest log-prob difference come from ``attncache eval``: plain model against the tiers).

Per model and job: ``attncache bench`` (plain SDPA at its best batch size against attncache at its
own, medians of interleaved passes) and ``attncache eval --no-memo`` (agreement). Prints a table and
writes one JSON.

    python benchmarks/sliding_window.py --out runs/exp/sliding_window.json
    python benchmarks/sliding_window.py --jobs 'sst2:4shot[0:8]' --models tiny:DIR  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

GEMMA3_270M_SHAPE = dict(
    vocab_size=262144,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    sliding_window=512,
    max_position_embeddings=32768,
    query_pre_attn_scalar=256,
)


def gemma3_shaped(folder: Path) -> Path:
    """A random Gemma-3 of gemma-3-270m's shape with SmolLM2's tokenizer, saved once."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from attncache import load_model

    _, tok = load_model("smollm2-135m")
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(**GEMMA3_270M_SHAPE)
    cfg.pad_token_id = tok.pad_token_id
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def attncache(*args: str) -> dict:
    cmd = [sys.executable, "-m", "attncache", *args, "--json", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout)


def measure(model: str, job: str, batch_sizes: str, passes: int) -> dict:
    bench = attncache(
        "bench", "--model", model, "--data", job, "--batch-sizes", batch_sizes,
        "--pass-repeats", str(passes), "--no-per-item", "--no-eager",
    )  # fmt: skip
    ev = attncache("eval", "--model", model, "--data", job, "--no-memo")
    return {
        "model": model,
        "job": job,
        "best_sdpa_batch": bench["best_sdpa_batch_size"],
        "sdpa_s": bench["workload_seconds_best_sdpa"],
        "attncache_batch": bench["workload_batch_size"],
        "attncache_s": bench["workload_seconds"],
        "speedup": bench["workload_speedup_vs_best_sdpa"],
        "prefix_tokens_reused": bench.get("prefix_tokens_reused_fraction"),
        "agreement": ev.get("agreement"),
        "rows": ev.get("n"),
        "machine": bench.get("machine"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="sst2:8shot[0:64],arc_easy:5shot[0:12]")
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m-shape")
    ap.add_argument("--gemma-dir", default="runs/gemma3-270m-shape")
    ap.add_argument("--batch-sizes", default="4,8,16")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        model = str(gemma3_shaped(Path(args.gemma_dir))) if name == "gemma3-270m-shape" else name
        model = model.removeprefix("tiny:")
        for job in args.jobs.split(","):
            rows.append({**measure(model, job, args.batch_sizes, args.passes), "name": name})
            r = rows[-1]
            print(
                f"{name:18} {job:22} sdpa {r['sdpa_s']:7.2f} s (b{r['best_sdpa_batch']}) "
                f"attncache {r['attncache_s']:7.2f} s (b{r['attncache_batch']}) "
                f"{r['speedup']:5.2f}x reused {r['prefix_tokens_reused'] or 0:.2f} "
                f"agreement {r['agreement']}",
                flush=True,
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
