"""Fitting the user's world: packaging, devices and dtypes, CLI conventions, caches that survive a
restart, the device-resident map cache, and the Python API that mirrors the server."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, cli
from test_replay import forward
from tiny import TinyTokenizer, random_seqs, tiny_model

from attncache import AttnCache, Scorer, UserError
from attncache.db.tier_store import TierFolder
from attncache.models import fingerprint, numerics
from attncache.tiers import PrefixTier, kept_name

ROOT = Path(__file__).resolve().parents[1]


def test_the_library_pins_no_torch_and_installing_it_keeps_the_users():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.startswith("torch"))
    assert "==" not in torch_dep and "<3" in torch_dep  # a range, with the major bound
    assert (ROOT / "scripts" / "constraints.txt").read_text().strip() == "torch==2.13.0"
    assert (ROOT / "src" / "attncache" / "py.typed").exists()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--no-build-isolation",
            "--report",
            "-",
            "--quiet",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    installs = [x["metadata"]["name"].lower() for x in json.loads(r.stdout)["install"]]
    assert "attncache" in installs and "torch" not in installs  # the installed torch satisfies it


def test_flags_that_would_do_nothing_are_refused(tmp_path):
    for args, needle in (
        (
            ["eval", "--db", "x", "--data", "sst2", "--sweep", "--threshold", "0.1"],
            "--threshold has no effect",
        ),
        (
            ["eval", "--db", "x", "--data", "sst2", "--plot", "a.png"],
            "--plot has no effect without --sweep",
        ),
        (
            ["eval", "--db", "x", "--data", "sst2", "--max-bytes", "1G"],
            "--max-bytes has no effect without --learn",
        ),
        (
            ["eval", "--db", "x", "--data", "sst2", "--no-prefix-cache", "--prefix-bytes", "1G"],
            "--prefix-bytes",
        ),
        (
            ["build", "--data", "sst2", "--out", "x", "--sparse-eps", "0.1"],
            "--sparse-eps has no effect",
        ),
        (
            [
                "calibrate",
                "--db",
                "x",
                "--data",
                "sst2",
                "--max-loss",
                "0.1",
                "--confidence",
                "1.5",
            ],
            "confidence",
        ),
        (["bench", "--db", "x", "--data", "sst2", "--repeats", "0"], "--repeats"),
        (["bench", "--model", "m", "--data", "sst2", "--policy", "all"], "--policy has no effect"),
        (
            [
                "calibrate",
                "--db",
                "x",
                "--data",
                "sst2",
                "--max-loss",
                "0.1",
                "--no-templates",
                "--rank-share",
                "0.3",
            ],
            "--rank-share has no effect",
        ),
        (["inspect", "--db", "a", str(tmp_path)], "two DB folders"),
        (["eval", "--data", "sst2"], "pass --db"),
    ):
        assert_one_line_error(cli(*args, ok=False), needle)


def test_help_documents_the_policy_grammar():
    out = cli("eval", "--help").stdout
    for spec in ("heads:N", "fixed:N", "A+B", "17,20,23"):
        assert spec in out


def test_progress_off_a_terminal_is_one_line_per_stage(tiny_hf, tmp_path):
    r = cli(
        "build", "--model", tiny_hf("llama"), "--data", "sst2[0:12]", "--out", str(tmp_path / "db")
    )
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    # SST-2 scores each row as two choice sequences: 12 rows, 24 maps recorded
    assert any(x.startswith("recording maps: 24 in") for x in lines)
    assert any(x.startswith("pair labels:") for x in lines) and len(lines) < 10  # no bar updates
    assert "\r" not in r.stderr


def test_a_db_built_from_a_relative_model_folder_works_from_another_folder(tiny_hf, tmp_path):
    model = Path(tiny_hf("llama"))
    env = dict(os.environ)
    rel = os.path.relpath(model, tmp_path)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "attncache",
            "build",
            "--model",
            rel,
            "--data",
            "sst2[0:8]",
            "--out",
            "db",
            "--quiet",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(
        cli("inspect", "--db", str(tmp_path / "db"), "--json").stdout
    )  # from another folder
    assert info["model"] == str(model.resolve())
    res = json.loads(
        cli(
            "eval", "--db", str(tmp_path / "db"), "--data", "sst2[8:12]", "--json", "--quiet"
        ).stdout
    )
    assert res["device"] == "cpu" and res["dtype"] == "float32" and res["n"] == 4


def test_dtype_is_recorded_and_the_db_still_recognises_its_model(tiny_hf, tmp_path):
    db = tmp_path / "db"
    cli("build", "--model", tiny_hf("llama"), "--data", "sst2[0:8]", "--out", str(db), "--quiet")
    res = json.loads(
        cli(
            "eval",
            "--db",
            str(db),
            "--data",
            "sst2[8:12]",
            "--dtype",
            "bfloat16",
            "--json",
            "--quiet",
        ).stdout
    )
    assert res["dtype"] == "bfloat16" and res["device"] == "cpu"
    assert_one_line_error(
        cli("eval", "--db", str(db), "--data", "sst2", "--device", "cuda", ok=False)
        if not torch.cuda.is_available()
        else cli("--help"),
        "no CUDA device",
    )


def test_a_restarted_server_answers_a_repeated_prefix_from_disk(tmp_path):
    model = tiny_model("llama")
    tok = TinyTokenizer()
    folder = TierFolder(tmp_path / "tiers", fingerprint(model, tok))
    prompt = random_seqs(1, lo=30, hi=30, seed=5)[0]
    first = PrefixTier(model, min_prefix=8)
    first.run([prompt + [3, 4]], 1, 0)
    first.save(folder)
    again = PrefixTier(model, min_prefix=8)  # a new process would start here
    assert again.load(TierFolder(tmp_path / "tiers", fingerprint(model, tok)))
    got = again.run([prompt + [9]], 1, 0)
    assert got.prefix_tokens == [30] and again.stats.tokens_run == 1  # only the new token ran
    ref, _ = forward(model, [prompt + [9]], True)
    assert (ref[0, -1] - got.logits[0][-1]).abs().max() < 1e-4
    # another model's folder is refused; a damaged file is refused, not used
    with pytest.raises(UserError, match="another model"):
        TierFolder(tmp_path / "tiers", fingerprint(tiny_model("llama", seed=9), tok)).read(
            kept_name(numerics(model))
        )
    index = json.loads((tmp_path / "tiers" / "tiers.json").read_text())
    path = tmp_path / "tiers" / index["files"][kept_name(numerics(model))]["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged"):
        PrefixTier(model).load(TierFolder(tmp_path / "tiers", fingerprint(model, tok)))


def test_eval_starts_from_the_prompts_an_earlier_run_kept(tmp_path):
    """``eval --prefix-dir``: a first run keeps its shared prompt's K/V; a second run on new rows
    with that prompt reuses it from disk (more tokens reused than cold, answers still equal to the
    exact pass); the memo of rows answered before comes back too; a tier-less run is refused."""
    from tiny import save_tiny_hf

    from attncache.workflows import EvalOptions, evaluate

    model_dir = save_tiny_hf("llama", tmp_path / "m")
    prompt = "Answer with yes or no, as in these examples. " * 2
    rows = [
        {"prompt": f"{prompt}Q{k}: is {k} even?", "choices": [" no", " yes"], "answer": 1 - k % 2}
        for k in range(12)
    ]
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    new.write_text("".join(json.dumps(r) + "\n" for r in rows[6:]))
    kw = {"model_name": str(model_dir), "progress": False}
    tiers = tmp_path / "tiers"
    cold = evaluate(None, str(new), EvalOptions(memo=False, **kw))[0]
    evaluate(None, str(old), EvalOptions(prefix_dir=str(tiers), **kw))
    assert (tiers / "tiers.json").is_file()
    warm = evaluate(None, str(new), EvalOptions(memo=False, prefix_dir=str(tiers), **kw))[0]
    for res in (cold, warm):
        assert res.comparison.agreement == 1.0
    assert warm.prefix_tokens_reused_fraction > cold.prefix_tokens_reused_fraction
    again = evaluate(None, str(old), EvalOptions(prefix_dir=str(tiers), **kw))[0]  # answered before
    assert again.memo_hit_rate == 1.0 and again.comparison.agreement == 1.0
    with pytest.raises(UserError, match="prefix-dir"):
        evaluate(None, str(new), EvalOptions(prefix_dir=str(tiers), prefix_bytes=None, **kw))
    # bench only reads a kept tree: an empty folder is refused, not created
    from attncache.bench import BenchConfig, bench

    with pytest.raises(UserError, match="holds no kept prefixes"):
        bench(None, str(new), cfg=BenchConfig(prefix_dir=str(tmp_path / "none")), **kw)
    assert not (tmp_path / "none").exists()
    warm_bench = bench(
        None,
        str(new),
        cfg=BenchConfig(prefix_dir=str(tiers), batch_sizes=(2,), pass_repeats=1, per_item=False),
        **kw,
    )
    assert warm_bench["prefix_warm_start"] and warm_bench["workload_seconds"] > 0
    assert warm_bench["workload_seconds_bound"] is None
    assert warm_bench["workload_bound_skipped"] == "no map DB"


def test_the_device_map_cache_is_exact_capped_and_counted(built):
    model, cache, seqs = built("llama")
    ref, mask = forward(model, seqs[:4], True)
    per_layer = 4 * 20 * 20 * 4  # an upper bound of one layer's [H, L, L] fp32 maps here
    with cache.attach(model, "all", device_map_bytes=3 * per_layer) as att:
        out1, _ = forward(model, seqs[:4], True)
        out2, _ = forward(model, seqs[:4], True)
        st = att.maps.device_cache.stats.as_dict()
    assert (ref - out1)[mask].abs().max() < 1e-4 and torch.equal(out1, out2)
    assert 0 < st["bytes"] <= 3 * per_layer and st["evictions"] > 0 and st["misses"] > 0
    with cache.attach(model, "all", device_map_bytes=1 << 30) as att:
        forward(model, seqs[:4], True)
        forward(model, seqs[:4], True)
        st = att.maps.device_cache.stats.as_dict()
    assert st["hits"] == st["misses"] and st["evictions"] == 0  # the second pass found every map


def test_the_python_api_mirrors_the_server(built, tmp_path):
    model, cache, seqs = built("llama")
    db = AttnCache.build(
        model,
        TinyTokenizer(),
        ["the cat sat", "a dog barked twice"],
        tmp_path / "db",
        progress=False,
    )
    assert len(db.store) == 2  # strings are tokenized
    with Scorer(model, TinyTokenizer(), db) as s:
        one = s.score("the cat sat on the mat and", [" purred", " slept well"])
        assert len(one["logprobs"]) == 2 and one["choice"] in (0, 1) and "usage" in one
        assert len(s.rerank("cat", ["the cat sat", "rain"])) == 2
        cl = s.classify(["great"], ["good", "bad"])
        assert cl[0]["label"] in ("good", "bad") and abs(sum(cl[0]["probs"]) - 1) < 1e-6
        with pytest.raises(UserError, match="at least one"):
            s.score("hi", [])
