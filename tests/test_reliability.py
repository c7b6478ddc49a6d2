"""Integrity checks, identity guards, the write lock, disk-full, honest counters and the
no-code-from-data rule."""

import errno
import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from tiny import TinyTokenizer, random_seqs, tiny_model

import attncache.db.files as store_mod
from attncache import AttnCache, UserError
from attncache.db.locks import write_lock
from attncache.db.segments import seg_name

SRC = Path(__file__).resolve().parents[1] / "src" / "attncache"


@pytest.fixture
def db(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "db"
    AttnCache.build(model, TinyTokenizer(), random_seqs(6, seed=4), path, progress=False)
    return path


def synthetic(cache: AttnCache, n: int, seed: int, L: int = 7):
    """n random causal entries shaped for ``cache`` (maps, features)."""
    rng = np.random.default_rng(seed)
    nl, H = len(cache.store.layout.layers), cache.store.layout.n_heads
    x = np.tril(rng.random((n, nl, H, L, L)).astype(np.float32) + 1e-3)
    maps = x / x.sum(-1, keepdims=True)
    feats = rng.normal(size=(n, cache.projector.in_dim)).astype(np.float32)
    return list(maps), feats


def test_verify_accepts_a_fresh_db(db):
    assert AttnCache.verify(db) == []


def test_truncated_or_missing_files_refused_at_open(db, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(db, bad)
    with open(bad / seg_name(0), "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="truncated"):
        AttnCache.open(bad)
    gone = tmp_path / "gone"
    shutil.copytree(db, gone)
    vec = json.loads((gone / "manifest.json").read_text())["names"]["vectors"]
    (gone / vec).unlink()
    with pytest.raises(UserError, match=f"{vec} is missing"):
        AttnCache.open(gone)


def test_corruption_and_extra_files_found_by_verify(db):
    seg = db / seg_name(0)
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    (db / "stray.bin").write_bytes(b"x")
    problems = AttnCache.verify(db)
    assert any("is corrupted" in p and "entry" in p for p in problems)
    assert any("unexpected file stray.bin" in p for p in problems)


def test_a_truncated_segment_is_refused_at_open_in_one_line(db):
    """A segment cut short (a copy that stopped, a full disk) is refused at open, and ``verify``
    names the segment as truncated (not each of its entries as corrupted)."""
    seg = db / seg_name(0)
    seg.write_bytes(seg.read_bytes()[: seg.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated"):
        AttnCache.open(db)
    assert any(seg_name(0) in p and "truncated" in p for p in AttnCache.verify(db))


def test_leftovers_of_a_crashed_writer_are_ignored_then_removed(db):
    (db / seg_name(77)).write_bytes(b"half a segment")
    (db / ".features-9.npy.tmp.npy").write_bytes(b"x")
    assert AttnCache.verify(db) == []  # ours by name and unreferenced: not a problem
    cache = AttnCache.open(db)
    maps, feats = synthetic(cache, 1, seed=1)
    cache.insert(maps, feats)
    assert not (db / seg_name(77)).exists() and not (db / ".features-9.npy.tmp.npy").exists()


def test_manifest_paths_cannot_escape_the_folder(db):
    m = json.loads((db / "manifest.json").read_text())
    m["names"]["vectors"] = "../../etc/passwd"
    (db / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="outside the cache folder"):
        AttnCache.open(db)


def test_old_format_gets_a_migrate_message(db):
    m = json.loads((db / "manifest.json").read_text())
    m["format_version"] = 1
    (db / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="attncache migrate"):
        AttnCache.open(db)


def test_build_refuses_to_overwrite_and_leaves_no_temp(db):
    with pytest.raises(UserError, match="already exists"):
        AttnCache.build(tiny_model("llama"), TinyTokenizer(), random_seqs(3), db, progress=False)
    assert not [p for p in db.parent.iterdir() if ".building-" in p.name]


def test_an_interrupted_build_is_cleaned_up_by_the_next(tmp_path):
    stale = tmp_path / ".db.building-abc"
    stale.mkdir()
    (stale / "seg-000000.bin").write_bytes(b"x")
    AttnCache.build(
        tiny_model("llama"),
        TinyTokenizer(),
        random_seqs(4, seed=2),
        tmp_path / "db",
        progress=False,
    )
    assert not stale.exists()


def test_one_writer_at_a_time(db):
    cache = AttnCache.open(db)
    maps, feats = synthetic(cache, 1, seed=2)
    with write_lock(db), pytest.raises(UserError, match="being written by another process"):
        cache.insert(maps, feats, lock_wait_s=0.1)
    assert len(AttnCache.open(db).store) == 6  # nothing changed
    cache.insert(maps, feats)  # the lock is free again
    assert len(AttnCache.open(db).store) == 7


def test_disk_full_leaves_the_previous_state(db, monkeypatch):
    cache = AttnCache.open(db)
    before = json.loads((db / "manifest.json").read_text())
    maps, feats = synthetic(cache, 2, seed=3)
    real = store_mod.os.fsync
    calls = {"n": 0}

    def failing(fd):  # the second fsync of the insert (the features file) hits a full disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(store_mod.os, "fsync", failing)
    with pytest.raises(UserError, match="no space left"):
        cache.insert(maps, feats)
    monkeypatch.setattr(store_mod.os, "fsync", real)
    assert json.loads((db / "manifest.json").read_text()) == before
    again = AttnCache.open(db)
    assert len(again.store) == 6 and AttnCache.verify(db) == []
    again.insert(maps, feats)  # and the next writer succeeds (and sweeps the leftovers)
    assert len(AttnCache.open(db).store) == 8 and AttnCache.verify(db) == []


READER = """
import sys, numpy as np
from pathlib import Path
from attncache import AttnCache
stop, n = Path({stop!r}), 0
while True:
    c = AttnCache.open({db!r})  # a fresh snapshot each time, while the writer commits and deletes
    feats = np.random.default_rng(n).normal(size=(4, c.projector.in_dim)).astype(np.float32)
    for h in c.lookup(feats, [7] * 4, threshold=float("inf")):
        if h is not None:
            m = c.fetch(h.entry, c.store.layout.layers[0], 7)
            assert abs(float(m.float().sum()) - m.shape[0] * 7) < 0.1, "torn map"
    assert all(c.store.check(e) for e in range(len(c.store))), "torn entry"
    n += 1
    if n == 1:
        print("ready", flush=True)
    if stop.exists():
        break
print("reads", n)
"""
INSERT_ROUNDS = 10


def test_readers_during_inserts_and_evictions(db, tmp_path):
    """Two reader processes open, look up, fetch and checksum while this process inserts and evicts.
    Count-based: the writer starts once both readers have read, and commits a fixed number of
    times."""
    import subprocess
    import sys

    cache = AttnCache.open(db)
    cache.evict_to(int(cache.store.table.nbytes[0]) * 10)
    stop = tmp_path / "stop"
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER.format(db=str(db), stop=str(stop))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for r in readers:
            assert r.stdout.readline().strip() == "ready", r.stderr.read()[-2000:]
        for k in range(INSERT_ROUNDS):
            maps, feats = synthetic(cache, 3, seed=100 + k)
            cache.insert(maps, feats)
    finally:
        stop.touch()
    for r in readers:
        out, err = r.communicate(timeout=120)
        assert r.returncode == 0, err[-2000:]
        assert int(out.split()[-1]) >= 2  # read before and after the writer's commits
    assert cache.info().evictions > 0 and AttnCache.verify(db) == []


def test_counters_are_exact_under_concurrency(db):
    cache = AttnCache.open(db)
    feats = np.load(db / json.loads((db / "manifest.json").read_text())["names"]["features"])
    lengths = cache.store.lengths.tolist()
    n_threads, rounds = 4, 25

    def worker():
        for _ in range(rounds):
            hits = cache.lookup(feats, lengths, threshold=1e9)
            n = sum(h is not None for h in hits)
            cache.stats.add(lookups=len(hits), hits=n, misses=len(hits) - n)

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st = cache.stats.as_dict()
    assert st["lookups"] == n_threads * rounds * len(lengths) == st["hits"] + st["misses"]
    assert cache.info().total_hits == st["hits"]  # per-entry usage counted exactly too


def test_no_code_from_data_in_source():
    """No pickle, torch.load, eval or exec anywhere in the package."""
    pattern = re.compile(
        r"import pickle|\bpickle\.|torch\.load\(|(?<![\w.])eval\(|(?<![\w.])exec\(|"
        r"allow_pickle\s*=\s*True"
    )
    hits = [
        f"{p.name}:{i}"
        for p in SRC.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []
    # the guard itself can fail
    assert (
        pattern.search("x = pickle.loads(b)")
        and pattern.search("torch.load(f)")
        and pattern.search("eval(s)")
    )
    assert not pattern.search("model.eval()")


def test_default_threshold_ignores_siblings_from_the_same_row(tmp_path):
    """Two choices of one prompt are near-duplicates; a new input never has such a neighbour."""
    model = tiny_model("llama")
    prompts = random_seqs(8, lo=12, hi=12, seed=30)
    seqs = [
        p + [c] for p in prompts for c in (5, 6)
    ]  # each row: the prompt + one of two 1-token choices
    rows = [i for i in range(len(prompts)) for _ in (5, 6)]
    plain = AttnCache.build(model, TinyTokenizer(), seqs, tmp_path / "a", progress=False)
    grouped = AttnCache.build(
        model, TinyTokenizer(), seqs, tmp_path / "b", progress=False, groups=rows
    )
    assert grouped.threshold > 1.2 * plain.threshold
    with pytest.raises(UserError, match="15 groups for 16 sequences"):  # was an IndexError
        AttnCache.build(model, TinyTokenizer(), seqs, tmp_path / "c", groups=rows[:-1])
    assert not (tmp_path / "c").exists()
