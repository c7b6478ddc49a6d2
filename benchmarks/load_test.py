"""Load test of `attncache serve` on loopback (issue 8): throughput and p50/p99 latency, cache
attached vs detached at the same concurrency, with a real HTTP client. Bounded in requests and time.

Every variant starts from the same state: its own fresh copy of the DB, and the memo off for both
(`--no-memo`), so neither variant answers from answers the other wrote; the JSON says so
(`state`). The memo is an exact tier of its own and is not what this compares.

    python benchmarks/load_test.py --db runs/sst2-minilm.db --data "sst2[436:]" --requests 200 \
        --concurrency 8 --out runs/exp/load_test.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from server_process import free_port, start_server

from attncache import data as data_mod
from attncache.bench import machine


async def hammer(
    port: int, bodies: list[dict], path: str, concurrency: int, time_limit: float
) -> dict:
    sem = asyncio.Semaphore(concurrency)
    lat, codes = [], []
    t_end = time.perf_counter() + time_limit

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:

        async def one(body):
            async with sem:
                if time.perf_counter() > t_end:
                    return
                t = time.perf_counter()
                r = await c.post(path, json=body)
                lat.append(time.perf_counter() - t)
                codes.append(r.status_code)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
        metrics = (await c.get("/metrics")).text
    ok = sum(c == 200 for c in codes)
    hits = sum(
        float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("attncache_hits_total ")
    )
    lookups = sum(
        float(x.split()[-1])
        for x in metrics.splitlines()
        if x.startswith("attncache_lookups_total ")
    )
    return {
        "requests": len(codes),
        "ok": ok,
        "errors": len(codes) - ok,
        "throughput_rps": ok / wall,
        "p50_ms": 1e3 * float(np.percentile(lat, 50)),
        "p99_ms": 1e3 * float(np.percentile(lat, 99)),
        "hit_rate": hits / lookups if lookups else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per run, at most")
    ap.add_argument("--policy", default="all")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from attncache import AttnCache

    causal = AttnCache.open(a.db).adapter.causal
    rows = data_mod.load(a.data, encoder=not causal, limit=a.requests).rows
    if causal:
        path, bodies = "/v1/score", [{"prompt": r.prompt, "choices": list(r.choices)} for r in rows]
    else:
        path, bodies = (
            "/v1/embeddings",
            [{"input": getattr(r, "text", None) or r.text1} for r in rows],
        )
    env_threads = os.environ.get("OMP_NUM_THREADS")
    res = {
        "db": a.db,
        "data": a.data,
        "endpoint": path,
        "concurrency": a.concurrency,
        "max_batch": a.max_batch,
        "policy": a.policy,
        "machine": machine(),
        "omp_threads": env_threads,
    }
    res["state"] = "each variant on a fresh copy of the DB, --no-memo for both"
    variants = (("detached", ["--no-cache"]), ("attached", ["--policy", a.policy]))
    for name, extra in variants:
        port = free_port()
        copy = Path(tempfile.mkdtemp(prefix="load-test-")) / "db"
        shutil.copytree(a.db, copy, ignore=shutil.ignore_patterns(".lock", ".readers"))
        args = ["--db", str(copy), "--max-batch", str(a.max_batch), "--no-memo", *extra]
        p = start_server(args, port, copy.parent / "server.log")
        try:
            asyncio.run(hammer(port, bodies[:16], path, a.concurrency, a.time_limit))  # warm-up
            res[name] = asyncio.run(hammer(port, bodies, path, a.concurrency, a.time_limit))
        finally:
            p.terminate()
            p.wait(30)
            shutil.rmtree(copy.parent, ignore_errors=True)
        print(name, json.dumps(res[name]), flush=True)
    res["throughput_ratio"] = res["attached"]["throughput_rps"] / res["detached"]["throughput_rps"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
