"""lm-eval wall time, `--model attncache` vs `--model hf` at its best `--batch_size`, on the same
local task (ARC, HellaSwag, MMLU as lm-eval renders them, offline), with per-sample agreement
beside every ratio.

Both backends are built once; each timed pass is one `simple_evaluate` over the task, passes
interleaved (hf b1, hf b2, ..., attncache, hf b1, ...), medians reported; attncache's prefix tree
is emptied before every pass (each starts cold, as a fresh run would).

    python benchmarks/lm_eval_speed.py --shots 5 --limit 40 --out runs/exp/lm_eval_arc5.json
    python benchmarks/lm_eval_speed.py --task mmlu --shots 5 --subjects 5 --limit 20 --out ...
    python benchmarks/lm_eval_speed.py --task arc_challenge --shots 25 --sampler default ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from attncache import models  # noqa: E402
from attncache.bench import machine  # noqa: E402
from attncache.integrations.lm_eval import AttnCacheLM  # noqa: E402
from attncache.integrations.lm_eval_tasks import TaskOptions, write_task  # noqa: E402


def evaluate(lm, tasks: list[str], manager: TaskManager) -> tuple[float, dict]:
    t0 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)
    return time.perf_counter() - t0, res


def samples(res: dict, tasks: list[str]) -> dict[tuple[str, int], list[tuple[float, bool]]]:
    return {
        (task, s["doc_id"]): [(float(r[0][0]), bool(r[0][1])) for r in s["resps"]]
        for task in tasks
        for s in res["samples"][task]
    }


def metrics(res: dict, tasks: list[str]) -> dict[str, dict]:
    return {t: res["results"][t] for t in tasks}


def agreement(a: dict, b: dict) -> tuple[float, float]:
    """(share of requests whose log-likelihood is within 1e-4 and is_greedy equal, max diff)."""
    pairs = [(x, y) for k in b for x, y in zip(a[k], b[k], strict=True)]
    same = sum(abs(x[0] - y[0]) < 1e-4 and x[1] == y[1] for x, y in pairs)
    return same / len(pairs), max(abs(x[0] - y[0]) for x, y in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--sampler", default="first_n", help="first_n, or 'default' (per document)")
    ap.add_argument("--limit", type=int, default=40, help="test documents (per MMLU subject)")
    ap.add_argument("--pool", type=int, default=25, help="the few-shot split's documents")
    ap.add_argument("--subjects", type=int, default=5, help="MMLU: the first N subjects")
    ap.add_argument("--hf-batch-sizes", default="1,4,8,16,32")
    ap.add_argument("--batch-size", type=int, default=8, help="attncache's")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--prefix-token-id", type=int, help="for tokenizers without BOS/EOS (both backends)"
    )
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lm-eval-tasks-"))
    sampler = None if a.sampler == "default" else a.sampler
    pool = max(a.pool, a.shots)
    tasks = write_task(a.task, folder, TaskOptions(a.shots, a.limit, sampler, pool, a.subjects))
    manager = TaskManager(include_path=str(folder))
    extra = {"prefix_token_id": a.prefix_token_id} if a.prefix_token_id is not None else {}
    ours = AttnCacheLM(pretrained=a.model, batch_size=a.batch_size, **extra)
    hf = HFLM(pretrained=str(models.hf_folder(a.model)), dtype="float32", device="cpu", **extra)
    sizes = [int(x) for x in a.hf_batch_sizes.split(",")]
    times: dict[str, list[float]] = {f"hf b{b}": [] for b in sizes} | {"attncache": []}
    results: dict[str, dict] = {}
    evaluate(ours, tasks, manager)  # warm-up (kernels, the dataset's local cache)
    for r in range(a.repeats):
        for b in sizes:
            hf.batch_size_per_gpu = b
            secs, res = evaluate(hf, tasks, manager)
            times[f"hf b{b}"].append(secs)
            results.setdefault(f"hf b{b}", res)
        ours.prefix.reset()
        secs, res = evaluate(ours, tasks, manager)
        times["attncache"].append(secs)
        results.setdefault("attncache", res)
        print(
            f"pass {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), flush=True
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    best = min((k for k in med if k.startswith("hf")), key=med.get)
    share, worst = agreement(samples(results["attncache"], tasks), samples(results[best], tasks))
    out = {
        "tasks": tasks,
        "shots": a.shots,
        "sampler": a.sampler,
        "docs": a.limit,
        "requests": sum(len(v) for v in samples(results[best], tasks).values()),
        "seconds_median": med,
        "seconds_all": times,
        "hf_best": best,
        "speedup_vs_hf_best": med[best] / med["attncache"],
        "agreement_requests": share,
        "max_abs_loglik_diff": worst,
        "metrics_identical": metrics(results["attncache"], tasks) == metrics(results[best], tasks),
        "metrics": metrics(results["attncache"], tasks),
        "machine": machine(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(
        json.dumps(
            {
                k: out[k]
                for k in (
                    "seconds_median",
                    "hf_best",
                    "speedup_vs_hf_best",
                    "agreement_requests",
                    "metrics_identical",
                )
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
