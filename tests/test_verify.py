"""The cheap pass verified by margin: margins, the calibrated gate and its bound, the merged
answers, and that nothing computed in the cheap precision is kept as an exact answer."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from tiny import TinyTokenizer, tiny_model

from attncache import models as model_registry
from attncache.data import ChoiceRow, TextRow
from attncache.stats import binom_upper
from attncache.tasks import RunOptions, RunOutput, Tiers, plan_rows, predictions, run
from attncache.tasks.plan import Plan, Query, RowPlan
from attncache.tasks.precisions import cheap_copy, cheap_precision, native_speedup
from attncache.tasks.verify import (
    Precision,
    calibrate_gate,
    row_margin,
    run_verified,
    score_movement,
)
from attncache.tiers import PrefixTier
from attncache.tiers.memo import ResultMemo


def scored_plan(scores_a: list[list[float]], scores_b: list[list[float]]):
    """A plan of one-token choice rows and two outputs giving their choices these scores."""
    rows, a, b = [], RunOutput.empty(len(scores_a)), RunOutput.empty(len(scores_a))
    for s, (sa, sb) in enumerate(zip(scores_a, scores_b, strict=True)):
        queries = [[Query(s, 1, t)] for t in range(len(sa))]
        rows.append(RowPlan("choice1", [s], queries, [1.0] * len(sa)))
        for t, (x, y) in enumerate(zip(sa, sb, strict=True)):
            a.logprobs[(s, 1, t)], b.logprobs[(s, 1, t)] = x, y
    for i, r in enumerate(rows):
        r.index = i
    return Plan([[1]] * len(rows), rows, [], True), a, b


def test_margin_is_best_minus_runner_up_and_text_rows_always_rerun():
    plan, a, b = scored_plan([[-1.0, -1.5], [-3.0, -0.5]], [[-1.2, -1.4], [-3.0, -0.4]])
    assert row_margin(plan.rows[0], a) == pytest.approx(0.5)
    assert row_margin(plan.rows[1], a) == pytest.approx(2.5)
    # a's winner is choice 0: its gap to choice 1 is 0.5 in a, 0.2 in b
    assert score_movement(plan.rows[0], a, b) == pytest.approx(0.3)
    assert score_movement(plan.rows[1], a, b) == pytest.approx(0.1)  # -2.5 vs -2.6
    assert row_margin(RowPlan("text", [0]), a) == 0.0
    assert math.isinf(score_movement(RowPlan("text", [0]), a, b))
    # with more choices the margin is to the runner-up, not to the last
    plan, a, b = scored_plan([[-1.2, -1.0, -4.0]], [[-1.0, -1.1, -4.5]])
    assert row_margin(plan.rows[0], a) == pytest.approx(0.2)
    assert score_movement(plan.rows[0], a, b) == pytest.approx(0.4)  # the gap to -4.0: 3.0 -> 3.4


def test_gate_threshold_is_chosen_on_one_half_and_bounded_on_the_other():
    """Rows alternate: even rows choose (their largest gap movement), odd rows verify; an odd
    row that changed above the threshold counts against the bound."""
    n = 40
    cheap_scores, exact_scores = [], []
    for i in range(n):
        margin = 0.01 * (i + 1)
        exact_scores.append([0.0, -margin])
        # even rows' gaps move 0.09 at most; row 1 (margin 0.02) flips under a tiny move; row 39
        # (margin 0.4, far above the threshold 0.09) flips too: one change the gate missed
        move = 0.09 if i % 2 == 0 else 0.0
        cheap_scores.append([0.0 - move, -margin])
    cheap_scores[1] = [-0.03, -0.02]
    cheap_scores[39] = [-0.7, -0.4]
    plan, cheap, exact = scored_plan(cheap_scores, exact_scores)
    gate = calibrate_gate(plan, cheap, exact, max_loss=0.2)
    assert gate.threshold == pytest.approx(0.09)
    assert gate.choose_rows == gate.verify_rows == 20
    assert gate.changed == 1  # row 39 (cheap margin 0.3: passed), not row 1 (0.01: reran)
    assert gate.bound == pytest.approx(binom_upper(1, 20, 0.95))
    # odd rows with a cheap margin under 0.09: rows 1, 3, 5, 7 (margins 0.01, 0.04, 0.06, 0.08)
    assert gate.fallback_share == pytest.approx(4 / 20)
    assert gate.holds == (gate.bound <= 0.2)


def choice_rows(n: int) -> list[ChoiceRow]:
    g = torch.Generator().manual_seed(5)
    words = ["good", "bad", "fine", "dull", "great", "poor"]
    rows = []
    for i in range(n):
        w = [words[int(j)] for j in torch.randint(0, len(words), (6,), generator=g)]
        rows.append(ChoiceRow(f"Review: {' '.join(w)} #{i}\nSentiment:", [" yes", " no"], 0))
    return rows + [ChoiceRow("Pick one:", [" alpha beta", " gamma"], 1), TextRow("hello there")]


@pytest.fixture(scope="module", params=["bfloat16", "bfloat16-linears"])
def models(request):
    exact = tiny_model("llama")
    return exact, cheap_copy(exact, cheap_precision(request.param))


def test_run_verified_reruns_exactly_the_rows_under_the_threshold(models):
    exact_model, cheap_model = models
    tok = TinyTokenizer()
    plan = plan_rows(choice_rows(24), tok, True, None)
    opts = RunOptions(batch_size=8, progress=False)
    exact = run(exact_model, tok, plan, opts)
    cheap = run(cheap_model, tok, plan, opts)
    margins = sorted(row_margin(r, cheap) for r in plan.rows)
    threshold = margins[len(margins) // 2]  # about half the rows rerun
    got = run_verified(
        tok, plan, Precision(cheap_model, Tiers()), Precision(exact_model, Tiers()), threshold, opts
    )
    expected = [i for i, r in enumerate(plan.rows) if row_margin(r, cheap) < threshold]
    assert got.reran == expected and 0 < len(expected) < len(plan.rows)
    assert len(plan.rows) - 1 in got.reran  # the text row always reruns
    for i, r in enumerate(plan.rows):
        source = exact if i in expected else cheap
        for qs in r.queries:
            for q in qs:
                key = (q.seq, q.from_end, q.token)
                # (the rerun batches differently: float32 rounding of other padding)
                assert got.out.logprobs[key] == pytest.approx(source.logprobs[key], abs=1e-5)
    pe, pv = predictions(plan, exact), predictions(plan, got.out)
    assert all(pe[i] == pv[i] for i in expected)
    assert got.fallback_share == pytest.approx(len(expected) / len(plan.rows))
    everything = run_verified(
        tok, plan, Precision(cheap_model, Tiers()), Precision(exact_model, Tiers()), math.inf, opts
    )
    for key, value in exact.logprobs.items():  # threshold inf: the exact pass itself
        assert everything.out.logprobs[key] == pytest.approx(value, abs=1e-5)


def test_cheap_answers_never_reach_the_exact_memo_and_prefix_trees_stay_apart(models):
    """One memo shared by both precisions: the cheap pass's answers go in under bfloat16 only,
    so a later float32 run finds exactly the reran sequences (which are float32 answers)."""
    exact_model, cheap_model = models
    tok = TinyTokenizer()
    plan = plan_rows(choice_rows(16), tok, True, None)
    opts = RunOptions(batch_size=8, progress=False)
    memo = ResultMemo()
    cheap_tier, exact_tier = PrefixTier(cheap_model), PrefixTier(exact_model)
    got = run_verified(
        tok,
        plan,
        Precision(cheap_model, Tiers(prefix=cheap_tier, memo=memo)),
        Precision(exact_model, Tiers(prefix=exact_tier, memo=memo)),
        0.05,
        opts,
    )
    assert got.reran and len(got.reran) < len(plan.rows)
    assert exact_tier.numerics == "float32-cpu" and "bfloat16" in cheap_tier.numerics
    later = run(exact_model, tok, plan, opts, Tiers(memo=memo))
    reran_seqs = {q for i in got.reran for q in plan.rows[i].seqs}
    assert {i for i, h in enumerate(later.memo_hit) if h} == reran_seqs
    exact = run(exact_model, tok, plan, opts)
    for key, value in later.logprobs.items():
        assert value == pytest.approx(exact.logprobs[key], abs=1e-4)


def test_a_linears_only_copy_rounds_only_its_linears_and_keys_its_own_numerics():
    """``bfloat16-linears``: every linear but the head swapped, the exact model untouched, its
    numerics its own (never float32's or whole bfloat16's), its logits float32 (a whole
    bfloat16 model's are rounded: 1/16 at a trained model's logit of 15, the largest movement
    on real models, see docs/results.md) and still not the exact model's (it is cheaper)."""
    from attncache.tasks.precisions import CheapLinear

    exact = tiny_model("llama")
    linears = cheap_copy(exact, cheap_precision("bfloat16-linears"))
    whole = cheap_copy(exact, cheap_precision("bfloat16"))
    assert all(p.dtype == torch.float32 for p in exact.parameters())
    head = linears.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear) and head.weight.dtype == torch.float32
    swapped = [m for m in linears.modules() if isinstance(m, CheapLinear)]
    plain = [m for m in linears.modules() if type(m) is torch.nn.Linear]
    assert swapped and plain == [head]
    assert all(m.weight.dtype == torch.bfloat16 for m in swapped)
    names = {model_registry.numerics(m) for m in (exact, linears, whole)}
    assert names == {"float32-cpu", "float32-cpu-bfloat16-linears", "bfloat16-cpu"}
    ids = torch.randint(3, 120, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = exact(ids).logits, linears(ids).logits
    assert got.dtype == torch.float32 and whole(ids).logits.dtype == torch.bfloat16
    assert 0 < (got - ref).abs().max().item() < 0.05


def _copy_then_cast(model, precision):
    """The readable reference: copy everything in float32, then cast or swap the linears."""
    from attncache.tasks.precisions import CheapLinear

    cheap = copy.deepcopy(model)
    if not precision.linears_only:
        return cheap.to(dtype=precision.dtype)
    head = cheap.get_output_embeddings()
    for parent in list(cheap.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                setattr(parent, name, CheapLinear(child, precision.dtype))
    return cheap


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # head untied / tied
@pytest.mark.parametrize("name", ["bfloat16", "bfloat16-linears"])
def test_a_cheap_copy_casts_while_copying_and_equals_copy_then_cast(monkeypatch, family, name):
    """A cheap copy never duplicates a weight it casts in float32 (its peak memory is its own
    size, not the model's again), and is bit for bit what copying then casting gives, tied
    weights still one parameter."""
    precision = cheap_precision(name)
    exact = tiny_model(family)
    want = _copy_then_cast(exact, precision)
    copied = []
    real = torch.nn.Parameter.__deepcopy__

    def spy(self, memo):
        copied.append(self)
        return real(self, memo)

    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", spy)
    got = cheap_copy(exact, precision)
    head = exact.get_output_embeddings()
    cast = {id(p) for p in exact.parameters()}
    if precision.linears_only:
        linears = [m for m in exact.modules() if isinstance(m, torch.nn.Linear) and m is not head]
        cast = {id(m.weight) for m in linears}
    assert cast and not cast.intersection(id(p) for p in copied)  # cast as they were copied
    assert all(p.dtype == torch.float32 for p in exact.parameters())  # untouched
    have, ref = got.state_dict(), want.state_dict()
    assert have.keys() == ref.keys()
    for k, v in ref.items():
        assert have[k].dtype == v.dtype and torch.equal(have[k], v), k
    tied = exact.get_output_embeddings().weight is exact.get_input_embeddings().weight
    assert (got.get_output_embeddings().weight is got.get_input_embeddings().weight) == tied


def test_an_unknown_cheap_precision_is_one_clear_error():
    from attncache.errors import UserError

    for name in ("float32", "int8", "bfloat16-layers"):
        with pytest.raises(UserError, match="--cheap-dtype must be"):
            cheap_precision(name)


def test_the_probe_times_the_precision_once_per_process():
    first = native_speedup(torch.bfloat16, "cpu")
    assert first > 0 and native_speedup(torch.bfloat16, "cpu") == first  # cached


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny import save_tiny_hf

    root = tmp_path_factory.mktemp("verify")
    folder = save_tiny_hf("llama", root / "model")
    rows = root / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": r.prompt, "choices": list(r.choices), "answer": r.answer}) + "\n"
            for r in choice_rows(40)[:-1]
        )
    )
    return folder, rows


def test_eval_with_a_given_margin_reports_its_gate_and_agrees_where_it_reran(tiny_folder):
    from attncache.workflows import EvalOptions, evaluate
    from attncache.workflows.cheap import VerifyOptions

    folder, rows = tiny_folder
    everything = evaluate(
        None, str(rows), EvalOptions(model_name=str(folder), progress=False, memo=False,
        verify=VerifyOptions("1e9")),
    )[0]  # fmt: skip
    assert everything.verify["used"] and everything.verify["fallback_share"] == 1.0
    assert everything.comparison.agreement == 1.0  # every row reran exactly
    none = evaluate(
        None, str(rows), EvalOptions(model_name=str(folder), progress=False, memo=False,
        verify=VerifyOptions("0")),
    )[0]  # fmt: skip
    assert none.verify["fallback_share"] == 0.0 and none.verify["threshold"] == 0.0


def test_auto_runs_exactly_when_the_gate_cannot_hold(tiny_folder, monkeypatch):
    """20 calibration rows cannot bound 1e-4 (a bound needs ~30,000 rows): every row runs
    exactly and the report says why; a device that emulates the precision likewise."""
    from attncache.workflows import EvalOptions, cheap, evaluate
    from attncache.workflows.cheap import VerifyOptions

    folder, rows = tiny_folder
    monkeypatch.setattr(cheap, "native_speedup", lambda dtype, device: 2.0)  # any CPU
    res = evaluate(
        None, str(rows), EvalOptions(model_name=str(folder), progress=False, memo=False,
        verify=VerifyOptions("auto", max_loss=1e-4, calibrate_rows=20)),
    )[0]  # fmt: skip
    assert not res.verify["used"] and "exceeds --max-loss" in res.verify["reason"]
    assert res.verify["gate"]["verify_rows"] == 10 and res.comparison.agreement == 1.0
    monkeypatch.setattr(cheap, "native_speedup", lambda dtype, device: 0.5)
    res = evaluate(
        None, str(rows), EvalOptions(model_name=str(folder), progress=False, memo=False,
        verify=VerifyOptions("auto")),
    )[0]  # fmt: skip
    assert not res.verify["used"] and "not faster on this device" in res.verify["reason"]


def test_a_given_margin_on_a_device_that_emulates_the_precision_warns_in_one_line(
    tiny_folder, monkeypatch, capsys
):
    """``--verify-margin X`` is what the user asked for, so it runs, but where the probe says the
    precision is emulated (an AVX2-only CPU: bfloat16 ~100x slower) one line says so."""
    from attncache.workflows import EvalOptions, cheap, evaluate
    from attncache.workflows.cheap import VerifyOptions

    folder, rows = tiny_folder
    for probe, warned in ((0.01, True), (2.0, False)):
        monkeypatch.setattr(cheap, "native_speedup", lambda dtype, device, p=probe: p)
        res = evaluate(
            None, str(rows), EvalOptions(model_name=str(folder), progress=False, memo=False,
            verify=VerifyOptions("0.5")),
        )[0]  # fmt: skip
        err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert res.verify["used"] and res.comparison.agreement == 1.0
        assert bool(res.verify["warning"]) == warned and len(err) == int(warned)
        if warned:
            assert "not faster on this device (probe 0.01x)" in err[0]


def test_verify_flags_are_checked_in_one_line(tiny_folder):
    from test_cli import assert_one_line_error, cli

    folder, rows = tiny_folder
    base = ["eval", "--model", str(folder), "--data", str(rows)]
    assert_one_line_error(cli(*base, "--verify-margin", "soon", ok=False), "--verify-margin")
    assert_one_line_error(
        cli(*base, "--max-loss", "0.05", ok=False), "--max-loss has no effect without"
    )
    assert_one_line_error(
        cli(*base, "--verify-margin", "0.5", "--verify-rows", "50", ok=False),
        "--verify-rows has no effect with a given --verify-margin",
    )
    auto = [*base, "--verify-margin", "auto"]
    for flag, value in [("--verify-confidence", "1"), ("--verify-confidence", "1.5"),
                        ("--max-loss", "1.5"), ("--max-loss", "0")]:  # fmt: skip
        assert_one_line_error(cli(*auto, flag, value, ok=False), f"{flag}: must be in (0.0, 1.0)")
    got = json.loads(cli(*base, "--verify-margin", "0.5", "--json", "--no-memo").stdout)
    assert got["verify"]["used"] and 0.0 <= got["verify"]["fallback_share"] <= 1.0
    linears = ["--cheap-dtype", "bfloat16-linears", "--json", "--no-memo"]
    got = json.loads(cli(*base, "--verify-margin", "0.5", *linears).stdout)
    assert got["verify"]["used"] and got["verify"]["dtype"] == "bfloat16-linears"


@pytest.mark.parametrize(
    "given, field",
    [
        ({"margin": "soon"}, "margin"),
        ({"margin": "nan"}, "margin"),
        ({"margin": "-1"}, "margin"),
        ({"max_loss": 1.5}, "max_loss"),
        ({"confidence": 1.0}, "confidence"),
        ({"calibrate_rows": 0}, "calibrate_rows"),
    ],
)
def test_verify_options_from_a_library_caller_are_checked_in_one_line(given, field):
    """What the CLI's flags refuse, ``VerifyOptions`` refuses too (a confidence of 1 once ended
    in a math domain error deep in the bound)."""
    from attncache.errors import UserError
    from attncache.workflows.cheap import VerifyOptions

    with pytest.raises(UserError, match=f"^{field} must be"):
        VerifyOptions(**{"margin": "auto", **given})
    assert VerifyOptions("0.5").on and not VerifyOptions().on


@pytest.mark.parametrize("cheap_seconds, used", [(10.0, False), (0.1, True)])
def test_auto_runs_cheap_only_where_its_calibration_rows_say_it_pays(
    tiny_folder, monkeypatch, cheap_seconds, used
):
    """The calibration rows' own times decide: a cheap pass slower than the exact one (plus
    what would rerun) is not used; a fast one is, with a gate that holds."""
    from attncache.workflows import EvalOptions, cheap, evaluate
    from attncache.workflows.cheap import VerifyOptions

    real_run = cheap.run

    def timed_run(model, tok, plan, opts, tiers):
        out = real_run(model, tok, plan, opts, tiers)
        low = next(model.parameters()).dtype == torch.bfloat16
        out.seconds = cheap_seconds if low else 1.0
        return out

    monkeypatch.setattr(cheap, "run", timed_run)
    monkeypatch.setattr(cheap, "native_speedup", lambda dtype, device: 2.0)  # any CPU
    res = evaluate(
        None, str(tiny_folder[1]), EvalOptions(model_name=str(tiny_folder[0]), progress=False,
        memo=False, verify=VerifyOptions("auto", max_loss=0.9, calibrate_rows=20)),
    )[0]  # fmt: skip
    assert res.verify["gate"]["holds"]
    assert res.verify["used"] == used
    assert used or "would not pay" in res.verify["reason"]


def _auto_eval(tiny_folder, monkeypatch, gate, timed_run, **verify):
    """eval with --verify-margin auto on 20 calibration rows (unless given), its gate and pass
    times faked, on a CPU taken to have the cheap precision natively."""
    from attncache.workflows import EvalOptions, cheap, evaluate
    from attncache.workflows.cheap import VerifyOptions

    monkeypatch.setattr(cheap, "calibrate_gate", gate)
    monkeypatch.setattr(cheap, "run", timed_run)
    monkeypatch.setattr(cheap, "native_speedup", lambda dtype, device: 2.0)  # any CPU
    return evaluate(
        None, str(tiny_folder[1]), EvalOptions(model_name=str(tiny_folder[0]), progress=False,
        memo=False, verify=VerifyOptions("auto", **{"calibrate_rows": 20, **verify})),
    )[0]  # fmt: skip


@pytest.mark.parametrize("dtype", ["bfloat16", "bfloat16-linears"])
def test_a_whole_model_pass_that_reruns_many_rows_is_told_of_the_linears_shape(
    tiny_folder, monkeypatch, dtype
):
    from attncache.workflows import cheap

    real_gate, real_run = cheap.calibrate_gate, cheap.run

    def many_reruns(*args, **kwargs):
        return replace(real_gate(*args, **kwargs), fallback_share=0.6, bound=0.0)

    def slow_cheap_run(model, tok, plan, opts, tiers):
        out = real_run(model, tok, plan, opts, tiers)
        out.seconds = 1.0 if model_registry.numerics(model) == "float32-cpu" else 0.9
        return out

    res = _auto_eval(tiny_folder, monkeypatch, many_reruns, slow_cheap_run, dtype=dtype)
    assert not res.verify["used"] and "would not pay" in res.verify["reason"]
    assert ("--cheap-dtype bfloat16-linears" in res.verify["reason"]) == (dtype == "bfloat16")


# seconds per calibration pass by the shape that ran it, and the share of rows each would rerun
SHAPES = {"float32-cpu": 1.0, "bfloat16-cpu": 0.5, "float32-cpu-bfloat16-linears": 0.6}


@pytest.mark.parametrize(
    "whole_reruns, linears_reruns, want",
    [
        (0.05, None, "bfloat16"),  # the whole cast pays: nothing else is tried
        (0.60, 0.05, "bfloat16-linears"),  # it reruns too many: the linears shape pays instead
        (0.60, 0.60, None),  # neither pays: every row runs exactly, both reasons said
        (1.00, None, None),  # a gate that cannot hold on these rows: no other shape is tried
    ],
)
def test_auto_without_a_cheap_dtype_picks_the_shape_that_pays(
    tiny_folder, monkeypatch, whole_reruns, linears_reruns, want
):
    from attncache.workflows import cheap

    real_gate, real_run = cheap.calibrate_gate, cheap.run
    shares = {"bfloat16-cpu": whole_reruns, "float32-cpu-bfloat16-linears": linears_reruns}
    seen = []

    def gate(plan, low, high, *args, **kwargs):
        share = shares[seen[-1]]
        assert share is not None, f"{seen[-1]} was calibrated but should not have been"
        bound = 1.0 if share == 1.0 else 0.0  # 1.0: the gate does not hold
        return replace(
            real_gate(plan, low, high, *args, **kwargs), fallback_share=share, bound=bound
        )

    def timed_run(model, tok, plan, opts, tiers):
        out = real_run(model, tok, plan, opts, tiers)
        seen.append(model_registry.numerics(model))
        out.seconds = SHAPES[seen[-1]] if opts.desc == "calibrate" else out.seconds
        return out

    res = _auto_eval(tiny_folder, monkeypatch, gate, timed_run)
    v = res.verify
    assert v["used"] == (want is not None)
    tried = v["tried"]
    assert tried[0] == "bfloat16" and len(tried) == (1 if linears_reruns is None else 2)
    # one exact pass over the calibration rows serves every shape; the job pays for all of them
    assert seen[: 1 + len(tried)].count("float32-cpu") == 1
    cheap_costs = {"bfloat16": 0.5, "bfloat16-linears": 0.6}
    assert v["calibration_seconds"] == pytest.approx(1.0 + sum(cheap_costs[t] for t in tried))
    if want:
        assert v["dtype"] == want and v["gate"]["fallback_share"] == shares[seen[len(tried)]]
        assert res.comparison.agreement == 1.0 or v["fallback_share"] < 1.0
    elif whole_reruns == 1.0:
        assert "bfloat16: the gate's bound 1.000" in v["reason"]
    else:
        assert all(f"{t}: the cheap pass would not pay" in v["reason"] for t in tried)
        assert "--cheap-dtype" not in v["reason"]  # the shapes were tried, not suggested


def plan_source_rows(path) -> list[ChoiceRow]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [ChoiceRow(x["prompt"], list(x["choices"]), x["answer"]) for x in lines]


def test_auto_answers_its_calibration_rows_with_their_exact_pass(tiny_folder, monkeypatch):
    """The calibration rows were run exactly to measure the gate: they keep those answers, and
    the cheap pass (and its reruns) runs only the other rows, instead of all of them again."""
    from attncache.tasks import verify as verify_mod
    from attncache.workflows import Session, cheap
    from attncache.workflows.cheap import VerifyOptions

    real_run = cheap.run
    cheap_runs = []

    def spy(model, tok, plan, opts, tiers):
        out = real_run(model, tok, plan, opts, tiers)
        low = model_registry.numerics(model) != "float32-cpu"
        if opts.desc == "calibrate":
            out.seconds = 0.1 if low else 1.0  # a cheap pass that pays
        elif low:
            cheap_runs.append(list(opts.seq_ids))
        return out

    monkeypatch.setattr(cheap, "run", spy)
    monkeypatch.setattr(verify_mod, "run", spy)  # the verified pass's own runs
    monkeypatch.setattr(cheap, "native_speedup", lambda dtype, device: 2.0)  # any CPU
    folder, rows = tiny_folder
    s = Session.open(None, str(folder))
    plan = s.plan(str(rows), quiet=True)
    first = json.loads(rows.read_text().splitlines()[3])
    # a later row sharing one sequence (a prompt and a choice) with calibration row 3: both run
    # in the cheap pass, so no row's margin mixes cheap and exact scores
    shared = ChoiceRow(first["prompt"], [first["choices"][0], " maybe"], 0)
    plan = plan_rows([*plan_source_rows(rows), shared], s.tokenizer, True, None)
    opts = RunOptions(batch_size=8, progress=False)
    exact = real_run(s.model, s.tokenizer, plan, opts, Tiers(prefix=PrefixTier(s.model)))
    verify = VerifyOptions("auto", dtype="bfloat16", max_loss=0.9, calibrate_rows=20)
    got = cheap.verified_pass(s, plan, opts, verify, Tiers(prefix=PrefixTier(s.model)))
    assert got.report.used and got.report.calibration_rows == 19  # row 3 ran cheap
    calib = plan.subset_seqs([r for r in range(20) if r != 3])
    rest = {q for r in [3, *range(20, len(plan.rows))] for q in plan.rows[r].seqs}
    assert len(cheap_runs) == 1 and set(cheap_runs[0]) == rest  # none of the calibration's
    assert not rest.intersection(calib)
    for (q, end, token), lp in exact.logprobs.items():
        if q in calib:  # the calibration rows' answers are the exact pass's
            assert got.out.logprobs[q, end, token] == pytest.approx(lp, abs=1e-4)
    assert set(got.out.logprobs) == set(exact.logprobs)  # every row answered
    want, have = predictions(plan, exact), predictions(plan, got.out)
    kept = [i for i in range(20) if i != 3]
    assert [want[i] for i in kept] == [have[i] for i in kept]


# rows that cannot run: one the reader skips (a choice of no text), one the plan skips (longer
# than the tiny model's 512 positions, so the plan's rows and the inputs are numbered apart)
UNRUNNABLE = [
    {"prompt": "Pick:", "choices": ["", " b"], "answer": 0},
    {"prompt": "x" * 600, "choices": [" a", " b"], "answer": 0},
]


@pytest.mark.parametrize("bad", UNRUNNABLE, ids=["reader", "plan"])
def test_a_skipped_row_beside_good_ones_keeps_every_answer_with_its_row(tiny_folder, tmp_path, bad):
    """A row that cannot run is skipped and counted; the verified pass answers the other 12,
    and with every row rerun they agree with the exact pass."""
    from attncache.workflows import EvalOptions, evaluate
    from attncache.workflows.cheap import VerifyOptions

    folder, rows = tiny_folder
    lines = rows.read_text().splitlines()
    bad = json.dumps(bad)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(lines[:5] + [bad] + lines[5:12]) + "\n")
    res = evaluate(
        None, str(mixed), EvalOptions(model_name=str(folder), progress=False, memo=False,
        verify=VerifyOptions("1e9")),
    )[0]  # fmt: skip
    assert res.comparison.n == 12 and res.skipped_rows == 1 and res.verify["used"]
    assert res.verify["fallback_share"] == 1.0 and res.comparison.agreement == 1.0


def test_auto_with_a_skipped_row_among_its_calibration_rows_answers_every_row_in_place(
    tiny_folder, monkeypatch, tmp_path
):
    """An input the plan skips among the first rows: calibration counts rows that run, keeps
    their exact answers where they belong, and the cheap pass (every row rerun here) answers the
    rest, so every row agrees with the exact pass."""
    from attncache.workflows import cheap

    real_gate, real_run = cheap.calibrate_gate, cheap.run

    def rerun_all(*args, **kwargs):  # a gate that holds, pays and reruns every later row
        return replace(real_gate(*args, **kwargs), threshold=1e9, bound=0.0, fallback_share=0.0)

    def timed_run(model, tok, plan, opts, tiers):
        out = real_run(model, tok, plan, opts, tiers)
        if opts.desc == "calibrate":
            out.seconds = 1.0 if model_registry.numerics(model) == "float32-cpu" else 0.1
        return out

    folder, rows = tiny_folder
    lines = rows.read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(lines[:3] + [json.dumps(UNRUNNABLE[1])] + lines[3:16]) + "\n")
    res = _auto_eval((folder, mixed), monkeypatch, rerun_all, timed_run, calibrate_rows=6)
    v = res.verify
    assert res.skipped_rows == 1 and res.comparison.n == 16
    assert v["used"] and v["calibration_rows"] == 6 and v["fallback_share"] == 1.0
    assert res.comparison.agreement == 1.0  # each answer with its own row
