"""What makes the plain path (nothing to reuse) faster without changing answers? (issue 13, item 8)

Times whole passes of one workload through the plain model under several settings, each at its best
batch size, interleaved, and measures agreement of each setting's predictions with fp32 SDPA:

- ``fp32``: the model as loaded (SDPA), the baseline;
- ``fp32-unsorted``: batches in data order instead of by length (what sorting saves in padding);
- ``matmul-medium``: ``torch.set_float32_matmul_precision("medium")`` (bf16 inner products where
  the CPU has them);
- ``bf16``: bfloat16 weights;
- ``sdpa-math``: SDPA's reference (math) kernel instead of the fused CPU kernel it picks;
- ``compile``: ``torch.compile`` (inductor), compiled once before timing (``--compile``; slow to
  build).

    python benchmarks/plain_path.py --data "sst2[436:500]" --out runs/exp/plain_path_sst2.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attncache.bench import interleaved, machine
from attncache.inputs import collate
from attncache.tasks import RunOptions, predictions, run
from attncache.workflows import Session


def unsorted_pass(model, tok, plan, batch: int) -> float:
    pad = tok.pad_token_id or 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(plan.seqs), batch):
            model(**collate(plan.seqs[k : k + batch], pad, True), logits_to_keep=1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-sizes", default="8,16,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    s = Session.open(None, a.model)
    plan = s.plan(a.data, quiet=True)
    tok, base = s.tokenizer, s.model
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    models = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    if a.compile:
        models["compile"] = torch.compile(copy.deepcopy(base), dynamic=True)
        t0 = time.perf_counter()
        for b in sizes:
            run(models["compile"], tok, plan, RunOptions(batch_size=b, progress=False))
        print(f"compile warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    exact = predictions(
        plan, run(base, tok, plan, RunOptions(batch_size=max(sizes), progress=False))
    )

    def timed(name: str, b: int, medium: bool = False, math: bool = False):
        def fn(_i: int) -> dict:
            torch.set_float32_matmul_precision("medium" if medium else "highest")
            kernel = sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext()
            try:
                with kernel:
                    return {
                        "e2e": run(
                            models[name], tok, plan, RunOptions(batch_size=b, progress=False)
                        ).seconds
                    }
            finally:
                torch.set_float32_matmul_precision("highest")

        return fn

    variants = {}
    for b in sizes:
        variants[f"fp32@{b}"] = timed("fp32", b)
        variants[f"fp32-unsorted@{b}"] = lambda _i, b=b: {"e2e": unsorted_pass(base, tok, plan, b)}
        variants[f"matmul-medium@{b}"] = timed("fp32", b, medium=True)
        variants[f"bf16@{b}"] = timed("bf16", b)
        variants[f"sdpa-math@{b}"] = timed("fp32", b, math=True)
        if a.compile:
            variants[f"compile@{b}"] = timed("compile", b)
    t = {k: v["e2e"][0] for k, v in interleaved(variants, 1, a.repeats, 1).items()}

    def agreement(got: list[int]) -> float:
        return sum(x == y for x, y in zip(got, exact, strict=True)) / len(exact)

    agree = {}
    for name, model in models.items():
        got = predictions(
            plan, run(model, tok, plan, RunOptions(batch_size=max(sizes), progress=False))
        )
        agree[name] = agreement(got)
    torch.set_float32_matmul_precision("medium")
    got = predictions(plan, run(base, tok, plan, RunOptions(batch_size=max(sizes), progress=False)))
    torch.set_float32_matmul_precision("highest")
    agree["matmul-medium"] = agreement(got)
    with sdpa_kernel(SDPBackend.MATH):
        got = predictions(
            plan, run(base, tok, plan, RunOptions(batch_size=max(sizes), progress=False))
        )
    agree["sdpa-math"] = agreement(got)
    agree["fp32-unsorted"] = 1.0
    best = {}
    for name in {k.split("@")[0] for k in t}:
        size = min((k for k in t if k.startswith(name + "@")), key=t.get)
        best[name] = {
            "seconds": t[size],
            "batch_size": int(size.split("@")[1]),
            "agreement": agree[name],
        }
    base_s = best["fp32"]["seconds"]
    for row in best.values():
        row["speedup_vs_fp32_best"] = base_s / row["seconds"]
    res = {
        "data": a.data,
        "rows": len(plan.rows),
        "tokens": sum(map(len, plan.seqs)),
        "best": best,
        "all_seconds": t,
        "machine": machine(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
