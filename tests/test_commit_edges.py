"""Commits never corrupt a live process, side files never vanish under a reader, rebuilds are
atomic."""

import errno
import importlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_reliability import synthetic
from tiny import TinyTokenizer, random_seqs, tiny_model

import attncache.db.files as files_mod
from attncache import AttnCache, UserError
from attncache.db.locks import write_lock
from attncache.db.templates import Templates
from attncache.tiers.memo import Answer, ResultMemo

staging_mod = importlib.import_module("attncache.db.staging")  # the package exports a function


def rebuild(db, n: int) -> None:
    """``build --force`` over ``db`` with ``n`` new entries."""
    AttnCache.build(
        tiny_model("llama"),
        TinyTokenizer(),
        random_seqs(n, seed=9),
        db,
        progress=False,
        force=True,
    )


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "db"
    AttnCache.build(
        tiny_model("llama"), TinyTokenizer(), random_seqs(6, seed=4), path, progress=False
    )
    return path


def full_disk_once(monkeypatch, which: int) -> None:
    """The ``which``-th fsync from now fails with ENOSPC, once."""
    real, calls = files_mod.os.fsync, {"n": 0}

    def failing(fd):
        calls["n"] += 1
        if calls["n"] == which:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(files_mod.os, "fsync", failing)


@pytest.mark.parametrize("which", [1, 2, 3, 4])
def test_a_failed_insert_leaves_the_live_object_whole(db, monkeypatch, which):
    """ENOSPC at each write of an insert (segment, features, vectors, manifest), then the next
    insert on the *same* object succeeds and ``verify`` is clean. On 9cecc0c the failed insert had
    already swapped its store and index into the live object: the next one raised IndexError."""
    cache = AttnCache.open(db)
    before = json.loads((db / "manifest.json").read_text())
    maps, feats = synthetic(cache, 2, seed=3)
    full_disk_once(monkeypatch, which)
    with pytest.raises(UserError, match="no space left"):
        cache.insert(maps, feats)
    assert json.loads((db / "manifest.json").read_text()) == before
    assert len(cache.store) == len(cache.db.index) == len(cache.db.vectors) == 6
    hits = cache.lookup(feats, [7, 7], threshold=float("inf"))
    assert all(h is not None and h.entry < 6 for h in hits)  # only committed entries
    cache.insert(maps, feats)
    assert len(cache.store) == len(cache.db.index) == 8
    assert AttnCache.verify(db) == [] and len(AttnCache.open(db).store) == 8


WRITER = """
import sys, numpy as np
from attncache import AttnCache
from attncache.db.templates import Templates
from attncache.tiers.memo import Answer, ResultMemo
db = AttnCache.open(sys.argv[1]).db
for k in range(2):  # two commits: the files the reader opened are deleted
    memo = ResultMemo()
    memo.put([9, 9, k], "float32-cpu", Answer({(1, 2): -0.5}, 3))
    memo.save(db)
    db.commit_templates(Templates([(0, 0)], np.full((1, 8, 8), 0.25, np.float32), True))
"""


def test_side_files_stay_readable_while_another_process_commits(db):
    """A reader opens a DB with a memo and templates; another process commits new ones twice
    (deleting the files the reader saw); the reader still reads its own generation's. On 9cecc0c
    both were read lazily, after the readers' lock was released: FileNotFoundError."""
    cache = AttnCache.open(db)
    memo = ResultMemo()
    memo.put([1, 2, 3], "float32-cpu", Answer({(1, 5): -0.25}, 7))
    memo.save(cache.db)
    cache.db.commit_templates(Templates([(0, 1)], np.full((1, 8, 8), 0.5, np.float32), True))
    names = json.loads((db / "manifest.json").read_text())["names"]
    reader = AttnCache.open(db)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(
        [sys.executable, "-c", WRITER, str(db)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert not (db / names["memo"]).exists() and not (db / names["templates"]).exists()
    got = ResultMemo.load(reader.db)
    assert got.get([1, 2, 3], "float32-cpu", [(1, 5)]).argmax == 7
    assert reader.db.templates.heads == [(0, 1)]
    assert float(np.asarray(reader.db.templates.maps).max()) == 0.5
    assert AttnCache.open(db).db.templates.heads == [(0, 0)]  # a new open sees the new ones


def test_a_failed_swap_keeps_the_old_db(db, monkeypatch):
    """``build --force`` (and compress, through the same staging): on 9cecc0c the old DB was
    deleted before the new one was renamed in, so a failure between lost both."""
    before = json.loads((db / "manifest.json").read_text())

    real = os.replace

    def failing(src, dst):  # only the swap of the finished build fails
        if ".building-" in str(src) and os.path.isdir(src):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(staging_mod.os, "replace", failing)
    with pytest.raises(UserError, match="old one is unchanged"):
        rebuild(db, 4)
    monkeypatch.undo()
    assert json.loads((db / "manifest.json").read_text()) == before
    assert AttnCache.verify(db) == [] and len(AttnCache.open(db).store) == 6
    assert not list(db.parent.glob(".db.*"))  # no staging or aside folder left


def test_a_crash_between_the_renames_loses_nothing(db, monkeypatch):
    """Killed after the old DB moved aside and before the new one moved in: the old one is whole
    beside the path; open says where, and the next build puts it back first."""

    def killed(src, dst):
        raise KeyboardInterrupt  # stands for the process dying here

    monkeypatch.setattr(staging_mod, "_swap_in", killed)
    monkeypatch.setattr(
        staging_mod.os,
        "rename",
        lambda a, b, real=os.rename: real(a, b) if "replaced" in str(b) else None,
    )
    with pytest.raises(KeyboardInterrupt):
        rebuild(db, 4)
    monkeypatch.undo()
    assert not db.exists()
    with pytest.raises(UserError, match="interrupted"):
        AttnCache.open(db)
    rebuild(db, 5)
    assert len(AttnCache.open(db).store) == 5 and AttnCache.verify(db) == []
    assert not list(db.parent.glob(".db.replaced-*"))


def test_a_build_never_deletes_a_db_another_process_is_replacing(db):
    """While another process swaps a new DB in, the old one sits beside the path under that
    process's write lock; a build started then leaves it alone (the other process puts it back
    if its swap fails), and removes it once no process holds it."""
    aside = db.parent / ".db.replaced-other"
    shutil.copytree(db, aside)
    with write_lock(aside):  # the other process, between its two renames
        rebuild(db, 4)
        assert aside.is_dir() and (aside / "manifest.json").is_file()
    rebuild(db, 5)
    assert not aside.exists()
    assert len(AttnCache.open(db).store) == 5 and AttnCache.verify(db) == []


def test_a_damaged_entry_is_never_replayed(tmp_path):
    """Only ``verify`` checked crc32s on 9cecc0c: a fetch trusted the bytes. Now each entry is
    checked on its first use in a process; a damaged one is skipped (a miss, or the next
    candidate), with one warning, and a good one is checked once."""
    from test_replay import forward

    from attncache.db.segments import seg_name

    model, tok = tiny_model("llama"), TinyTokenizer()
    seqs = random_seqs(6, lo=10, hi=10, seed=21)
    path = tmp_path / "db"
    AttnCache.build(model, tok, seqs, path, progress=False)
    cache = AttnCache.open(path)
    t = cache.store.table
    assert len({int(x) for x in t.seg}) == 1
    victim = 2
    start = int(t.offset[victim]) + int(t.nbytes[victim]) - 16  # inside its maps, past the header
    with open(path / seg_name(int(t.seg[victim])), "r+b") as f:
        f.seek(start)
        byte = f.read(1)
        f.seek(start)
        f.write(bytes([byte[0] ^ 0xFF]))
    cache = AttnCache.open(path)
    attached = cache.attach(model, policy="all", threshold=float("inf"))
    with pytest.warns(UserWarning, match="checksum"), attached as att:
        forward(model, seqs, True)
        hits = list(att.last_hits)
    assert all(h is not None and h.entry != victim for h in hits)
    assert hits[0].entry == 0 and cache.store.damaged >= 1
    assert len(cache.store.checked) == 5  # every intact entry checked once, remembered
    with cache.attach(model, policy="all", threshold=float("inf")) as att:
        forward(model, seqs, True)
    assert len(cache.store.checked) == 5
    assert any(f"entry {victim}" in p and "corrupted" in p for p in AttnCache.verify(path))


TIER_WRITER = """
import sys, torch
from attncache.db.tier_store import TierFolder
folder = TierFolder(sys.argv[1], {"config": "c", "weights": "w"})
for k in range(1, int(sys.argv[2]) + 1):
    folder.write("prefix.float32-cpu", {"kv": torch.full((64, 256), float(k))})
"""


def test_a_tier_folder_stays_readable_while_another_process_writes_it(tmp_path):
    """Two processes on one ``--prefix-dir``: one keeps replacing the kept tree, the other keeps
    reading it. Every read is one whole version (each file checked against the index entry it
    was read by), never an error: before 2026-12-07 a read that found the index before a write
    and the file after it called the folder damaged."""
    from attncache.db.tier_store import TierFolder

    fingerprint = {"config": "c", "weights": "w"}
    folder = TierFolder(tmp_path / "kept", fingerprint)
    folder.write("prefix.float32-cpu", {"kv": torch.zeros(64, 256)})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writes = 300
    writer = subprocess.Popen(
        [sys.executable, "-c", TIER_WRITER, str(tmp_path / "kept"), str(writes)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[float] = set()
    try:
        while writer.poll() is None:
            kv = TierFolder(tmp_path / "kept", fingerprint).read("prefix.float32-cpu")["kv"]
            assert kv.shape == (64, 256) and bool((kv == kv[0, 0]).all())  # one whole version
            seen.add(float(kv[0, 0]))
    finally:
        _, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert len(seen) > 1  # the reads did overlap the writes
    last = TierFolder(tmp_path / "kept", fingerprint).read("prefix.float32-cpu")["kv"]
    assert float(last[0, 0]) == writes


def test_a_kept_tier_file_gone_with_no_writer_is_one_clear_error(tmp_path):
    """The read that retries after a writer's commit still refuses a file its index names and
    nobody replaced (deleted by hand): one UserError naming it, no retry loop."""
    from attncache.db.tier_store import TierFolder

    folder = TierFolder(tmp_path / "kept", {"config": "c", "weights": "w"})
    folder.write("memo", {"x": torch.ones(3)})
    (file,) = (tmp_path / "kept").glob("memo-*.safetensors")
    file.unlink()
    with pytest.raises(UserError, match=f"{file.name} is missing"):
        folder.read("memo")


def test_a_full_disk_when_keeping_never_costs_the_runs_results(tmp_path, monkeypatch, capsys):
    """``eval --prefix-dir``: a disk that refuses the kept K/V and answers at the end of a run is a
    warning; the run's results come back, and the folder keeps what it held before. Before
    2026-12-07 the error ended the run after its rows were computed, their results unprinted."""
    from tiny import save_tiny_hf

    from attncache.workflows import EvalOptions, evaluate

    model_dir = save_tiny_hf("llama", tmp_path / "m")
    prompt = "Answer with yes or no, as in these examples. " * 2
    rows = [
        {"prompt": f"{prompt}Q{k}: is {k} even?", "choices": [" no", " yes"], "answer": 1 - k % 2}
        for k in range(6)
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiers = tmp_path / "tiers"
    opts = EvalOptions(model_name=str(model_dir), progress=False, prefix_dir=str(tiers))
    evaluate(None, str(data), opts)
    before = (tiers / "tiers.json").read_text()
    capsys.readouterr()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_mod.os, "fsync", no_space)
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps({**r, "prompt": r["prompt"] + "!"}) + "\n" for r in rows))
    (res,) = evaluate(None, str(more), opts)
    assert res.comparison.agreement == 1.0 and res.comparison.n == len(rows)
    err = capsys.readouterr().err
    assert "attncache: warning: the prefix K/V not kept: no space left on the device" in err
    assert "attncache: warning: the new answers not kept: no space left on the device" in err
    monkeypatch.undo()
    assert (tiers / "tiers.json").read_text() == before  # the folder is as the first run left it
    (again,) = evaluate(None, str(data), opts)
    assert again.memo_hit_rate == 1.0  # the first run's answers are still there


TREE_WRITER = """
import sys
import torch
sys.path.insert(0, sys.argv[2])
from tiny import TinyTokenizer, random_seqs, tiny_model
from attncache.db.tier_store import TierFolder
from attncache.models import fingerprint
from attncache.tiers import PrefixTier
model = tiny_model("llama").to(getattr(torch, sys.argv[3]))
tier = PrefixTier(model, min_prefix=4)
folder = TierFolder(sys.argv[1], fingerprint(model, TinyTokenizer()))
tier.load(folder)
tier.run([random_seqs(1, lo=40, hi=40, seed=12)[0]], 1, 0)
tier.save(folder)
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_processes_keeping_prefix_kv_in_one_prefix_dir_lose_none(tmp_path, dtype):
    """Two processes share a ``--prefix-dir``: both start from the same folder, another keeps
    its prompt meanwhile, then this one keeps its own. Both prompts' K/V are there afterwards,
    in the processes' dtype, and reading them gives what each process's own K/V give, bit for
    bit (the merge copies K/V, it never recomputes or casts them), and the plain model's logits
    (1e-4 in float32). Before 2026-12-07 the later save replaced the other's tree."""
    from pathlib import Path

    from attncache.db.tier_store import TierFolder
    from attncache.models import fingerprint
    from attncache.tiers import PrefixTier

    model = tiny_model("llama").to(getattr(torch, dtype))
    folder = TierFolder(tmp_path / "kept", fingerprint(model, TinyTokenizer()))
    mine = PrefixTier(model, min_prefix=4)
    assert not mine.load(folder)  # nothing kept yet, as for the other process
    own, other = random_seqs(1, lo=40, hi=40, seed=11)[0], random_seqs(1, lo=40, hi=40, seed=12)[0]
    mine.run([own], 1, 0)
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(
        [sys.executable, "-c", TREE_WRITER, str(tmp_path / "kept"), tests, dtype],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    mine.save(folder)
    later = PrefixTier(model, min_prefix=4)
    assert later.load(folder)
    for seq in (own, other):
        found = later.tree.match(seq, len(seq))
        assert found.length == len(seq)  # kept whole
        assert found.kv().dtype == model.dtype
    # what one process gets computing both prompts itself, then the same tails over them
    alone = PrefixTier(model, min_prefix=4)
    alone.run([own], 1, 0)
    alone.run([other], 1, 0)
    tails = [own + [5, 6, 7], other + [8, 9]]
    got, want_alone = later.run(tails, 1, 0), alone.run(tails, 1, 0)
    assert got.prefix_tokens == want_alone.prefix_tokens == [len(own), len(other)]
    for logits, same in zip(got.logits, want_alone.logits, strict=True):
        assert torch.equal(logits, same)
    if dtype == "float32":
        with torch.no_grad():
            for seq, logits in zip(tails, got.logits, strict=True):
                want = model(torch.tensor([seq])).logits[0, -1]
                assert (logits[-1] - want).abs().max().item() < 1e-4


def test_merging_a_tree_keeps_its_paths_most_recent_within_the_cap():
    """``merge_into``: the merged tree's paths go in as the most recently used, so at the cap
    the receiving tree's least recently used leaves are evicted first; a path whose prefix was
    evicted for room is skipped whole; the K/V are the merged tree's own."""
    from attncache.tiers.radix import RadixKV, merge_into

    per_token = 2 * 2 * 1 * 3 * 4
    kv = lambda n, val: torch.full((2, 2, 1, n, 3), float(val))  # noqa: E731
    there = RadixKV(max_bytes=30 * per_token)
    there.insert([1] + [0] * 9, kv(10, 1))  # oldest
    there.insert([2] + [0] * 9, kv(10, 2))
    mine = RadixKV(max_bytes=30 * per_token)
    mine.insert([3] + [0] * 9, kv(10, 3))
    mine.insert([3] + [0] * 9 + [4, 4], kv(2, 4), start=10)  # a child edge
    assert merge_into(there, mine) == 12
    assert there.bytes <= there.max_bytes
    assert there.match([1] + [0] * 9, 10).length == 0  # the least recently used went first
    assert there.match([2] + [0] * 9, 10).length == 10
    m = there.match([3] + [0] * 9 + [4, 4], 12)
    assert m.length == 12 and m.kv()[0, 0, 0, :, 0].tolist() == [3.0] * 10 + [4.0] * 2
    assert merge_into(there, mine) == 0  # nothing new the second time


def test_a_save_waits_for_another_processs_save_instead_of_losing_its_own(tmp_path):
    """Two runs ending together on one ``--prefix-dir``: the second save waits for the first's
    lock (a large tree takes seconds to write) and both are kept, instead of the second being
    refused and its K/V lost."""
    import threading
    import time

    from attncache.db.locks import write_lock
    from attncache.db.tier_store import TierFolder

    folder = TierFolder(tmp_path / "kept", {"config": "c", "weights": "w"})
    held = threading.Event()

    def other_process_saving() -> None:
        with write_lock(tmp_path / "kept"):
            held.set()
            time.sleep(0.5)

    saver = threading.Thread(target=other_process_saving)
    saver.start()
    held.wait(30)
    folder.update("memo", lambda there: {"x": torch.ones(2)})  # blocks until the lock is free
    saver.join()
    assert torch.equal(folder.read("memo")["x"], torch.ones(2))
