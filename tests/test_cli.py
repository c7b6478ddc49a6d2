"""The CLI end to end on the real offline models (marked ``real``), and its error contract."""

import json
import subprocess
import sys

import pytest

PY = [sys.executable, "-m", "attncache"]


def cli(*args, ok=True, timeout=900):
    r = subprocess.run(PY + list(args), capture_output=True, text=True, timeout=timeout)
    if ok:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def assert_one_line_error(r, needle):
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in lines[0], lines[0]


def test_errors_are_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(cli("inspect", str(tmp_path / "missing"), ok=False), "does not exist")
    assert_one_line_error(cli("inspect", str(f), ok=False), "is a file")
    assert_one_line_error(cli("inspect", str(tmp_path), ok=False), "not a cache DB")
    assert_one_line_error(
        cli("build", "--model", "smollm", "--data", "sst2", "--out", str(tmp_path / "x"), ok=False),
        "did you mean 'smollm2-135m'",
    )
    assert_one_line_error(
        cli("eval", "--db", str(tmp_path / "missing"), "--data", "sst2", ok=False), "does not exist"
    )
    # nan passes every range comparison: each numeric flag refuses it by name
    build = ["build", "--model", "smollm2-135m", "--data", "sst2", "--out", str(tmp_path / "y")]
    for args in (
        [*build, "--calibrate-share", "nan"],
        [*build, "--max-loss", "nan"],
        ["eval", "--model", "smollm2-135m", "--data", "sst2", "--threshold", "nan"],
        ["serve", "--model", "smollm2-135m", "--max-wait-ms", "nan"],
    ):
        want = f"argument {args[-2]}: expected float, got 'nan'"
        assert_one_line_error(cli(*args, ok=False), want)


@pytest.fixture(scope="module")
def minilm_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("minilm") / "db"
    cli("build", "--model", "minilm-l6", "--data", "sst2[0:40]", "--out", str(db), "--quiet")
    return db


@pytest.mark.real
def test_minilm_round_trip_and_inspect(minilm_db):
    same = json.loads(
        cli(
            "eval", "--db", str(minilm_db), "--data", "sst2[0:40]", "--policy", "all", "--json"
        ).stdout
    )
    assert same["hit_rate"] == 1.0 and same["cosine_to_exact_min"] > 0.999
    pairs = json.loads(cli("eval", "--db", str(minilm_db), "--data", "rte[0:20]", "--json").stdout)
    for k in (
        "n",
        "hit_rate",
        "reuse_fraction",
        "threshold",
        "cosine_to_exact_mean",
        "cosine_to_exact_min",
        "pair_auc_exact",
        "pair_auc_cached",
    ):
        assert k in pairs
    info = json.loads(cli("inspect", str(minilm_db), "--json").stdout)
    assert info["entries"] == 40 and info["model"] == "minilm-l6" and info["format_version"] == 2
    assert info["bytes_on_disk"] > 0 and info["bytes_per_entry"] == pytest.approx(
        info["bytes_on_disk"] / 40
    )
    r = cli(
        "build", "--model", "minilm-l6", "--data", "sst2[0:5]", "--out", str(minilm_db), ok=False
    )
    assert_one_line_error(r, "already exists")
    assert_one_line_error(
        cli("eval", "--db", str(minilm_db), "--data", "sst2", "--policy", "99", ok=False),
        "out of range",
    )
    assert_one_line_error(
        cli("eval", "--db", str(minilm_db), "--data", "sst2", "--policy", "fixed:3", ok=False),
        "no template maps",
    )
    assert_one_line_error(
        cli("templates", "--db", str(minilm_db), "--data", "sst2[0:20]", ok=False), "need a decoder"
    )


@pytest.mark.real
def test_bench_json_fields(minilm_db, tmp_path):
    png = tmp_path / "b.png"
    res = json.loads(
        cli(
            "bench",
            "--db",
            str(minilm_db),
            "--data",
            "sst2[0:6]",
            "--policy",
            "all",
            "--repeats",
            "2",
            "--batch-sizes",
            "1,4",
            "--json",
            "--plot",
            str(png),
        ).stdout
    )
    for k in (
        "attn_speedup_vs_sdpa",
        "attn_speedup_vs_eager",
        "e2e_speedup_vs_sdpa",
        "e2e_speedup_vs_eager",
        "workload_speedup_vs_sdpa",
        "lookup_ms_median",
        "fetch_ms_median",
        "prefill_ms_median_sdpa",
        "hit_rate",
        "n_hits",
        "n",
        "bound_e2e_speedup",
        "fraction_of_bound",
        "machine",
    ):
        assert k in res, k
    assert res["n"] == 6 and res["n_hits"] == 6 and res["machine"]["threads"] >= 1
    items = [it for it in res["per_item"] if it["reused"]]
    assert len(items) == res["n_reused"] == 6  # every item hit its own maps
    # the ratios are the summed per-item medians of the two variants, as the docs define them
    assert res["e2e_speedup_vs_sdpa"] == pytest.approx(
        sum(it["sdpa_ms"] for it in items) / sum(it["cached_ms"] for it in items), rel=1e-6
    )
    assert res["fraction_of_bound"] == pytest.approx(
        res["e2e_speedup_vs_sdpa"] / res["bound_e2e_speedup"]
    )
    # the workload pass against the same pass with its hits' maps in RAM and no lookup
    assert res["workload_seconds_bound"] > 0 and res["workload_bound_skipped"] is None
    assert res["workload_fraction_of_bound"] == pytest.approx(
        res["workload_seconds_bound"] / res["workload_seconds"]
    )
    assert png.stat().st_size > 1000


@pytest.mark.real
def test_smollm2_round_trip(tmp_path):
    db = tmp_path / "db"
    cli("build", "--data", "sst2[0:40]", "--out", str(db), "--quiet")
    same = json.loads(
        cli("eval", "--db", str(db), "--data", "sst2[0:40]", "--policy", "all", "--json").stdout
    )
    assert same["hit_rate"] >= 0.95 and same["agreement"] >= 0.98 and same["reuse_fraction"] >= 0.95
    other = json.loads(
        cli(
            "eval",
            "--db",
            str(db),
            "--data",
            "sst2[40:70]",
            "--policy",
            "all",
            "--policy",
            "default",
            "--json",
        ).stdout
    )["results"]
    assert [r["policy"] for r in other] == ["all", "default"]
    for r in other:
        for k in (
            "n",
            "accuracy_baseline",
            "accuracy_cached",
            "agreement",
            "hit_rate",
            "reuse_fraction",
            "threshold",
        ):
            assert k in r
        assert r["n"] == 30 and 0 <= r["hit_rate"] <= 1
    assert other[1]["reuse_fraction"] <= other[0]["reuse_fraction"]


@pytest.mark.real
def test_smollm2_compact_store_learn_cap_and_inspect(tmp_path):
    """int8 maps of only the policy layers; eval --learn under a byte cap; inspect shows hits and
    the cap."""
    db = tmp_path / "db"
    cli(
        "build",
        "--data",
        "sst2[0:24]",
        "--out",
        str(db),
        "--quiet",
        "--compression",
        "int8",
        "--store-layers",
        "auto",
        "--no-calibrate",  # the probe's stable layers as the default (too few rows to calibrate)
    )
    info = json.loads(cli("inspect", str(db), "--json").stdout)
    assert (
        info["compression"] == "int8" and info["map_bytes_vs_fp32"] < 1 / 8
    )  # of the stored layers in fp32
    assert info["stored_layers"] == len(info["policy_layers"]) == 5
    cap = int(info["map_bytes"] * 1.5)
    learned = json.loads(
        cli(
            "eval",
            "--db",
            str(db),
            "--data",
            "sst2[24:60]",
            "--learn",
            "--max-bytes",
            str(cap),
            "--no-prefix-cache",
            "--json",
        ).stdout
    )
    assert learned["learned"] > 0 and learned["n"] == 36
    after = json.loads(cli("inspect", str(db), "--json").stdout)
    assert after["map_bytes"] <= cap and after["max_bytes"] == cap and after["evictions"] > 0
    again = json.loads(
        cli(
            "eval",
            "--db",
            str(db),
            "--data",
            "sst2[40:60]",
            "--policy",
            "default",
            "--no-prefix-cache",
            "--no-memo",  # the first eval's answers are in the memo now: look the maps up
            "--json",
        ).stdout
    )
    assert again["hit_rate"] >= 0.9  # the learned inputs now hit (their own maps)
    assert json.loads(cli("inspect", str(db), "--json").stdout)[
        "top_entries"
    ]  # hit counts were saved
    assert "ok" in cli("verify", str(db)).stdout
    assert (
        json.loads(cli("retrain", str(db), "--json", "--quiet").stdout)["entries"]
        == after["entries"]
    )
