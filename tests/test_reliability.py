"""Integrity checks, identity guards and the no-code-from-data rule."""

import re
import shutil
from pathlib import Path

import pytest
from tiny import TinyTokenizer, random_seqs, tiny_model

from attncache import AttnCache, UserError

SRC = Path(__file__).resolve().parents[1] / "src" / "attncache"


@pytest.fixture
def db(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "db"
    AttnCache.build(model, TinyTokenizer(), random_seqs(6, seed=4), path, progress=False)
    return path


def test_verify_accepts_a_fresh_db(db):
    assert AttnCache.verify(db) == []


def test_truncated_or_missing_files_refused_at_open(db, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(db, bad)
    with open(bad / "maps.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="maps.bin has 100 bytes"):
        AttnCache.open(bad)
    gone = tmp_path / "gone"
    shutil.copytree(db, gone)
    (gone / "vectors.npy").unlink()
    with pytest.raises(UserError, match="vectors.npy is missing"):
        AttnCache.open(gone)


def test_corruption_and_extra_files_found_by_verify(db):
    data = bytearray((db / "maps.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (db / "maps.bin").write_bytes(bytes(data))
    (db / "stray.bin").write_bytes(b"x")
    problems = AttnCache.verify(db)
    assert any("maps.bin does not match its checksum" in p for p in problems)
    assert any("unexpected file stray.bin" in p for p in problems)


def test_build_refuses_to_overwrite_and_leaves_no_temp(db):
    with pytest.raises(UserError, match="already exists"):
        AttnCache.build(tiny_model("llama"), TinyTokenizer(), random_seqs(3), db, progress=False)
    assert not [p for p in db.parent.iterdir() if ".building-" in p.name]


def test_no_code_from_data_in_source():
    """No pickle, torch.load, eval or exec anywhere in the package."""
    pattern = re.compile(r"import pickle|\bpickle\.|torch\.load\(|(?<![\w.])eval\(|(?<![\w.])exec\(|"
                         r"allow_pickle\s*=\s*True")
    hits = [f"{p.name}:{i}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
    # the guard itself can fail
    assert pattern.search("x = pickle.loads(b)") and pattern.search("torch.load(f)") and pattern.search("eval(s)")
    assert not pattern.search("model.eval()")


def test_default_threshold_ignores_siblings_from_the_same_row(tmp_path):
    """Two choices of one prompt are near-duplicates; a new input never has such a neighbour."""
    model = tiny_model("llama")
    prompts = random_seqs(8, lo=12, hi=12, seed=30)
    seqs = [p + [c] for p in prompts for c in (5, 6)]  # each row: the prompt + one of two 1-token choices
    rows = [i for i in range(len(prompts)) for _ in (5, 6)]
    plain = AttnCache.build(model, TinyTokenizer(), seqs, tmp_path / "a", progress=False)
    grouped = AttnCache.build(model, TinyTokenizer(), seqs, tmp_path / "b", progress=False, groups=rows)
    assert grouped.threshold > 1.2 * plain.threshold
