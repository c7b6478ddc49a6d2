"""SIGKILL at random points of inserting and of building: the DB still opens, verifies, and keeps
every entry committed before the kill; an interrupted build leaves no DB and the next build
succeeds."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import TinyTokenizer, random_seqs, tiny_model

from attncache import AttnCache

TESTS = Path(__file__).resolve().parent
KILLS = 8  # per scenario: 8 + 8 + 8 = 24 in all

LEARNER = """
import sys, torch
sys.path.insert(0, {tests!r})
from tiny import random_seqs, tiny_model
from attncache import AttnCache
from attncache.inputs import collate
model = tiny_model("llama")
cache = AttnCache.open({db!r})
print("ready", flush=True)
k = 0
with cache.attach(model, "all", threshold=0.0, learn=True) as att, torch.no_grad():
    while True:  # what 'eval --learn' does per batch: forward, then record and insert the misses
        batch = collate(random_seqs(2, lo=9, hi=14, seed=1000 * {run} + k), 0, True)
        model(**batch, logits_to_keep=1)
        att.learn_pending()
        print("committed", *cache.store.table.uid[-2:].tolist(), flush=True)
        k += 1
"""

INSERTER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from attncache import AttnCache
from test_reliability import synthetic
cache = AttnCache.open({db!r}, max_bytes={cap})
print("ready", flush=True)
k = 0
while True:
    maps, feats = synthetic(cache, 2, seed=1000 * {run} + k)
    uids = cache.insert(maps, feats)
    print("committed", *uids, flush=True)
    k += 1
"""

BUILDER = """
import sys
sys.path.insert(0, {tests!r})
from tiny import TinyTokenizer, random_seqs, tiny_model
from attncache import AttnCache
print("ready", flush=True)
seqs = random_seqs(40, seed=3)
AttnCache.build(tiny_model("llama"), TinyTokenizer(), seqs, {out!r}, progress=False)
print("built", flush=True)
"""


def _run_and_kill(code: str, rng: random.Random) -> list[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines = [p.stdout.readline().strip()]  # "ready": imports are done, the work starts now
    assert lines[0] == "ready", p.stderr.read()
    time.sleep(rng.uniform(0.0, 1.5))
    os.kill(p.pid, signal.SIGKILL)
    out, _ = p.communicate()
    return lines + out.splitlines()


@pytest.mark.parametrize("cap", [None, 40_000])
def test_sigkill_during_inserts(tmp_path, cap):
    """No cap: a learning loop (forward, record misses, insert). Cap: inserts that evict and
    compact."""
    db = tmp_path / "db"
    AttnCache.build(
        tiny_model("llama"), TinyTokenizer(), random_seqs(6, lo=7, hi=7, seed=4), db, progress=False
    )
    rng = random.Random(7 if cap else 8)
    committed: set[int] = set(range(6))
    for run in range(KILLS):
        code = INSERTER if cap else LEARNER
        lines = _run_and_kill(code.format(tests=str(TESTS), db=str(db), cap=cap, run=run), rng)
        for line in lines:
            if line.startswith("committed"):
                committed |= {int(u) for u in line.split()[1:]}
        cache = AttnCache.open(db)
        assert AttnCache.verify(db) == [], f"run {run}"
        have = set(cache.store.table.uid.tolist())
        if cap is None:
            assert committed <= have  # nothing committed was lost
        else:
            assert cache.store.nbytes <= cap
            assert sum(p.stat().st_size for p in db.glob("seg-*.bin")) <= cap + max(
                (p.stat().st_size for p in db.glob("seg-*.bin")), default=0
            )  # at most one uncommitted segment
        for e in range(len(cache.store)):
            assert cache.store.check(e)
    assert len(committed) > 6  # the writer did get work done between kills


def test_sigkill_during_build(tmp_path):
    rng = random.Random(9)
    out = tmp_path / "db"
    for _ in range(KILLS):
        lines = _run_and_kill(BUILDER.format(tests=str(TESTS), out=str(out)), rng)
        if "built" in lines:
            assert AttnCache.verify(out) == []
            break
        assert not out.exists()  # an interrupted build publishes nothing
    # the next build starts clean and removes the interrupted one's temporary folder
    if not out.exists():
        AttnCache.build(
            tiny_model("llama"), TinyTokenizer(), random_seqs(40, seed=3), out, progress=False
        )
    assert AttnCache.verify(out) == []
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]
