"""The Ray Data batch job: its output equals the single-process cached run, row for row."""

import json

import numpy as np
import pytest

pytest.importorskip("ray")

from attncache import data as data_mod  # noqa: E402
from attncache.batch import predict_rows, run_batch  # noqa: E402
from attncache.errors import UserError  # noqa: E402
from attncache.workflows import Session, build  # noqa: E402


@pytest.mark.real
@pytest.mark.ray
def test_ray_batch_equals_single_process(tmp_path):
    db = tmp_path / "db"
    build("minilm-l6", "sst2[0:40]", str(db), progress=False)
    out = tmp_path / "out.jsonl"
    res = run_batch(
        str(db), "sst2[30:54]", str(out), actors=2, batch_size=8, progress=False, policy="all"
    )
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert res["rows"] == 24 and [r["idx"] for r in got] == list(range(24))
    s = Session.open(str(db))
    rows = data_mod.load("sst2[30:54]", encoder=True).rows
    with s.cache.attach(s.model, "all") as att:
        want = predict_rows(s, rows, list(range(24)), att, 8)
    assert (
        [r["cache_hit"] for r in got] == want["cache_hit"]
        and any(want["cache_hit"])
        and not all(want["cache_hit"])
    )
    emb = np.array([r["embedding"] for r in got])
    assert np.abs(emb - np.array(want["embedding"])).max() < 1e-4
    pq = run_batch(
        str(db),
        "sst2[30:34]",
        str(tmp_path / "out.parquet"),
        actors=1,
        batch_size=4,
        progress=False,
    )
    import pyarrow.parquet as papq

    assert pq["rows"] == 4 and papq.read_table(tmp_path / "out.parquet").num_rows == 4


def test_batch_argument_errors(tmp_path):
    with pytest.raises(UserError, match="must end in .jsonl or .parquet"):
        run_batch(str(tmp_path), "sst2", str(tmp_path / "out.csv"))
    with pytest.raises(UserError, match="does not exist"):
        run_batch(str(tmp_path / "nope"), "sst2", str(tmp_path / "out.jsonl"))


@pytest.mark.ray
def test_a_row_that_cannot_run_gets_an_error_not_a_failed_job(tiny_hf, tmp_path):
    """On 9cecc0c a row the planner skipped raised inside a Ray actor and failed the whole job.
    Now it is reported in its own ``error`` column and every other row is answered, in order."""
    rows = [
        {"prompt": "Question: is it even?\nAnswer:", "choices": [" no", " yes"], "answer": 1},
        {"prompt": "x" * 600, "choices": [" no", " yes"], "answer": 0},  # over 512 positions
        {"prompt": "Question: is it odd?\nAnswer:", "choices": [" no", " yes"], "answer": 0},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    res = run_batch(
        None,
        str(data),
        str(out),
        model_name=tiny_hf("llama"),
        actors=1,
        batch_size=2,
        progress=False,
    )
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["idx"] for r in got] == [0, 1, 2] and res["errors"] == 1
    assert "longer than the model" in got[1]["error"] and got[1]["prediction"] == -1
    assert got[0]["error"] == got[2]["error"] == "" and len(got[0]["scores"]) == 2
    assert res["errors_summary"].startswith("1 of 3 rows not run; first: row 1")
    # the same rows in one process: the good rows' scores are identical
    s = Session.open(None, tiny_hf("llama"))
    want = predict_rows(s, data_mod.load(str(data)).rows, [0, 1, 2], None, 2)
    assert np.allclose(got[0]["scores"], want["scores"][0], atol=1e-5)
    assert want["error"][1] == got[1]["error"]


@pytest.mark.real
@pytest.mark.ray
def test_batch_takes_the_default_model_by_name(tmp_path):
    """The README's line with the default model: on 9cecc0c ``--model smollm2-135m`` crashed before
    Ray started (the config was read from the GGUF package folder)."""
    from test_cli import cli

    out = tmp_path / "out.jsonl"
    r = cli(
        "batch",
        "--model",
        "smollm2-135m",
        "--data",
        "sst2[0:4]",
        "--out",
        str(out),
        "--actors",
        "1",
        "--batch-size",
        "4",
        "--json",
        "--quiet",
    )
    res = json.loads(r.stdout)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert res["rows"] == 4 and res["errors"] == 0 and [g["idx"] for g in got] == [0, 1, 2, 3]
    assert all(g["prediction"] >= 0 for g in got)
