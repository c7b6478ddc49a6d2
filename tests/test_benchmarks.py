"""Benchmarks are code: every script runs end to end on a tiny model for one short iteration
(``server_process.py`` is the load test's and the soak's helper, run by both)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = [sys.executable]


def run(*args, timeout=600):
    r = subprocess.run(
        PY + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert r.returncode == 0, (args, r.stderr[-3000:])
    return r


@pytest.fixture(scope="module")
def tiny_db(tiny_hf, tmp_path_factory):
    db = tmp_path_factory.mktemp("bench") / "db"
    run(
        "-m",
        "attncache",
        "build",
        "--model",
        tiny_hf("llama"),
        "--data",
        "sst2[0:24]",
        "--out",
        db,
        "--quiet",
        "--compression",
        "float16",
    )
    return db


def test_speed_accuracy(tiny_db, tmp_path):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(
        run(
            "-m",
            "attncache",
            "eval",
            "--db",
            tiny_db,
            "--data",
            "sst2[24:34]",
            "--sweep",
            "--json",
            "--quiet",
        ).stdout
    )
    out = tmp_path / "out.json"
    run(
        "benchmarks/speed_accuracy.py",
        "--db",
        tiny_db,
        "--data",
        "sst2[24:30]",
        "--sweep",
        sweep,
        "--out",
        out,
        "--hit-rates",
        "0.5",
        "--limit",
        "4",
        "--plot",
        tmp_path / "p.png",
    )
    rows = json.loads(out.read_text())["rows"]
    assert (
        rows
        and all(r["workload_speedup_vs_sdpa"] > 0 for r in rows)
        and (tmp_path / "p.png").exists()
    )


def test_retrieval_features_and_template_ranking(tiny_db, tmp_path):
    out = tmp_path / "rf.json"
    run(
        "benchmarks/retrieval_features.py",
        "--db",
        tiny_db,
        "--build",
        "sst2[0:24]",
        "--data",
        "sst2[24:30]",
        "--limit",
        "4",
        "--out",
        out,
    )
    res = json.loads(out.read_text())
    assert (
        res["n"] >= 1
        and res["median_tv"]["oracle (closest maps)"] <= res["median_tv"]["random compatible entry"]
    )
    out = tmp_path / "tr.json"
    run(
        "benchmarks/template_ranking.py",
        "--db",
        tiny_db,
        "--rank",
        "sst2[24:32]",
        "--test",
        "sst2[32:40]",
        "--ks",
        "2,4",
        "--out",
        out,
    )
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * 2 and all(0 <= r["agreement"] <= 1 for r in rows)


def test_length_scaling(tiny_hf, tmp_path):
    out = tmp_path / "len.json"
    run(
        "benchmarks/length_scaling.py",
        "--model",
        tiny_hf("llama"),
        "--lengths",
        "16,32",
        "--per-length",
        "2",
        "--repeats",
        "1",
        "--out",
        out,
    )
    rows = json.loads(out.read_text())
    assert [r["target_tokens"] for r in rows] == [16, 32] and all(
        r["hit_rate"] == 1.0 for r in rows
    )


def test_store_scale(tmp_path):
    out = tmp_path / "scale.json"
    run(
        "benchmarks/store_scale.py",
        "--sizes",
        "20,40",
        "--chunk",
        "20",
        "--queries",
        "10",
        "--fetches",
        "5",
        "--stream",
        "50",
        "--distinct",
        "20",
        "--cap-entries",
        "5",
        "--length",
        "16",
        "--out",
        out,
    )
    assert json.loads(out.read_text())


def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    run(
        "benchmarks/gpu_check.py",
        "--shape",
        "tiny",
        "--lengths",
        "16",
        "--repeats",
        "1",
        "--dtype",
        "float32",
        "--out",
        out,
    )
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["tokens"] == 16 and rows[0]["bound_e2e_speedup"] > 0


def test_load_test(tiny_db, tmp_path):
    out = tmp_path / "load.json"
    run(
        "benchmarks/load_test.py",
        "--db",
        tiny_db,
        "--data",
        "sst2[24:30]",
        "--requests",
        "6",
        "--concurrency",
        "2",
        "--out",
        out,
    )
    res = json.loads(out.read_text())
    assert res["state"].startswith("each variant on a fresh copy")
    for name in ("detached", "attached"):
        assert res[name]["ok"] == res[name]["requests"] > 0
    # the variants ran on copies: the DB given keeps no memo either wrote
    assert "memo" not in json.loads((Path(tiny_db) / "manifest.json").read_text())["names"]


def test_summarize_runs_on_what_exists(tmp_path):
    (tmp_path / "sst2_eval.json").write_text(
        json.dumps(
            {
                "results": [
                    {
                        "policy": "all",
                        "n": 3,
                        "accuracy_baseline": 0.5,
                        "accuracy_cached": 0.5,
                        "agreement": 1.0,
                        "hit_rate": 1.0,
                        "reuse_fraction": 1.0,
                        "threshold": 0.1,
                    }
                ]
            }
        )
    )
    r = run("benchmarks/summarize.py", tmp_path)
    assert "| all |" in r.stdout


def test_soak_short(tiny_db, tmp_path):
    """The soak, short: two SIGKILLs and a clean stop under 4 clients; its own checks (no 500,
    well-formed, exact answers, DB verifies, committed entries kept, prefix folder loads) hold."""
    out = tmp_path / "soak.json"
    run("benchmarks/soak.py", "--db", tiny_db, "--seconds", "9", "--out", out)
    res = json.loads(out.read_text())
    assert res["ok"] and res["problems"] == [], res["problems"]
    assert res["restarts_survived"] == 2 and res["requests_served"] > 20
    assert res["max_abs_diff_vs_exact"] <= 1e-4
    assert not any(code.startswith("5") for code in res["status_codes"])


def test_lm_eval_speed(tiny_hf, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "lm_eval.json"
    run(
        "benchmarks/lm_eval_speed.py",
        "--model",
        tiny_hf("llama"),
        "--shots",
        "1",
        "--limit",
        "3",
        "--hf-batch-sizes",
        "2,4",
        "--repeats",
        "1",
        "--prefix-token-id",
        "97",
        "--out",
        out,
    )
    res = json.loads(out.read_text())
    assert res["hf_best"] in ("hf b2", "hf b4") and res["speedup_vs_hf_best"] > 0
    assert res["agreement_requests"] == 1.0 and res["metrics_identical"]


def test_attention_parts(tmp_path):
    """The masked call and the merged parts agree (float32 to 1e-5) on a small row."""
    out = tmp_path / "parts.json"
    run(
        "benchmarks/attention_parts.py",
        "--past",
        20,
        "--blocks",
        "5,7",
        "--repeats",
        1,
        "--out",
        out,
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert rows[0]["max_abs_diff"] < 1e-5 and all(r["in_parts_ms"] > 0 for r in rows)


def bench(script: str, tmp_path, flags: str) -> dict:
    """``benchmarks/SCRIPT.py FLAGS --out X`` (flags split on spaces), and the JSON it wrote."""
    out = tmp_path / f"{script}.json"
    run(f"benchmarks/{script}.py", *flags.split(), "--out", out)
    return json.loads(out.read_text())


def test_cheap_pass(tiny_hf, tmp_path):
    """Both cheap shapes timed beside plain SDPA and the exact tiers, each with its gate."""
    res = bench(
        "cheap_pass",
        tmp_path,
        f"--model {tiny_hf('llama')} --calibrate sst2[0:60] --data sst2[60:72] "
        "--dtype bfloat16,bfloat16-linears --batch-sizes 4 --passes 1",
    )
    shapes = ["verified:bfloat16", "verified:bfloat16-linears"]
    assert set(res["seconds"]) == {"sdpa", "exact", *shapes}
    assert res["agreement"]["exact"] == 1.0 and res["speedup_vs_best_sdpa"]["sdpa"] == 1.0
    assert set(res["gates"]) == {"bfloat16", "bfloat16-linears"}
    assert all(0.0 <= res["fallback_share"][v] <= 1.0 for v in shapes)


def test_peers(tiny_hf, tmp_path):
    """The peers installed here answer as plain SDPA does; a missing one is skipped, said."""
    pytest.importorskip("lm_eval")
    res = bench(
        "peers",
        tmp_path,
        f"--model {tiny_hf('llama')} --data sst2[60:72] --calibrate sst2[0:60] --batch-sizes 4 "
        "--repeats 1 --engines hf,lmeval-hf,attncache,attncache-verified",
    )
    engines = {e["engine"]: e for e in res["engines"]}
    exact = ["hf fp32 sdpa", "lm-eval 0.4.13 hf backend", "attncache exact tiers"]
    assert all(engines[e]["agreement"] == 1.0 and engines[e]["seconds"] > 0 for e in exact)
    verified = [e for name, e in engines.items() if "verified" in name]
    assert len(verified) == 1 and 0.0 <= verified[0]["fallback_share"] <= 1.0


def test_plain_path_and_its_table(tiny_hf, tmp_path):
    flags = f"--model {tiny_hf('llama')} --data sst2[0:8] --batch-sizes 4 --repeats 1"
    best = bench("plain_path", tmp_path, flags)["best"]
    assert best["fp32"]["agreement"] == 1.0 and best["fp32"]["speedup_vs_fp32_best"] == 1.0
    assert {"fp32-unsorted", "bf16", "sdpa-math", "matmul-medium"} <= set(best)
    (tmp_path / "plain_path.json").rename(tmp_path / "plain_path_sst2.json")  # summarize's name
    table = run("benchmarks/summarize_tiers.py", tmp_path).stdout
    assert "The plain path (sst2[0:8], 8 rows" in table and "| fp32 | 4 |" in table


def test_half_products(tmp_path):
    res = bench("half_products", tmp_path, "--lengths 16,32 --repeats 2")
    assert [r["tokens"] for r in res["rows"]] == [16, 32]
    assert all(r[k] > 0 for r in res["rows"] for k in ("fp16_us", "fp32_us", "bf16_us"))
    assert res["product_dtype"].startswith("torch.")


def test_batch_scale_rss(tmp_path):
    """The Ray job on synthetic rows in a fresh driver: every row written, peak RSS reported."""
    pytest.importorskip("ray")
    run_rss = tmp_path / "rss.json"
    run("benchmarks/batch_scale.py", "rss", "--rows", 100, "--out", run_rss)
    job = json.loads(run_rss.read_text())["rss"]["100"]
    assert job["rows"] == 100 and job["driver_peak_rss_mib"] > 0 and job["parts_written"] > 0


def test_cheap_copy_memory(tiny_hf, tmp_path):
    rows = bench("cheap_copy_memory", tmp_path, f"--model {tiny_hf('llama')}")["rows"]
    assert [r["precision"] for r in rows] == ["bfloat16", "bfloat16-linears"]
    assert all(0 < r["copy_mib"] < r["model_mib"] for r in rows)
