"""The Ray batch job at scale: driver memory against rows, reuse and speed with 1 and 2 actors,
and a job killed midway then resumed.

    python benchmarks/batch_scale.py rss --rows 10000,1000000 --out runs/exp/batch_rss.json
    python benchmarks/batch_scale.py reuse --data "mmlu:5shot[0:200]" --out runs/exp/batch_mmlu.json
    python benchmarks/batch_scale.py resume --rows 20000 --out runs/exp/batch_resume.json

``rss``: synthetic text rows (JSONL) through the tiny random model, each job in a fresh driver
process that reports its own peak RSS (``ru_maxrss``: the driver alone, not Ray's workers).
``reuse``: the real model (SmolLM2-135M) on DATA: ``eval``'s exact tiers in one process, then the
job with 1 and with 2 actors: rows/s (wall time of the whole call, Ray's start included) and
``prefix_tokens_reused_fraction`` of each, and whether every prediction equals ``eval``'s.
``resume``: a job on the tiny model whose driver is SIGKILLed once some parts are written, then
rerun into the same folder: parts skipped, every row exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: the random test models

DRIVER = """
import json, resource, sys, time
from attncache.batch import BatchOptions, run_batch
t0 = time.perf_counter()
res = run_batch(None, sys.argv[1], sys.argv[2], sys.argv[3],
                BatchOptions(actors=int(sys.argv[4]), batch_size=16, progress=False))
res["seconds"] = time.perf_counter() - t0
res["driver_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(res))
"""


def tiny_model(folder: Path) -> str:
    from tiny import save_tiny_hf

    return str(save_tiny_hf("llama", folder))


def synthetic(path: Path, rows: int) -> None:
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": f"row {i}: the quick brown fox {i % 97}"}) + "\n")


def driver(data: str, out: str, model: str, actors: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", DRIVER, data, out, model, str(actors)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def rss(a, work: Path) -> dict:
    model = tiny_model(work / "tiny")
    out = {}
    for n in [int(x) for x in a.rows.split(",")]:
        data = work / f"rows-{n}.jsonl"
        synthetic(data, n)
        res = driver(str(data), str(work / f"out-{n}"), model, 2)
        keep = ("rows", "seconds", "driver_peak_rss_mib", "parts_written")
        out[str(n)] = {k: res[k] for k in keep}
        print(n, out[str(n)], flush=True)
    return {"rss": out}


def find(obj, key: str):
    """The first value of ``key`` anywhere in a JSON value."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            got = find(v, key)
            if got is not None:
                return got
    return None


def accuracy(folder: Path, answers: list[int]) -> float:
    rows = [json.loads(x) for p in folder.glob("part-*.jsonl") for x in p.read_text().splitlines()]
    rows.sort(key=lambda r: r["idx"])
    return sum(r["prediction"] == y for r, y in zip(rows, answers, strict=True)) / len(answers)


def reuse(a, work: Path) -> dict:
    from attncache import data as data_mod

    t0 = time.perf_counter()
    cmd = ["-m", "attncache", "eval", "--model", a.model, "--data", a.data, "--no-memo"]
    r = subprocess.run([sys.executable, *cmd, "--json", "--quiet"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    ev = json.loads(r.stdout)
    res = {"eval": {"seconds": time.perf_counter() - t0, "json": ev}}
    answers = [row.answer for row in data_mod.load(a.data).rows]
    for actors in (1, 2):
        job = driver(a.data, str(work / f"out-{actors}"), a.model, actors)
        job["accuracy"] = accuracy(work / f"out-{actors}", answers)
        res[f"actors_{actors}"] = job
        print(actors, {k: job[k] for k in ("rows", "seconds", "prefix_tokens_reused_fraction")})
    res["eval_prefix_tokens_reused_fraction"] = find(ev, "prefix_tokens_reused_fraction")
    res["eval_accuracy_cached"] = find(ev, "accuracy_cached")
    return res


def resume(a, work: Path) -> dict:
    model = tiny_model(work / "tiny")
    data = work / "rows.jsonl"
    synthetic(data, a.rows)
    out = work / "out"
    cmd = [sys.executable, "-c", DRIVER, str(data), str(out), model, "2"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    while proc.poll() is None and len(list(out.glob("part-*"))) < 8:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-job
    proc.wait()
    ray_cli = str(Path(sys.executable).with_name("ray"))  # whatever of Ray outlived its group
    subprocess.run([ray_cli, "stop", "--force"], capture_output=True, check=False)
    written_before = len(list(out.glob("part-*")))
    job = driver(str(data), str(out), model, 2)
    rows = [json.loads(x) for p in out.glob("part-*.jsonl") for x in p.read_text().splitlines()]
    seen = sorted(r["idx"] for r in rows)
    return {
        "parts_before_kill": written_before,
        "rerun": job,
        "rows_once": seen == list(range(a.rows)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["rss", "reuse", "resume"])
    ap.add_argument("--rows", default="10000,1000000")
    ap.add_argument("--data", default="mmlu:5shot[0:200]")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.what == "resume":
        a.rows = int(a.rows.split(",")[0])
    from attncache.bench import machine

    with tempfile.TemporaryDirectory(prefix="batch-scale-") as tmp:
        res = {"rss": rss, "reuse": reuse, "resume": resume}[a.what](a, Path(tmp))
    res["machine"] = machine()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str)[:3000])


if __name__ == "__main__":
    main()
