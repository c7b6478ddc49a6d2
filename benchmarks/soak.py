"""A bounded soak of `attncache serve --db --prefix-dir --learn`: 4 clients mixing score, classify,
rerank and embeddings for a set time, the server SIGKILLed and restarted twice midway (then stopped
cleanly once, so the prefix folder is written). Checked: every response well-formed, no 500,
answers equal a fresh exact model's (1e-4), the DB verifies after each kill, every entry committed
before a kill present after it, the prefix folder loads. Bounded in time; loopback only.

    python benchmarks/soak.py --db runs/soak.db --seconds 120 --out runs/exp/soak.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from server_process import free_port, start_server

from attncache.bench import machine

TEXTS = [
    "a gripping, beautifully told story",
    "dull and far too long",
    "the cast is wonderful and the script sharp",
    "I want those two hours back",
    "a quiet film that stays with you",
    "loud, messy and oddly charming",
    "nothing in it works",
    "the best thing I saw this year",
]
LABELS = ["negative", "positive"]
TEMPLATE = "Review: {text}\nSentiment:"
QUERY = "which review is positive?"


def request_pool() -> list[tuple[str, dict]]:
    """The (path, body) pairs the clients draw from: each endpoint, every text."""
    pool: list[tuple[str, dict]] = []
    for t in TEXTS:
        pool.append(
            ("/v1/score", {"prompt": TEMPLATE.format(text=t), "choices": [" bad", " good"]})
        )
        pool.append(("/v1/classify", {"input": [t], "labels": LABELS, "template": TEMPLATE}))
        pool.append(("/v1/embeddings", {"input": t}))
    for k in range(0, len(TEXTS), 3):
        pool.append(("/v1/rerank", {"query": QUERY, "documents": TEXTS[k : k + 3]}))
    return pool


@dataclass
class Log:
    answers: list[tuple[int, dict]] = field(default_factory=list)  # (pool index, body)
    latencies: list[float] = field(default_factory=list)
    codes: dict[int, int] = field(default_factory=dict)
    interrupted: int = 0  # requests cut by a kill (no response at all)
    malformed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def well_formed(path: str, body: dict, got: dict) -> bool:
    if path == "/v1/score":
        return len(got.get("logprobs", [])) == len(body["choices"]) and "usage" in got
    if path == "/v1/classify":
        return len(got.get("data", [])) == len(body["input"]) and all(
            len(d["probs"]) == len(LABELS) for d in got["data"]
        )
    if path == "/v1/rerank":
        return sorted(r["index"] for r in got.get("results", [])) == list(
            range(len(body["documents"]))
        )
    return len(got.get("data", [])) == 1 and len(got["data"][0]["embedding"]) > 0


def client(seed: int, base: str, pool, up: threading.Event, stop: threading.Event, log: Log):
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=60) as c:
        while not stop.is_set():
            if not up.wait(0.2):
                continue
            k = rng.randrange(len(pool))
            path, body = pool[k]
            t0 = time.perf_counter()
            try:
                r = c.post(path, json=body)
            except httpx.TransportError:
                with log.lock:
                    log.interrupted += 1
                continue
            with log.lock:
                log.codes[r.status_code] = log.codes.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    got = r.json()
                    log.latencies.append(time.perf_counter() - t0)
                    if well_formed(path, body, got):
                        log.answers.append((k, got))
                    else:
                        log.malformed.append(f"{path}: {r.text[:200]}")


def numbers(path: str, got: dict) -> list[float]:
    """The answer's numbers, in a fixed order, to compare with the exact model's."""
    if path == "/v1/score":
        return got["logprobs"]
    if path == "/v1/classify":
        return [p for d in got["data"] for p in d["probs"]]
    if path == "/v1/rerank":
        return [r["relevance_score"] for r in sorted(got["results"], key=lambda r: r["index"])]
    return got["data"][0]["embedding"]


def exact_answers(db: str, pool) -> list[list[float]]:
    """What a fresh exact model (no DB, no memo, no prefix tier) answers for each request."""
    from attncache import Scorer
    from attncache.workflows import Session

    s = Session.open(db)
    out = []
    with Scorer(s.model, s.tokenizer, memo=False, prefix_bytes=None) as sc:
        for path, body in pool:
            if path == "/v1/score":
                out.append(sc.score(body["prompt"], body["choices"])["logprobs"])
            elif path == "/v1/classify":
                out.append(
                    [p for r in sc.classify(body["input"], LABELS, TEMPLATE) for p in r["probs"]]
                )
            elif path == "/v1/rerank":
                out.append(sc.rerank(body["query"], body["documents"]))
            else:
                out.append(sc.embed([body["input"]])[0])
    return out


def entries(base: str) -> int:
    return int(httpx.get(f"{base}/health", timeout=10).json()["entries"])


def soak(db: str, seconds: float, work: Path, max_batch: int = 8) -> dict:
    from attncache import AttnCache
    from attncache.db.tier_store import TierFolder
    from attncache.models import fingerprint, numerics
    from attncache.tiers import kept_name
    from attncache.workflows import Session

    pool, log = request_pool(), Log()
    tiers, server_log = work / "tiers", work / "server.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = [
        "--db",
        db,
        "--prefix-dir",
        str(tiers),
        "--learn",
        "--policy",
        "none",
        "--max-batch",
        str(max_batch),
    ]
    up, stop = threading.Event(), threading.Event()
    threads = [
        threading.Thread(target=client, args=(k, base, pool, up, stop, log)) for k in range(4)
    ]
    for t in threads:
        t.start()
    problems: list[str] = []
    restarts = 0
    phase = seconds / 3
    try:
        for step in ("kill", "kill", "stop"):
            server = start_server(args, port, server_log)
            up.set()
            time.sleep(phase)
            committed = entries(base)
            up.clear()  # no new requests; those in flight are cut by a kill
            if step == "kill":
                server.send_signal(signal.SIGKILL)  # mid-traffic, no shutdown at all
            else:
                server.send_signal(signal.SIGTERM)
            server.wait(60)
            bad = AttnCache.verify(db)
            if bad:
                problems.append(f"after {step}: verify: {bad[0]}")
            if len(AttnCache.open(db).store) < committed:
                problems.append(f"after {step}: {committed} entries were committed, fewer remain")
            restarts += step == "kill"
    finally:
        stop.set()
        up.set()
        for t in threads:
            t.join(90)
    s = Session.open(db)
    kept = TierFolder(tiers, fingerprint(s.model, s.tokenizer)).read(kept_name(numerics(s.model)))
    if kept is None:
        problems.append("the prefix folder holds no tree after the clean stop")
    want = exact_answers(db, pool)
    worst = max(
        (
            float(np.max(np.abs(np.subtract(numbers(pool[k][0], got), want[k]))))
            for k, got in log.answers
        ),
        default=float("nan"),
    )
    if not worst <= 1e-4:
        problems.append(f"an answer differs from the exact model's by {worst:.2e}")
    if log.malformed:
        problems.append(f"{len(log.malformed)} malformed responses, first: {log.malformed[0]}")
    if any(code >= 500 for code in log.codes):
        problems.append(f"5xx responses: {log.codes}")
    lat = np.array(log.latencies) * 1e3
    return {
        "requests_served": len(log.answers),
        "status_codes": {str(k): v for k, v in sorted(log.codes.items())},
        "interrupted_by_kills": log.interrupted,
        "restarts_survived": restarts,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "max_abs_diff_vs_exact": worst,
        "entries_at_end": len(AttnCache.open(db).store),
        "problems": problems,
        "ok": not problems,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="a DB to soak (a copy is used; it is not changed)")
    ap.add_argument("--seconds", type=float, default=60.0, help="traffic time in all (3 phases)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        copy = work / "db"
        shutil.copytree(a.db, copy, ignore=shutil.ignore_patterns(".lock", ".readers"))
        res = {
            "db": a.db,
            "seconds": a.seconds,
            "clients": 4,
            "machine": machine(),
            **soak(str(copy), a.seconds, work, a.max_batch),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    if not res["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
