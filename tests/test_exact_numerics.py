"""Exact artefacts are keyed by their numerics: answers and K/V computed in one dtype (or device, or
with int8 linears) are never served to another as exact. And what an eval learns is kept."""

import copy
import json
import shutil

import pytest
import torch
from test_cli import cli
from tiny import TinyTokenizer, random_seqs, tiny_model

from attncache import AttnCache, Scorer, UserError
from attncache.db.tier_store import TierFolder
from attncache.models import fingerprint, numerics, same_identity
from attncache.tiers import PrefixTier, kept_name
from attncache.workflows.session import quantize_int8

PROMPTS = [
    ("Review: a gripping and moving film, told well\nSentiment:", [" negative", " positive"]),
    ("Review: dull, long and far too loud for its own good\nSentiment:", [" bad", " good"]),
    ("Question: is the sky blue on a clear day?\nAnswer:", [" no", " yes", " maybe"]),
]


def in_bf16(model):
    """A bfloat16 copy that answers to the fp32 model's fingerprint, as ``load_model(...,
    dtype="bfloat16")`` gives (the weights are fingerprinted before the cast)."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    same_identity(low, model)
    return low


def scores(scorer: Scorer) -> list[dict]:
    return [scorer.score(p, c) for p, c in PROMPTS]


def assert_close(got: list[dict], want: list[dict], tol: float = 1e-4) -> None:
    for g, w in zip(got, want, strict=True):
        assert max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"], strict=True)) < tol


def test_numerics_name_dtype_device_and_int8():
    model = tiny_model("llama")
    assert numerics(model) == "float32-cpu"
    assert numerics(copy.deepcopy(model).to(torch.bfloat16)) == "bfloat16-cpu"
    assert numerics(quantize_int8(copy.deepcopy(model))).endswith("-int8")
    # a norm kept in float32 beside bfloat16 layers computes other numbers than either
    mixed = copy.deepcopy(model).to(torch.bfloat16)
    mixed.model.norm.float()
    assert numerics(mixed) == "bfloat16-cpu-with-float32"


def test_a_bf16_scorer_on_a_db_never_answers_a_later_fp32_one(tmp_path):
    """The memo kept in a DB: bf16 answers first, then an fp32 Scorer on the same DB answers what
    the fp32 model computes (on 9cecc0c every one came from the memo, 0.13 off)."""
    model, tok = tiny_model("llama"), TinyTokenizer()
    db = tmp_path / "db"
    AttnCache.build(model, tok, random_seqs(10, seed=3), db, progress=False)
    with Scorer(model, tok, memo=False) as plain:
        want = scores(plain)
    bf16 = in_bf16(model)
    with Scorer(bf16, tok, AttnCache.open(db), policy="none") as s:
        low = scores(s)
    assert max(abs(a - b) for g, w in zip(low, want) for a, b in zip(g["logprobs"], w["logprobs"]))
    assert json.loads((db / "manifest.json").read_text())["memo"]["entries"] > 0
    with Scorer(model, tok, AttnCache.open(db), policy="none") as s:
        got = scores(s)
    assert all(g["usage"]["attncache"]["memo_hits"] == 0 for g in got)
    assert_close(got, want)
    with Scorer(model, tok, AttnCache.open(db), policy="none") as s:  # its own answers do come back
        again = scores(s)
    assert all(
        g["usage"]["attncache"]["memo_hits"] == g["usage"]["attncache"]["sequences"] for g in again
    )
    assert_close(again, want)


def test_a_prefix_dir_keeps_each_numerics_apart(tmp_path):
    """``--prefix-dir``: a bf16 process keeps its K/V and answers; an fp32 process on the same
    folder neither restores those K/V nor takes those answers."""
    model, tok = tiny_model("llama"), TinyTokenizer()
    with Scorer(model, tok, memo=False) as plain:
        want = scores(plain)
    bf16 = in_bf16(model)
    folder = str(tmp_path / "tiers")
    with Scorer(bf16, tok, prefix_dir=folder) as s:
        scores(s)
    index = json.loads((tmp_path / "tiers" / "tiers.json").read_text())
    assert kept_name("bfloat16-cpu") in index["files"] and "memo" in index["files"]
    with Scorer(model, tok, prefix_dir=folder) as s:
        got = scores(s)
    assert all(g["usage"]["attncache"]["memo_hits"] == 0 for g in got)
    assert_close(got, want)
    # the bf16 tree is never restored into an fp32 tier, by name or by hand
    tier = PrefixTier(model)
    kept = TierFolder(folder, fingerprint(model, tok)).read(kept_name("bfloat16-cpu"))
    assert kept is not None and kept["kv"].dtype == torch.bfloat16
    with pytest.raises(UserError, match="not exact"):
        tier.restore(kept)


def test_a_mixed_dtype_models_answers_never_reach_the_all_bf16_model(tmp_path):
    """A bfloat16 model whose final norm and head stay float32 (as checkpoints that keep modules
    in float32 load) computes other numbers than the all-bfloat16 model with the same weights:
    its kept answers are not the other's, in either order, while each model's own come back."""
    model, tok = tiny_model("llama"), TinyTokenizer()
    bf16 = in_bf16(model)
    mixed = in_bf16(model)
    mixed.model.norm.float()
    mixed.lm_head.float()
    folder = str(tmp_path / "tiers")

    def kept_run(m) -> tuple[list[dict], list[int]]:
        with Scorer(m, tok, prefix_dir=folder) as s:
            got = scores(s)
        return got, [g["usage"]["attncache"]["memo_hits"] for g in got]

    for first, second in ((mixed, bf16), (bf16, mixed)):
        shutil.rmtree(folder, ignore_errors=True)
        first_got, _ = kept_run(first)
        got, hits = kept_run(second)
        assert hits == [0] * len(PROMPTS)  # nothing of the first model's came back
        # the two numerics differ on these prompts, so a served answer would have shown
        assert any(g["logprobs"] != w["logprobs"] for g, w in zip(got, first_got, strict=True))
        again, hits = kept_run(second)
        assert hits == [len(c) for _, c in PROMPTS]  # its own answers do come back
        assert [g["logprobs"] for g in again] == [g["logprobs"] for g in got]


def test_the_in_process_tree_starts_afresh_when_the_model_changes_dtype():
    model = copy.deepcopy(tiny_model("llama"))
    prompt = random_seqs(1, lo=30, hi=30, seed=5)[0]
    tier = PrefixTier(model, min_prefix=8)
    tier.run([prompt + [3], prompt + [4]], 1, 0)
    assert not tier.empty
    model.to(torch.bfloat16)
    out = tier.run([prompt + [5]], 1, 0)
    assert out.prefix_tokens == [0] and tier.numerics == "bfloat16-cpu"


def test_a_second_eval_is_answered_from_the_memo_the_first_kept(tiny_hf, tmp_path):
    """On 9cecc0c the first eval merged its answers without marking them new: nothing was saved
    and the second eval's memo_hit_rate was 0.0."""
    db = tmp_path / "db"
    cli("build", "--model", tiny_hf("llama"), "--data", "sst2[0:8]", "--out", str(db), "--quiet")
    run = ["eval", "--db", str(db), "--data", "sst2[8:14]", "--json", "--quiet"]
    first = json.loads(cli(*run).stdout)
    second = json.loads(cli(*run).stdout)
    assert first["memo_hit_rate"] == 0.0 and second["memo_hit_rate"] == 1.0
    assert second["agreement"] == 1.0 and second["accuracy_cached"] == first["accuracy_cached"]
    bf16 = json.loads(cli(*run, "--dtype", "bfloat16").stdout)  # other numerics: not from fp32's
    assert bf16["memo_hit_rate"] == 0.0


def test_a_half_precision_the_cpu_emulates_is_one_warning_line(tiny_hf, monkeypatch, capsys):
    """On an AVX2-only CPU bfloat16 matmuls run many times slower than float32's (the probe read
    0.12x, a whole bfloat16 pass 6x slower): a session opened in bfloat16 there says so in one
    line, and not where it is fast nor in float32."""
    from attncache.tasks import precisions
    from attncache.workflows import Session, SessionOptions

    for probe, lines in ((0.01, 1), (2.0, 0)):
        monkeypatch.setattr(precisions, "native_speedup", lambda dtype, device, p=probe: p)
        for dtype in ("bfloat16", "float32"):
            Session.open(None, tiny_hf("llama"), SessionOptions(dtype=dtype))
        err = [e for e in capsys.readouterr().err.splitlines() if "warning" in e]
        assert len(err) == lines
        assert all("bfloat16 is emulated on this CPU (its matmuls run at 0.01x" in e for e in err)
