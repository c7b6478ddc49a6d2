"""The lm-eval backend against lm-eval's own HF backend on a tiny model: the same per-request
log-likelihoods (1e-4) and is_greedy, for shared few-shot contexts, multi-token continuations,
one-token continuations and rolling windows, with the prefix tier doing the reuse."""

import math
import re

import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from attncache.integrations.lm_eval import AttnCacheLM  # noqa: E402

SHOTS = "".join(f"Q: what is {a} plus {b}?\nA: {a + b}\n\n" for a, b in [(1, 2), (3, 4), (2, 2)])
QUESTIONS = [f"{SHOTS}Q: what is {a} plus {b}?\nA:" for a, b in [(5, 1), (2, 7), (4, 4)]]
CHOICES = [" 6", " 9", " 8", " seven", " a number"]


def requests(kind, args):
    return [Instance(kind, {}, a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def backends(tiny_hf):
    folder = tiny_hf("llama")
    # the tiny character tokenizer has no BOS/EOS: both backends condition empty contexts on "\n"
    ours = AttnCacheLM(pretrained=folder, batch_size=4, prefix_token_id=97)
    theirs = HFLM(
        pretrained=folder, batch_size=4, device="cpu", dtype="float32", prefix_token_id=97
    )
    return ours, theirs


def test_loglikelihoods_equal_the_hf_backend(backends):
    ours, theirs = backends
    args = [(q, c) for q in QUESTIONS for c in CHOICES] + [("", " hello"), ("A: ", "6")]
    got = ours.loglikelihood(requests("loglikelihood", args))
    want = theirs.loglikelihood(requests("loglikelihood", args))
    assert len(got) == len(want) == len(args)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, want, strict=True):
        assert abs(lp - lp_ref) < 1e-4 and greedy == greedy_ref
    assert ours.prefix.stats.tokens_reused > 0  # the shared few-shot header was computed once


def test_lm_evals_use_cache_keeps_our_answers(tiny_hf, tmp_path, monkeypatch):
    """``lm-eval --use_cache`` wraps the backend in ``CachingLM``, which keeps what the
    backend hands its cache hook: a second run on the same cache file answers every request
    from it, without a forward."""
    from lm_eval.api.model import CachingLM

    folder = tiny_hf("llama")
    args = [(q, c) for q in QUESTIONS for c in CHOICES[:2]]
    path = str(tmp_path / "cache.db")
    first = CachingLM(AttnCacheLM(pretrained=folder, batch_size=4, prefix_token_id=97), path)
    got = first.loglikelihood(requests("loglikelihood", args))
    again_lm = AttnCacheLM(pretrained=folder, batch_size=4, prefix_token_id=97)

    def no_forward(*_a, **_k):
        raise AssertionError("a cached request reached the model")

    monkeypatch.setattr(again_lm, "_loglikelihood_tokens", no_forward)
    again = CachingLM(again_lm, path).loglikelihood(requests("loglikelihood", args))
    assert [tuple(x) for x in again] == [tuple(x) for x in got]


def greedy_requests(hf: HFLM) -> list:
    """Token-level requests whose continuations are (and are not) the model's own greedy tokens:
    the tiny model's random weights rarely make a text continuation greedy. Their is_greedy is
    True, False (the last token is not the argmax), False (the first), True."""
    import torch

    context = hf.tok_encode(QUESTIONS[0])
    ids = list(context)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(hf.model(torch.tensor([ids])).logits[0, -1].argmax()))
    own = ids[len(context) :]
    other = [(t + 1) % 90 + 2 for t in own]  # never the argmax where ``own`` is
    conts = [own, own[:2] + other[2:], other[:1] + own[1:], own[:1]]
    return [(None, context, c) for c in conts]


def test_is_greedy_needs_every_continuation_token_to_be_the_argmax(backends):
    """A continuation the model would generate itself is greedy; one whose last token (or first)
    is not its argmax is not, as the HF backend says."""
    ours, theirs = backends
    reqs = greedy_requests(theirs)
    got = ours._loglikelihood_tokens(reqs)
    want = theirs._loglikelihood_tokens(reqs)
    assert [g for _, g in want] == [True, False, False, True]
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, want, strict=True):
        assert abs(lp - lp_ref) < 1e-4 and greedy == greedy_ref


def test_requests_longer_than_the_model_are_truncated_as_the_hf_backend_does(backends):
    """Past ``max_length`` both keep the context's last tokens: the same log-likelihoods."""
    ours, theirs = backends
    assert ours.max_length == theirs.max_length
    long = "filler words " * (ours.max_length // 10)  # > max_length characters, one token each
    args = [(long + QUESTIONS[0], c) for c in CHOICES] + [(long, " x" * 40)]
    got = ours.loglikelihood(requests("loglikelihood", args))
    want = theirs.loglikelihood(requests("loglikelihood", args))
    assert len(ours.tok_encode(long + QUESTIONS[0])) > ours.max_length
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, want, strict=True):
        assert abs(lp - lp_ref) < 1e-4 and greedy == greedy_ref


def test_rolling_loglikelihoods_equal_the_hf_backend(backends):
    ours, theirs = backends
    text = [(SHOTS * 3,), ("a short line",), (SHOTS * 12,)]  # the last: several windows
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", text))
    want = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", text))
    assert got == pytest.approx(want, abs=1e-3)


def test_generate_until_runs_the_plain_model(backends):
    ours, theirs = backends
    for b in backends:  # generation stops at EOS: give the tiny tokenizer one
        b.tokenizer.eos_token = "\n"
    args = [(QUESTIONS[0], {"until": ["\n"], "max_gen_toks": 4, "do_sample": False})]
    assert ours.generate_until(requests("generate_until", args)) == theirs.generate_until(
        requests("generate_until", args)
    )


def per_sample(results: dict, task: str) -> dict[int, dict]:
    return {s["doc_id"]: s for s in results["samples"][task]}


@pytest.mark.real
@pytest.mark.parametrize("sampler", ["first_n", None])
def test_smollm2_on_a_local_arc_task_equals_the_hf_backend(tmp_path, monkeypatch, sampler):
    """SmolLM2 on ARC-Easy 5-shot as lm-eval renders it (a local JSON task, offline), shots from
    ``first_n`` (one prompt for every question) and from lm-eval's default per-document sampler:
    every per-sample log-likelihood within float32 rounding of ``--model hf``'s (1e-4 plus 1e-5 of
    its size: the two run different matmul shapes, and a sum of 20-40 nats differed by up to
    2.1e-4 on an AVX2-only CPU, 3e-5 on an AVX-512 one), is_greedy and every metric identical."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from attncache import models
    from attncache.integrations.lm_eval_tasks import TaskOptions, write_task

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (task,) = write_task("arc_easy", tmp_path / "tasks", TaskOptions(5, 8, sampler))
    kw = {
        "tasks": [task],
        "log_samples": True,
        "task_manager": TaskManager(include_path=str(tmp_path / "tasks")),
    }
    ours = simple_evaluate(model=AttnCacheLM(pretrained="smollm2-135m", batch_size=8), **kw)
    hf = simple_evaluate(
        model="hf",
        model_args=f"pretrained={models.hf_folder('smollm2-135m')},dtype=float32",
        device="cpu",
        batch_size=8,
        **kw,
    )
    a, b = per_sample(ours, task), per_sample(hf, task)
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:
        for x, y in zip(a[k]["resps"], b[k]["resps"], strict=True):
            got, want = float(x[0][0]), float(y[0][0])
            assert abs(got - want) <= 1e-4 + 1e-5 * abs(want) and x[0][1] == y[0][1]
        assert a[k]["acc"] == b[k]["acc"] and a[k]["acc_norm"] == b[k]["acc_norm"]
    assert ours["results"][task] == hf["results"][task]


def test_the_cli_registers_the_backend_and_hands_on_every_argument(tiny_hf, tmp_path):
    """``attncache lm-eval ...`` is lm-eval's own CLI with ``--model attncache`` registered (lm-eval
    0.4.13 loads no plugins), offline on a local task."""
    import json
    import os
    import subprocess
    import sys

    from attncache.integrations.lm_eval_tasks import TaskOptions, write_task

    (task,) = write_task("arc_easy", tmp_path / "tasks", TaskOptions(shots=1, limit=3, pool=2))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    args = [
        "run",
        "--model",
        "attncache",
        "--model_args",
        f"pretrained={tiny_hf('llama')},prefix_token_id=97",
        "--include_path",
        str(tmp_path / "tasks"),
        "--tasks",
        task,
        "--batch_size",
        "4",
        "--output_path",
        str(tmp_path / "out"),
    ]
    r = subprocess.run(
        [sys.executable, "-m", "attncache", "lm-eval", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = next((tmp_path / "out").rglob("results_*.json"))
    assert set(json.loads(out.read_text())["results"][task]) >= {"acc,none", "acc_norm,none"}


def test_dtype_auto_is_the_checkpoints_own_as_the_hf_backend_loads_it(tiny_hf, tmp_path):
    """Without ``dtype``, both backends run a bfloat16 checkpoint in bfloat16 (HFLM's ``auto``);
    before 2026-12-07 ours ran it in float32. In bfloat16 the HF backend rounds each token's
    log-probability and their sum to bfloat16, ours sums them in float32: the two agree to one
    bfloat16 step of the sum."""
    import json
    import shutil

    import torch

    folder = tmp_path / "bf16"
    shutil.copytree(tiny_hf("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    ours = AttnCacheLM(pretrained=str(folder), batch_size=4, prefix_token_id=97)
    theirs = HFLM(pretrained=str(folder), batch_size=4, device="cpu", prefix_token_id=97)
    assert next(ours.model.parameters()).dtype == torch.bfloat16
    assert next(theirs.model.parameters()).dtype == torch.bfloat16
    args = [(q, c) for q in QUESTIONS for c in CHOICES]
    got = ours.loglikelihood(requests("loglikelihood", args))
    want = theirs.loglikelihood(requests("loglikelihood", args))
    for (lp, _), (lp_ref, _) in zip(got, want, strict=True):
        step = 2.0 ** (math.floor(math.log2(abs(lp_ref))) - 7)  # bfloat16's at |lp_ref|
        assert abs(lp - lp_ref) <= step, (lp, lp_ref)


def test_prompts_and_answers_are_kept_across_runs(tiny_hf, backends, tmp_path):
    """``prefix_dir=``: a later run restores the kept few-shot K/V (its first call reuses them) and,
    with ``memo`` (the default), answers the same requests without a forward; every answer,
    is_greedy included, still equals the HF backend's."""
    _, theirs = backends
    args = [(q, c) for q in QUESTIONS for c in CHOICES]
    want = theirs.loglikelihood(requests("loglikelihood", args))

    def same(got, want=want):
        assert [g for _, g in got] == [g for _, g in want]
        return [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)

    kw = {"pretrained": tiny_hf("llama"), "batch_size": 4, "prefix_token_id": 97}
    tokens = greedy_requests(theirs)  # is_greedy True for some: kept and read back as such
    greedy = theirs._loglikelihood_tokens(tokens)
    first = AttnCacheLM(**kw, prefix_dir=str(tmp_path / "kept"))
    assert same(first.loglikelihood(requests("loglikelihood", args)))
    assert same(first._loglikelihood_tokens(tokens), greedy)
    assert first.memo is not None and len(first.memo) > 0

    again = AttnCacheLM(**kw, prefix_dir=str(tmp_path / "kept"))
    assert same(again.loglikelihood(requests("loglikelihood", args)))
    assert same(again._loglikelihood_tokens(tokens), greedy)
    st = again.memo.stats  # every planned sequence (one per distinct context + continuation)
    assert st.hits == st.lookups > 0 and st.inserts == 0

    no_memo = AttnCacheLM(**kw, prefix_dir=str(tmp_path / "kept"), memo="false")
    assert no_memo.memo is None
    assert same(no_memo.loglikelihood(requests("loglikelihood", args)))
    assert no_memo.prefix.stats.tokens_reused >= len(SHOTS)  # the header came from the folder


def test_a_prompt_whose_requests_fit_one_batch_is_kept_too(tiny_hf, tmp_path):
    """``prefix_dir=`` keeps every prompt the run shared, not only those whose requests spanned
    batches: one question's two continuations in one batch, and the next run reads the whole
    context but the position each continuation needs from the folder, for both."""
    kw = {"pretrained": tiny_hf("llama"), "batch_size": 4, "prefix_token_id": 97, "memo": "false"}
    args = [(QUESTIONS[0], " seven"), (QUESTIONS[0], " a number")]  # several tokens each
    AttnCacheLM(**kw, prefix_dir=str(tmp_path / "kept")).loglikelihood(
        requests("loglikelihood", args)
    )
    again = AttnCacheLM(**kw, prefix_dir=str(tmp_path / "kept"))
    context = again.tok_encode(QUESTIONS[0])
    held = again.prefix.tree.match(context, len(context)).length
    assert held == len(context) - 1
    again.loglikelihood(requests("loglikelihood", args))
    assert again.prefix.stats.tokens_reused == 2 * held


@pytest.mark.parametrize(
    "extra, message",
    [
        ("memo=maybe", "memo= takes true or false, not 'maybe'"),
        ("policy=default", "policy= reuses approximate maps: it needs db="),
        ("prefix_bytes=lots", "prefix_bytes= takes a number of bytes (0 or none: off), not 'lots'"),
        ("batch_size=x", "batch_size takes a positive number or auto, not 'x'"),
        ("batch_size=0", "batch_size takes a positive number or auto, not '0'"),
        ("dtype=float7", "--dtype must be one of float32, bfloat16, float16, got 'float7'"),
    ],
)
def test_bad_model_args_are_one_clear_error(tiny_hf, extra, message):
    """Each is a ``UserError`` naming the argument (which ``attncache lm-eval`` prints as one
    line, exit status 2; see the next test), and a ``ValueError`` where it is the backend's own
    argument, for code that builds the backend itself."""
    from attncache.errors import UserError

    key, value = extra.split("=")
    with pytest.raises(UserError, match=re.escape(message)) as got:
        AttnCacheLM(pretrained=tiny_hf("llama"), **{key: value})
    assert isinstance(got.value, ValueError) == (key != "dtype")


def test_a_bad_model_arg_on_the_command_line_is_one_line_and_exit_2(tiny_hf, tmp_path):
    """Before 2026-12-07 ``attncache lm-eval run ... --model_args prefix_bytes=lots`` (or memo=,
    policy= without db=, batch_size=) ended in a Python traceback and exit status 1."""
    import os
    import subprocess
    import sys

    from attncache.integrations.lm_eval_tasks import TaskOptions, write_task

    (task,) = write_task("arc_easy", tmp_path / "tasks", TaskOptions(shots=1, limit=2, pool=2))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    model_args = f"pretrained={tiny_hf('llama')},prefix_bytes=lots"
    argv = ["lm-eval", "run", "--model", "attncache", "--model_args", model_args]
    argv += ["--include_path", str(tmp_path / "tasks"), "--tasks", task]
    r = subprocess.run(
        [sys.executable, "-m", "attncache", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert (
        last
        == "attncache: error: prefix_bytes= takes a number of bytes (0 or none: off), not 'lots'"
    )


def test_the_entry_point_names_the_backend():
    """lm-eval releases that load ``lm_eval.models`` plugins find ``attncache`` with no import."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "attncache"]
    assert ep.load() is AttnCacheLM


@pytest.mark.parametrize(
    "name,shots,sampler",
    [("mmlu", 2, "first_n"), ("hellaswag", 2, None), ("arc_challenge", 3, None)],
)
def test_local_tasks_score_as_the_hf_backend(backends, tmp_path, monkeypatch, name, shots, sampler):
    """Every local task form through lm-eval end to end on the tiny model: MMLU's one-token
    letters (first_n shots per subject), HellaSwag's long endings and ARC with the default
    per-document sampler: per-sample log-likelihoods within 1e-4, is_greedy and metrics equal."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from attncache.integrations.lm_eval_tasks import TaskOptions, write_task

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ours, theirs = backends
    tasks = write_task(name, tmp_path, TaskOptions(shots, 3, sampler, pool=6, subjects=2))
    assert len(tasks) == (2 if name == "mmlu" else 1)
    kw = {
        "tasks": tasks,
        "log_samples": True,
        "task_manager": TaskManager(include_path=str(tmp_path)),
    }
    a, b = simple_evaluate(model=ours, **kw), simple_evaluate(model=theirs, **kw)
    for task in tasks:
        mine, ref = per_sample(a, task), per_sample(b, task)
        assert mine.keys() == ref.keys() and len(mine) == 3
        for k in mine:
            for x, y in zip(mine[k]["resps"], ref[k]["resps"], strict=True):
                assert abs(float(x[0][0]) - float(y[0][0])) < 1e-4 and x[0][1] == y[0][1]
        assert a["results"][task] == b["results"][task]


def test_the_task_command_writes_a_task_lm_eval_loads(tmp_path, capsys):
    """``attncache lm-eval-task`` prints the names it wrote, and lm-eval's TaskManager finds them;
    impossible shots are one clear error."""
    from lm_eval.tasks import TaskManager

    from attncache.cli import main

    folder = tmp_path / "tasks"
    argv = ["lm-eval-task", "arc_easy", str(folder), "--shots", "2", "--limit", "3"]
    assert main(argv) == 0
    assert capsys.readouterr().out.split() == ["arc_easy_local"]
    assert "arc_easy_local" in TaskManager(include_path=str(folder)).all_tasks
    assert main(["lm-eval-task", "mmlu", str(folder), "--shots", "6"]) == 2
    assert "shots must be 0..5" in capsys.readouterr().err
    assert main(["lm-eval-task", "arc_easy", str(folder), "--shots", "9", "--pool", "4"]) == 2
    assert "pool (4) must hold at least 9" in capsys.readouterr().err
