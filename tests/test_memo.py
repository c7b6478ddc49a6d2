"""Tier 0, the result memo: coverage, the LRU cap, persistence in the DB, and exactness in a run."""

import json

import numpy as np
import pytest
import torch
from test_replay import forward
from tiny import TinyTokenizer, random_seqs, tiny_model

from attncache import AttnCache
from attncache.tasks import Plan, Query, RowPlan, RunOptions, Tiers, run
from attncache.tiers.memo import Answer, ResultMemo

FP32 = "float32-cpu"


def test_an_answer_covers_only_what_it_holds_and_the_cap_evicts_the_least_recent():
    memo = ResultMemo(max_entries=2)
    memo.put([1, 2, 3], FP32, Answer({(1, 5): -0.5}, 7))
    assert memo.get([1, 2, 3], FP32, [(1, 5)]).argmax == 7
    assert memo.get([1, 2, 3], FP32, [(1, 5), (1, 6)]) is None  # another scoring asked for more
    memo.put([1, 2, 3], FP32, Answer({(1, 6): -2.0}, 7))  # ... and now it has both
    assert memo.get([1, 2, 3], FP32, [(1, 5), (1, 6)]).logprobs == {(1, 5): -0.5, (1, 6): -2.0}
    memo.put([4], FP32, Answer({}, 1))
    memo.get([1, 2, 3], FP32)  # recently used
    memo.put([5], FP32, Answer({}, 2))
    assert len(memo) == 2 and memo.get([4], FP32) is None and memo.get([1, 2, 3], FP32) is not None
    st = memo.stats.as_dict()
    assert st["lookups"] == 6 and st["hits"] == 4


def test_merged_answers_never_push_a_memo_past_its_cap_nor_out_its_own():
    """Another process's answers join as the least recent: past the cap they go first."""
    memo, other = ResultMemo(max_entries=3), ResultMemo()
    for seq in ([1], [2]):
        memo.put(seq, FP32, Answer({}, seq[0]))
    for seq in ([7], [8], [9]):
        other.put(seq, FP32, Answer({}, seq[0]))
    assert memo.merge(other) == 3  # new here, though two of them did not fit
    assert len(memo) == 3
    assert memo.get([1], FP32).argmax == 1 and memo.get([2], FP32).argmax == 2


def test_arrays_round_trip_logprobs_and_embeddings():
    memo = ResultMemo()
    memo.put([1, 2], FP32, Answer({(1, 3): -1.25, (2, 4): -0.5}, 9))
    memo.put([3], FP32, Answer(embedding=np.arange(4, dtype=np.float32)))
    again = ResultMemo.from_arrays(memo.to_arrays())
    assert again.get([1, 2], FP32, [(1, 3), (2, 4)]).logprobs == {(1, 3): -1.25, (2, 4): -0.5}
    assert np.array_equal(again.get([3], FP32, embedding=True).embedding, np.arange(4))


def test_greedy_tokens_round_trip_and_an_answer_without_them_misses_a_greedy_lookup():
    """lm-eval's is_greedy needs the greedy token at every scored position: kept beside the
    log-probs, and an answer stored without them is a miss for a lookup that needs them."""
    memo = ResultMemo()
    memo.put([1, 2], FP32, Answer({(1, 3): -1.25, (2, 4): -0.5}, 9, greedy={1: 3, 2: 7}))
    memo.put([5], FP32, Answer({(1, 3): -2.0}, 4))
    arrays = memo.to_arrays()
    again = ResultMemo.from_arrays(arrays)
    assert again.get([1, 2], FP32, [(1, 3), (2, 4)], greedy=True).greedy == {1: 3, 2: 7}
    assert again.get([5], FP32, [(1, 3)], greedy=True) is None
    assert again.get([5], FP32, [(1, 3)]).logprobs == {(1, 3): -2.0}
    older = {k: v for k, v in arrays.items() if not k.startswith("greedy_")}  # before this field
    assert ResultMemo.from_arrays(older).get([1, 2], FP32, [(1, 3)]).greedy == {}


def plan_of(seqs):
    rows = [
        RowPlan("choice1", [i], [[Query(i, 1, 5)], [Query(i, 1, 9)]], [1.0, 1.0])
        for i in range(len(seqs))
    ]
    return Plan(seqs, rows, [], True)


def test_a_second_run_is_answered_from_the_memo_with_the_same_outputs(tmp_path):
    model = tiny_model("llama")
    seqs = random_seqs(6, seed=31)
    memo = ResultMemo()
    opts, tiers = RunOptions(batch_size=4, progress=False), Tiers(memo=memo)
    first = run(model, TinyTokenizer(), plan_of(seqs), opts, tiers)
    assert not any(first.memo_hit) and len(memo) == 6
    second = run(model, TinyTokenizer(), plan_of(seqs), opts, tiers)
    assert (
        all(second.memo_hit) and second.logprobs == first.logprobs and second.argmax == first.argmax
    )
    # persisted in a DB, checksummed like the maps, and read back by another process's open
    db = tmp_path / "db"
    AttnCache.build(model, TinyTokenizer(), seqs, db, progress=False)
    assert memo.save(AttnCache.open(db).db)
    assert AttnCache.verify(db) == []
    again = ResultMemo.load(AttnCache.open(db).db)
    assert (
        again.get(seqs[2], FP32, [(1, 5), (1, 9)]).logprobs
        == memo.get(seqs[2], FP32, [(1, 5), (1, 9)]).logprobs
    )
    # inserts and other commits keep it
    AttnCache.open(db).learn(model, random_seqs(2, seed=77))
    assert len(ResultMemo.load(AttnCache.open(db).db)) == 6 and AttnCache.verify(db) == []


def test_a_damaged_memo_is_refused_not_used(tmp_path):
    model = tiny_model("llama")
    seqs = random_seqs(4, seed=32)
    db = tmp_path / "db"
    AttnCache.build(model, TinyTokenizer(), seqs, db, progress=False)
    memo = ResultMemo()
    run(
        model,
        TinyTokenizer(),
        plan_of(seqs),
        RunOptions(batch_size=4, progress=False),
        tiers=Tiers(memo=memo),
    )
    memo.save(AttnCache.open(db).db)
    name = json.loads((db / "manifest.json").read_text())["names"]["memo"]
    data = bytearray((db / name).read_bytes())
    data[-3] ^= 0xFF
    (db / name).write_bytes(bytes(data))
    assert any(name in p and "checksum" in p for p in AttnCache.verify(db))
    from attncache import UserError

    with pytest.raises(UserError, match="damaged"):
        ResultMemo.load(AttnCache.open(db).db)
    (db / name).write_bytes(bytes(data[:-10]))
    with pytest.raises(UserError, match="damaged"):
        AttnCache.open(db)


def test_answers_that_replayed_maps_are_never_memoised(built):
    model, cache, seqs = built("llama")
    memo = ResultMemo()
    new = random_seqs(2, lo=8, hi=12, seed=44)
    with cache.attach(model, policy="all", threshold=1e-4) as att:
        out = run(
            model,
            TinyTokenizer(),
            plan_of(seqs[:3] + new),
            RunOptions(batch_size=8, progress=False),
            tiers=Tiers(attached=att, memo=memo),
        )
    assert out.replayed[:3] == [True] * 3 and out.replayed[3:] == [False] * 2
    assert len(memo) == 2 and all(memo.get(s, FP32) is not None for s in new)
    ref, _ = forward(model, new, True)
    assert torch.isfinite(ref).all()


MEMO_WRITER = """
import sys
from attncache.db.tier_store import TierFolder
from attncache.tiers.memo import Answer, ResultMemo
folder = TierFolder(sys.argv[1], {"config": "c", "weights": "w"})
memo = ResultMemo.load_from(folder)
memo.put([9, 9, 9], "float32-cpu", Answer({(1, 4): -1.5}, 4))
memo.save_to(folder)
"""


def test_two_processes_keeping_answers_in_one_prefix_dir_lose_none(tmp_path):
    """Two runs share a ``--prefix-dir`` without a DB (two lm-eval runs, or a server and an eval):
    this one loads the kept answers, another process keeps an answer of its own meanwhile, then
    this one keeps its answer. Both are there afterwards, as they are in a DB's memo. Before
    2026-12-07 the later save replaced the folder's answers with its own, losing the other's."""
    import os
    import subprocess
    import sys

    from attncache.db.tier_store import TierFolder

    folder = TierFolder(tmp_path / "kept", {"config": "c", "weights": "w"})
    first = ResultMemo()
    first.put([1, 2, 3], "float32-cpu", Answer({(1, 5): -0.25}, 7))
    first.save_to(folder)
    mine = ResultMemo.load_from(folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(
        [sys.executable, "-c", MEMO_WRITER, str(tmp_path / "kept")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    mine.put([4, 5, 6], "float32-cpu", Answer({(1, 2): -0.5}, 2))
    mine.save_to(folder)
    kept = ResultMemo.load_from(folder)
    assert kept.get([1, 2, 3], "float32-cpu", [(1, 5)]).argmax == 7
    assert kept.get([9, 9, 9], "float32-cpu", [(1, 4)]).argmax == 4  # the other process's
    assert kept.get([4, 5, 6], "float32-cpu", [(1, 2)]).argmax == 2
    assert mine.get([9, 9, 9], "float32-cpu", [(1, 4)]).argmax == 4  # merged into this one too
