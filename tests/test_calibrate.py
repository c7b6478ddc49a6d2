"""Calibration: the confidence bound, the sweep's exactness, and a calibrated bound holding on fresh
data."""

import contextlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from test_cli import cli

from attncache.build.calibrate import binom_upper, rows_for
from attncache.tasks import RunOutput, mix


def test_binom_upper_known_values():
    assert math.isclose(binom_upper(0, 100, 0.95), 1 - 0.05 ** (1 / 100), rel_tol=1e-6)
    assert binom_upper(5, 100) > 0.05 and binom_upper(5, 100) < 0.12
    assert binom_upper(5, 100) > binom_upper(5, 1000)  # more data, tighter bound
    assert binom_upper(3, 3) == 1.0


def test_mix_takes_cached_only_within_threshold():
    exact = RunOutput(
        {(0, 1, 5): -1.0, (1, 1, 5): -2.0}, [1, 2], None, [False, False], 0.0, [math.inf] * 2
    )
    cached = RunOutput(
        {(0, 1, 5): -9.0, (1, 1, 5): -8.0}, [7, 8], None, [True, True], 0.0, [0.1, 0.3]
    )
    m = mix(exact, cached, 0.2)
    assert (
        m.logprobs == {(0, 1, 5): -9.0, (1, 1, 5): -2.0}
        and m.argmax == [7, 2]
        and m.hit == [True, False]
    )


@pytest.mark.real
@pytest.mark.timeout(2700)
def test_calibrated_setting_holds_on_fresh_data(tmp_path):
    db = tmp_path / "db"
    cli("build", "--data", "sst2[0:100]", "--out", str(db), "--quiet")
    res = json.loads(
        cli(
            "calibrate",
            "--db",
            str(db),
            "--data",
            "sst2[100:300]",
            "--max-loss",
            "0.1",
            "--json",
            timeout=2400,
        ).stdout
    )  # the pruned search: about a minute on 2 cores (every candidate to the end: ~8)
    assert res["disagreement_bound"] <= 0.1 and res["reuse_fraction"] > 0
    # templates ranked on 50 rows; of the other 150, half choose the setting, half bound it
    assert res["rank_rows"] == 50 and res["selection_rows"] == 75 and res["n"] == 75
    info = json.loads(cli("inspect", str(db), "--json").stdout)
    assert (
        info["policy_layers"] == res["policy_layers"]
        and info["policy_heads"] == res["policy_heads"]
    )
    assert info["threshold"] == res["threshold"]
    # SST-2 at a 10 % bound always affords some template heads (measured: 20 % of maps at 0.97
    # agreement)
    assert res["policy_fixed_heads"] > 0 and res["template_fraction"] > 0
    assert info["policy_fixed_heads"] == info["template_heads"] == res["policy_fixed_heads"]
    fresh = json.loads(
        cli(
            "eval", "--db", str(db), "--data", "sst2[300:600]", "--no-prefix-cache", "--json"
        ).stdout
    )
    assert 1 - fresh["agreement"] <= 0.1
    assert fresh["accuracy_baseline"] - fresh["accuracy_cached"] <= 0.1
    # template heads serve every input no longer than the templates (the longest build input)
    assert fresh["reuse_fraction"] > 0.5 * res["template_fraction"]
    # the sweep over the stored template heads: one point each (no lookup), reuse grows with N
    k = res["policy_fixed_heads"]
    pts = json.loads(
        cli(
            "eval",
            "--db",
            str(db),
            "--data",
            "sst2[300:340]",
            "--sweep",
            "--policy",
            "fixed:1",
            "--policy",
            f"fixed:{k}",
            "--json",
        ).stdout
    )["points"]
    assert [p["policy"] for p in pts] == ["fixed:1", f"fixed:{k}"] and all(
        p["hit_rate"] == 0 for p in pts
    )
    assert 0 < pts[0]["reuse_fraction"] < pts[1]["reuse_fraction"] <= k / 270 + 1e-9
    # 'templates' stores a given share of ranked heads without choosing N
    t = json.loads(
        cli(
            "templates", "--db", str(db), "--data", "sst2[100:140]", "--max-share", "0.1", "--json"
        ).stdout
    )
    info = json.loads(cli("inspect", str(db), "--json").stdout)
    assert t["template_heads"] == info["template_heads"] == 27
    # the stored policy keeps only the template heads that still have templates, so 'default' still
    # runs
    assert info["policy_fixed_heads"] <= 27
    cli("eval", "--db", str(db), "--data", "sst2[300:310]", "--json")


def test_each_candidate_bound_is_computed_once(monkeypatch):
    """A sweep point already carries its 95 % bound: calibrating at 95 % reuses it instead of
    recomputing."""
    import attncache.build.calibrate as cal
    from attncache.tasks import Comparison

    point = cal.SweepPoint(
        Comparison(n=100, n_sequences=100, hit_rate=0.5, agreement=0.97),
        "all",
        0.2,
        0.5,
        0.0,
        0.1,
        disagreement_upper95=cal.binom_upper(3, 100),
    )

    def fail(*a, **k):
        raise AssertionError("the bound was computed again")

    monkeypatch.setattr(cal, "binom_upper", fail)
    assert point.with_bound(0.95).bound == point.disagreement_upper95
    monkeypatch.undo()
    assert point.with_bound(0.9).bound == cal.binom_upper(3, 100, 0.9) < point.disagreement_upper95


def _choice_plan(rng):
    """30 synthetic choice rows of 1 to 3 continuation sequences, and a maker of outputs: random
    log-probs per seed, the given lookup distances."""
    from attncache.tasks import Plan, Query, RowPlan

    rows, seqs = [], []
    for r in range(30):
        n = int(rng.integers(1, 4))
        ids = list(range(len(seqs), len(seqs) + n))
        seqs += [[1, r, j] for j in range(n)]
        queries = (
            [[Query(s, 1, 7), Query(s, 1, 8)] for s in ids]
            if n > 1
            else [[Query(ids[0], 1, 7)], [Query(ids[0], 1, 8)]]
        )
        rows.append(RowPlan("choiceN" if n > 1 else "choice1", ids, queries, [1.0] * len(queries)))
    plan = Plan(seqs, rows, [], True)

    def out(seed, dist=None):
        g = np.random.default_rng(seed)
        lp = {(s, 1, t): float(g.normal()) for s in range(len(seqs)) for t in (7, 8)}
        return RunOutput(
            lp,
            [0] * len(seqs),
            None,
            [True] * len(seqs),
            0.0,
            list(dist) if dist is not None else [math.inf] * len(seqs),
        )

    return plan, out


def test_change_counts_equal_mixing_then_comparing():
    """The per-row state walk counts exactly what mixing at each threshold and comparing would."""
    from attncache.build.calibrate import Mixture, change_counts
    from attncache.tasks import compare

    rng = np.random.default_rng(3)
    plan, out = _choice_plan(rng)
    dist = rng.uniform(0, 1, len(plan.seqs))
    dist[rng.random(len(plan.seqs)) < 0.2] = math.inf  # no compatible entry
    exact, base, cached = out(1), out(2), out(3, dist)
    ts = np.array([-1.0, 0.1, 0.3, 0.5, 0.9, 2.0])
    got = change_counts(plan, list(range(30)), exact, Mixture(base, cached), ts)
    for t, n in zip(ts, got):
        want = round((1 - compare(plan, exact, mix(base, cached, t)).agreement) * 30)
        assert n == want
    assert got[0] != got[-1]  # the thresholds matter in this example


def test_verification_runs_nearest_first_and_stops_once_a_threshold_breaks():
    """The chosen setting is verified on sequences nearest first; once the lowest threshold that
    breaks the bound is final the pass stops, with the counts up to it those of a full pass."""
    from attncache.build.calibrate import Mixture, change_counts
    from attncache.workflows.search import Search, Setting

    rng = np.random.default_rng(5)
    plan, out = _choice_plan(rng)
    n = len(plan.seqs)
    dist = rng.uniform(0, 1, n)
    exact, base, full = out(1), out(2), out(3, dist)
    search = Search.__new__(Search)  # only what verification reads
    search.plan, search.exact, search.distances, search.batch_size = plan, exact, list(dist), 2
    search.thresholds = np.array([-1.0, *sorted(dist)])
    search.best = Setting(None, 0.9, 0.5, 0)
    search.s = SimpleNamespace(
        model=None, cache=SimpleNamespace(attach=lambda *a, **k: contextlib.nullcontext())
    )
    ran: list[int] = []

    def run(_att, ids, into=None):
        ran.extend(ids)
        got = into if into is not None else RunOutput.empty(n)
        for q in ids:
            got.logprobs.update({(q, 1, t): full.logprobs[(q, 1, t)] for t in (7, 8)})
            got.distance[q] = dist[q]
        return got

    search._run = run
    rows = list(range(30))
    every = change_counts(plan, rows, exact, Mixture(base, full, list(dist)), search.thresholds)
    allowed = int(every[len(every) // 4])  # a bound the counts pass below and break later
    breaks = [k for k, t in enumerate(search.thresholds) if t <= 0.9 and every[k] > allowed]
    assert breaks, "the example must break the bound below the chosen threshold"
    counts, _ = search._certify(rows, list(range(n)), base, lambda c: c <= allowed)
    assert list(counts[: breaks[0] + 1]) == list(every[: breaks[0] + 1])
    assert [dist[q] for q in ran] == sorted(dist[q] for q in ran)  # nearest first
    assert len(ran) < sum(d <= 0.9 for d in dist)  # stopped before the chosen threshold
    assert all(dist[q] <= 0.9 for q in ran)


def test_search_finds_the_exhaustive_choice_with_fewer_passes(tiny_hf, tmp_path):
    """On a tiny model: the pruned search stores a setting within 10 % of the exhaustive search's
    reuse, within the bound, running fewer passes; a time limit labels its (valid) result."""
    model = tiny_hf("llama")
    db = tmp_path / "db"
    cli(
        "build",
        "--model",
        model,
        "--data",
        "sst2[0:40]",
        "--out",
        str(db),
        "--quiet",
        "--max-tokens",
        "200",
    )
    args = [
        "calibrate",
        "--db",
        str(db),
        "--data",
        "sst2[40:120]",
        "--max-loss",
        "0.2",
        "--json",
        "--dry-run",
        "--quiet",
        "--max-tokens",
        "200",
    ]
    full = json.loads(cli(*args, "--exhaustive").stdout)
    fast = json.loads(cli(*args).stdout)
    for res in (full, fast):
        assert res["disagreement_bound"] <= 0.2 and res["search"] == "complete"
        # the count the search bounded is the true count of changed rows of the stored setting
        # (a pass cut short must not have missed any)
        changed = round((1 - res["agreement"]) * res["n"])
        assert res["disagreement_bound"] == pytest.approx(binom_upper(changed, res["n"], 0.95))
    for res in (full, fast):  # ranked, chosen and bounded on three disjoint sets of rows
        assert res["rank_rows"] + res["selection_rows"] + res["n"] <= 80
        assert res["n"] in (res["selection_rows"], res["selection_rows"] - 1)
    assert fast["reuse_fraction"] >= 0.9 * full["reuse_fraction"]
    assert fast["passes"] < full["passes"] and fast["candidates"] <= full["candidates"]
    capped = json.loads(cli(*args, "--max-minutes", "0.0001").stdout)
    assert (
        capped["search"].startswith("stopped at the time limit")
        and capped["disagreement_bound"] <= 0.2
    )


def test_stored_setting_measures_what_eval_sees_on_the_verification_rows(tiny_hf, tmp_path):
    """The bound is computed from a pass that runs the chosen policy only on sequences near enough
    to hit: an eval of the stored default on the same verification rows agrees with it."""
    model = tiny_hf("llama")
    db = tmp_path / "db"
    common = ["--model", model, "--quiet", "--max-tokens", "400"]  # no row skipped
    cli("build", "--data", "sst2[0:40]", "--out", str(db), *common)
    calibrate = ["calibrate", "--db", str(db), "--data", "sst2[40:120]", "--max-loss", "0.3"]
    res = json.loads(cli(*calibrate, "--json", *common).stdout)
    assert res["reuse_fraction"] > 0 and res["rank_rows"] == 20  # rows 40..59 rank heads
    assert res["policy_layers"] and res["threshold"] < 1e9
    # the verification rows (every other row after the ranking rows), maps only: the exact prefix
    # tier would take the shared prompt instead
    verify = ["eval", "--db", str(db), "--data", "sst2[61:120:2]", "--policy", "default"]
    got = json.loads(cli(*verify, "--no-memo", "--no-prefix-cache", "--json", *common).stdout)
    assert got["n"] == res["n"] and 0 < got["hit_rate"] < 1  # some sequences were not run
    assert got["agreement"] == pytest.approx(res["agreement"])


def test_a_build_holds_rows_out_once_they_can_bound_the_loss():
    """Half of the held rows verify the default: the build holds out its share of DATA once that
    share is twice the rows a bound with no changed answer needs (exactly that many included)."""
    from attncache.workflows.evaluate import CONFIDENCE, held_out_rows

    need = 2 * rows_for(0.05, CONFIDENCE)
    assert held_out_rows(4 * need, 0.25, 0.05) == need
    assert held_out_rows(4 * need - 4, 0.25, 0.05) == 0
    assert held_out_rows(8 * need, 0.25, 0.05) == 2 * need


def test_build_calibrates_its_default_on_held_out_rows(tiny_hf, tmp_path):
    """Enough rows: a share is held out of the DB and the default carries a measured bound (or
    reuses nothing); too few: the default reuses nothing and says why; --no-calibrate: labelled
    uncalibrated."""
    model = tiny_hf("llama")
    db = tmp_path / "db"
    cli(
        "build",
        "--model",
        model,
        "--data",
        "sst2[0:450]",
        "--out",
        str(db),
        "--quiet",
        "--max-tokens",
        "400",
        "--max-loss",
        "0.05",
    )
    info = json.loads(cli("inspect", "--db", str(db), "--json").stdout)
    assert "bound" in info["default_reuse"] or "no approximate maps" in info["default_reuse"]
    manifest = json.loads((db / "manifest.json").read_text())
    cal = manifest["calibration"]
    held = cal["rank_rows"] + cal["selection_rows"] + cal["n"]
    assert held == round(0.35 * 450) and info["entries"] == 2 * (450 - held)
    assert cal["max_loss"] == 0.05 and cal["disagreement_bound"] <= 0.05
    assert cal["n"] in (cal["selection_rows"], cal["selection_rows"] - 1)  # disjoint halves
    assert cal["n"] >= rows_for(0.05, 0.95)  # enough rows to bound 5 % were held out
    # the same rows cannot bound 2 %: none are held out, every row goes into the DB
    small = tmp_path / "small"
    cli("build", "--model", model, "--data", "sst2[0:60]", "--out", str(small), "--quiet")
    info = json.loads(cli("inspect", "--db", str(small), "--json").stdout)
    assert (
        info["entries"] == 2 * 60
        and info["policy_layers"] == []
        and "too few" in info["default_reuse"]
        and "298 held-out rows" in info["default_reuse"]
    )
    loose = tmp_path / "loose"
    cli(
        "build",
        "--model",
        model,
        "--data",
        "sst2[0:20]",
        "--out",
        str(loose),
        "--quiet",
        "--no-calibrate",
    )
    info = json.loads(cli("inspect", "--db", str(loose), "--json").stdout)
    assert info["policy_layers"] and "not calibrated" in info["default_reuse"]
