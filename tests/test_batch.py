"""The Ray Data batch job: its parts hold what one process computes, row for row; rows of one
prompt meet in one actor; it resumes, survives a killed actor and commits once at the end."""

import json

import numpy as np
import pytest

pytest.importorskip("ray")

from attncache import data as data_mod  # noqa: E402
from attncache.batch import BatchOptions, predict_rows, run_batch  # noqa: E402
from attncache.batch.reading import ReadSpec, read_file  # noqa: E402
from attncache.errors import UserError  # noqa: E402
from attncache.tasks import RunOptions, Tiers  # noqa: E402
from attncache.workflows import BuildOptions, Session, build  # noqa: E402


def part_rows(part) -> list[dict]:
    """The rows of one part file."""
    import pyarrow.parquet as pq

    if part.suffix == ".jsonl":
        return [json.loads(line) for line in part.read_text().splitlines()]
    return pq.read_table(part).to_pylist()


def read_parts(folder) -> list[dict]:
    """Every row of a job's folder, in input order (file, then row)."""
    rows = [r for part in sorted(folder.glob("part-*")) for r in part_rows(part)]
    return sorted(rows, key=lambda r: (r["file"], r["idx"]))


def few_shot_rows(tmp_path, questions: int = 12, name: str = "rows.jsonl"):
    """Two few-shot prompts, their questions interleaved (as a user's file might hold them)."""
    headers = [
        "".join(f"Q: is {n} even?\nA: {'yes' if n % 2 == 0 else 'no'}\n\n" for n in range(k, k + 6))
        for k in (1, 20)
    ]
    rows = [
        {"prompt": f"{headers[q % 2]}Q: is {q + 40} even?\nA:", "choices": [" no", " yes"]}
        for q in range(2 * questions)
    ]
    data = tmp_path / name
    data.write_text("".join(json.dumps({**r, "answer": 0}) + "\n" for r in rows))
    return data


def one_process(model: str, data, batch_size: int):
    """The same rows through the exact tiers in this process: (columns, reused fraction)."""
    s = Session.open(None, model)
    prefix = s.prefix_tier(2 << 30)
    rows = data_mod.load(str(data)).rows
    opts = RunOptions(batch_size, False)
    want = predict_rows(s, rows, list(range(len(rows))), Tiers(prefix=prefix), opts)
    return want, prefix.report()["prefix_tokens_reused_fraction"]


@pytest.mark.real
@pytest.mark.ray
def test_ray_batch_equals_single_process(tmp_path):
    db = tmp_path / "db"
    build("minilm-l6", "sst2[0:40]", str(db), BuildOptions(progress=False))
    out = tmp_path / "out"
    options = BatchOptions(actors=2, batch_size=8, progress=False, policy="all")
    res = run_batch(str(db), "sst2[30:54]", str(out), options=options)
    got = read_parts(out)
    assert res["rows"] == 24 and [r["idx"] for r in got] == list(range(24))
    s = Session.open(str(db))
    rows = data_mod.load("sst2[30:54]", encoder=True).rows
    with s.cache.attach(s.model, "all") as att:
        want = predict_rows(s, rows, list(range(24)), Tiers(attached=att), RunOptions(8, False))
    assert (
        [r["cache_hit"] for r in got] == want["cache_hit"]
        and any(want["cache_hit"])
        and not all(want["cache_hit"])
    )
    emb = np.array([r["embedding"] for r in got])
    assert np.abs(emb - np.array(want["embedding"])).max() < 1e-4
    one = BatchOptions(actors=1, batch_size=4, progress=False)
    pq = run_batch(str(db), "sst2[30:34]", str(tmp_path / "out.parquet"), options=one)
    assert pq["rows"] == 4 and len(read_parts(tmp_path / "out.parquet")) == 4
    assert all(p.suffix == ".parquet" for p in (tmp_path / "out.parquet").glob("part-*"))


def test_batch_argument_errors(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="does not exist"):
        run_batch(str(tmp_path / "nope"), "sst2", str(tmp_path / "out"))
    with pytest.raises(UserError, match="--format must be jsonl or parquet"):
        run_batch(None, "sst2", str(tmp_path / "out"), "x", BatchOptions(fmt="csv"))
    with pytest.raises(UserError, match="--columns: expected FIELD=COLUMN"):
        run_batch(None, "sst2", str(tmp_path / "out"), "x", BatchOptions(columns="question"))


def test_cuda_asks_for_one_gpu_per_actor_and_refuses_a_cluster_without_one():
    from attncache.batch.job import _actors

    class Cluster:
        def __init__(self, gpus):
            self.gpus = gpus

        def cluster_resources(self):
            return {"CPU": 8.0, **({"GPU": float(self.gpus)} if self.gpus else {})}

    assert _actors(Cluster(3), BatchOptions(device="cuda")) == 3  # one actor per GPU
    assert _actors(Cluster(3), BatchOptions(device="cuda", actors=1)) == 1
    assert _actors(Cluster(0), BatchOptions(device="cpu")) == 2
    assert _actors(Cluster(2), BatchOptions(device="auto")) == 2  # auto: the cluster's GPUs
    with pytest.raises(UserError, match="has no GPU"):
        _actors(Cluster(0), BatchOptions(device="cuda"))


def test_the_cli_refuses_what_batch_cannot_do(tmp_path):
    from test_cli import cli

    args = ["batch", "--model", "x", "--data", "sst2", "--out", str(tmp_path / "o")]
    r = cli(*args, "--no-memo", ok=False)
    assert r.returncode == 2 and "without a map DB" in r.stderr
    r = cli(*args, "--strict", ok=False)
    assert r.returncode == 2 and "gets an error column" in r.stderr


def test_files_stream_as_rows_with_their_positions_and_errors(tmp_path):
    """The readers, without Ray: JSONL, CSV and Parquet with a column mapping; a malformed line
    and an invalid record become rows with an ``error``, at their own positions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(
        '{"question": "Q?", "options": [" a", " b"], "label": 1}\n{not json\n'
        '{"question": "Q2?", "options": [" a"], "label": 0}\n'
    )
    (tmp_path / "b.csv").write_text('question,options,label\nQ3?,"["" a"", "" b""]",0\n')
    table = pa.Table.from_pylist([{"question": "Q4?", "options": [" a", " b"], "label": 1}])
    pq.write_table(table, tmp_path / "c.parquet")
    columns = {"prompt": "question", "choices": "options", "answer": "label"}
    spec = ReadSpec(columns, parts=8, done=frozenset(), limit=None)
    files = [str(tmp_path / n) for n in ("a.jsonl", "b.csv", "c.parquet")]
    rows = [
        dict(zip(chunk, values, strict=True))
        for chunk in read_file({"file": [0, 1, 2], "path": files}, spec)
        for values in zip(*chunk.values(), strict=True)
    ]
    assert [(r["file"], r["idx"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]
    assert [bool(r["error"]) for r in rows] == [False, True, True, False, False]
    assert "not valid JSON" in rows[1]["error"] and "at least 2" in rows[2]["error"]
    assert json.loads(rows[3]["row"])["choices"] == [" a", " b"]
    assert all(0 <= r["bucket"] < 8 for r in rows)
    limited = ReadSpec(columns, parts=8, done=frozenset(), limit=1)
    assert sum(len(c["idx"]) for c in read_file({"file": [0], "path": files[:1]}, limited)) == 1


@pytest.mark.ray
def test_a_row_that_cannot_run_gets_an_error_not_a_failed_job(tiny_hf, tmp_path):
    """A row the planner skips (too long) or cannot parse gets its own ``error``; every other row
    is answered as in one process, at its own position."""
    rows = [
        {"prompt": "Question: is it even?\nAnswer:", "choices": [" no", " yes"], "answer": 1},
        {"prompt": "x" * 600, "choices": [" no", " yes"], "answer": 0},  # over 512 positions
        {"prompt": "Question: is it odd?\nAnswer:", "choices": [" no", " yes"], "answer": 0},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    out = tmp_path / "out"
    options = BatchOptions(actors=1, batch_size=2, progress=False)
    res = run_batch(None, str(data), str(out), model_name=tiny_hf("llama"), options=options)
    got = read_parts(out)
    assert [r["idx"] for r in got] == [0, 1, 2, 3] and res["errors"] == 2
    assert "longer than the model" in got[1]["error"] and got[1]["prediction"] == -1
    assert "not valid JSON" in got[3]["error"]
    assert got[0]["error"] == got[2]["error"] == "" and len(got[0]["scores"]) == 2
    assert res["errors_summary"].startswith("2 of 4 rows not run; first: file 0 row")
    s = Session.open(None, tiny_hf("llama"))
    want = predict_rows(s, data_mod.load(str(data)).rows, [0, 1, 2], None, RunOptions(2, False))
    assert np.allclose(got[0]["scores"], want["scores"][0], atol=1e-5)
    assert want["error"][1] == got[1]["error"]


@pytest.mark.ray
def test_rows_sharing_a_prompt_meet_in_one_actor_and_reuse_as_in_one_process(tiny_hf, tmp_path):
    """Interleaved questions of two few-shot prompts, 2 actors: the job reuses within 5 % of the
    prefix tokens one process reuses on the same rows, and answers identically."""
    data = few_shot_rows(tmp_path)
    out = tmp_path / "out"
    options = BatchOptions(actors=2, batch_size=4, progress=False)
    res = run_batch(None, str(data), str(out), model_name=tiny_hf("llama"), options=options)
    got = read_parts(out)
    want, single = one_process(tiny_hf("llama"), data, 4)
    assert [r["idx"] for r in got] == list(range(24))
    assert [r["prediction"] for r in got] == want["prediction"]
    assert np.allclose([r["scores"] for r in got], want["scores"], atol=1e-4)
    assert single > 0.5 and abs(res["prefix_tokens_reused_fraction"] - single) < 0.05
    # the reason, beyond what two prompts can show in a reuse fraction (each actor keeps its tree
    # across parts): all of a prompt's rows are in one part, and a part goes to one actor
    for header in (0, 1):  # the rows alternate between the two prompts
        holding = [
            p for p in out.glob("part-*") if any(r["idx"] % 2 == header for r in part_rows(p))
        ]
        assert len(holding) == 1, header


@pytest.mark.ray
def test_a_rerun_resumes_and_writes_each_row_once(tiny_hf, tmp_path, monkeypatch):
    """An actor killed (SIGKILL) mid-part is restarted and its part retried; a job whose parts
    were partly lost (a killed driver) reruns only those; another job's folder is refused."""
    from attncache.batch.worker import FAULT_ENV

    data = few_shot_rows(tmp_path, questions=6)
    out = tmp_path / "out"
    options = BatchOptions(actors=2, batch_size=4, progress=False, parts=4)
    monkeypatch.setenv(FAULT_ENV, f"kill-once:{tmp_path / 'killed'}")
    first = run_batch(None, str(data), str(out), model_name=tiny_hf("llama"), options=options)
    assert (tmp_path / "killed").exists()  # an actor did die mid-part
    rows = read_parts(out)
    assert [r["idx"] for r in rows] == list(range(12)) and first["rows"] == 12
    parts = sorted(out.glob("part-*.jsonl"))
    lost = parts[0]
    kept = {p.name: p.read_text() for p in parts}
    lost.unlink()
    (out / f".{lost.name}.99.tmp").write_text("half a part")
    again = run_batch(None, str(data), str(out), model_name=tiny_hf("llama"), options=options)
    assert again["parts_skipped"] == len(parts) - 1 and again["parts_written"] == 1
    assert {p.name: p.read_text() for p in out.glob("part-*.jsonl")} == kept
    assert not list(out.glob(".*.tmp"))
    other = BatchOptions(actors=2, batch_size=4, progress=False, parts=8)
    with pytest.raises(UserError, match="another job's parts .*parts"):
        run_batch(None, str(data), str(out), model_name=tiny_hf("llama"), options=other)


@pytest.mark.ray
def test_a_rerun_of_data_read_on_the_driver_writes_only_the_lost_parts(tiny_hf, tmp_path):
    """A built-in or sliced DATA is read on the driver, not by tasks: its rerun skips the
    written parts too, leaving them as they were."""
    data = f"{few_shot_rows(tmp_path, questions=6)}[0:12]"
    out = tmp_path / "out"
    options = BatchOptions(actors=2, batch_size=4, progress=False, parts=4)
    first = run_batch(None, data, str(out), model_name=tiny_hf("llama"), options=options)
    parts = sorted(out.glob("part-*.jsonl"))
    kept = {p.name: p.read_text() for p in parts}
    assert first["rows"] == 12 and [r["idx"] for r in read_parts(out)] == list(range(12))
    parts[0].unlink()
    again = run_batch(None, data, str(out), model_name=tiny_hf("llama"), options=options)
    assert again["parts_skipped"] == len(parts) - 1 and again["parts_written"] == 1
    assert {p.name: p.read_text() for p in out.glob("part-*.jsonl")} == kept


@pytest.mark.ray
def test_new_memo_answers_are_committed_once_when_the_job_ends(tiny_hf, tmp_path):
    """Workers never commit: the driver commits every new answer once, after the last part; a
    rerun into a new folder finds them all (nothing new to commit) and answers the same."""
    from attncache.cache import AttnCache
    from attncache.tiers.memo import ResultMemo

    db = tmp_path / "db"
    build(tiny_hf("llama"), "sst2[0:12]", str(db), BuildOptions(progress=False))
    data = few_shot_rows(tmp_path, questions=4)
    options = BatchOptions(actors=2, batch_size=4, progress=False)
    first = run_batch(str(db), str(data), str(tmp_path / "a"), options=options)
    held = len(ResultMemo.load(AttnCache.open(str(db)).db))
    assert first["committed"] and first["memo_answers_committed"] == held >= 8
    again = run_batch(str(db), str(data), str(tmp_path / "b"), options=options)
    assert again["memo_answers_committed"] == 0
    assert read_parts(tmp_path / "a") == read_parts(tmp_path / "b")


@pytest.mark.real
@pytest.mark.ray
def test_batch_takes_the_default_model_by_name(tmp_path):
    """The README's line with the default model: on 9cecc0c ``--model smollm2-135m`` crashed before
    Ray started (the config was read from the GGUF package folder)."""
    from test_cli import cli

    out = tmp_path / "out"
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
    got = read_parts(out)
    assert res["rows"] == 4 and res["errors"] == 0 and [g["idx"] for g in got] == [0, 1, 2, 3]
    assert all(g["prediction"] >= 0 for g in got)


@pytest.mark.ray
def test_a_job_on_a_two_node_cluster_equals_one_process(tiny_hf, tmp_path):
    """``ray start --head`` plus a worker node on this machine (two raylets), the job connected
    with ``address``: every row answered as in one process; Ray places the actors on the nodes'
    CPUs, and the parts are written to a folder every node sees."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    ray_cli = str(Path(sys.executable).with_name("ray"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp}"]
    node = [ray_cli, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2"]
    try:
        for cmd in (head + ["--include-dashboard=false"], node):
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
        data = few_shot_rows(tmp_path, questions=4)
        options = BatchOptions(address=f"127.0.0.1:{port}", actors=2, batch_size=4, progress=False)
        res = run_batch(None, str(data), str(tmp_path / "out"), tiny_hf("llama"), options)
    finally:
        subprocess.run(["pkill", "-9", "-f", temp], check=False)  # this cluster's processes only
    got = read_parts(tmp_path / "out")
    want, _ = one_process(tiny_hf("llama"), data, 4)
    assert res["rows"] == 8 and [r["idx"] for r in got] == list(range(8))
    assert [r["prediction"] for r in got] == want["prediction"]
    assert np.allclose([r["scores"] for r in got], want["scores"], atol=1e-4)
