"""Calibration: the confidence bound, the sweep's exactness, and a calibrated bound holding on fresh data."""

import json
import math

import pytest
from test_cli import cli

from attncache.calibrate import binom_upper
from attncache.tasks import RunOutput, mix


def test_binom_upper_known_values():
    assert math.isclose(binom_upper(0, 100, 0.95), 1 - 0.05 ** (1 / 100), rel_tol=1e-6)
    assert binom_upper(5, 100) > 0.05 and binom_upper(5, 100) < 0.12
    assert binom_upper(5, 100) > binom_upper(5, 1000)  # more data, tighter bound
    assert binom_upper(3, 3) == 1.0


def test_mix_takes_cached_only_within_threshold():
    exact = RunOutput({(0, 1, 5): -1.0, (1, 1, 5): -2.0}, [1, 2], None, [False, False], 0.0, [math.inf] * 2)
    cached = RunOutput({(0, 1, 5): -9.0, (1, 1, 5): -8.0}, [7, 8], None, [True, True], 0.0, [0.1, 0.3])
    m = mix(exact, cached, 0.2)
    assert m.logprobs == {(0, 1, 5): -9.0, (1, 1, 5): -2.0} and m.argmax == [7, 2] and m.hit == [True, False]


@pytest.mark.real
def test_calibrated_setting_holds_on_fresh_data(tmp_path):
    db = tmp_path / "db"
    cli("build", "--data", "sst2[0:100]", "--out", str(db), "--quiet")
    res = json.loads(cli("calibrate", "--db", str(db), "--data", "sst2[100:300]", "--max-loss", "0.1",
                         "--json", timeout=2400).stdout)  # ~50 candidate policies: minutes on 2 busy cores
    assert res["disagreement_bound"] <= 0.1 and res["reuse_fraction"] > 0
    assert res["rank_rows"] == 50 and res["n"] == 150  # templates ranked on 50 rows, the bound on the other 150
    info = json.loads(cli("inspect", str(db), "--json").stdout)
    assert info["policy_layers"] == res["policy_layers"] and info["policy_heads"] == res["policy_heads"]
    assert info["threshold"] == res["threshold"]
    # SST-2 at a 10 % bound always affords some template heads (measured: 20 % of maps at 0.97 agreement)
    assert res["policy_fixed_heads"] > 0 and res["template_fraction"] > 0
    assert info["policy_fixed_heads"] == info["template_heads"] == res["policy_fixed_heads"]
    fresh = json.loads(cli("eval", "--db", str(db), "--data", "sst2[300:600]", "--no-prefix-cache", "--json").stdout)
    assert 1 - fresh["agreement"] <= 0.1
    assert fresh["accuracy_baseline"] - fresh["accuracy_cached"] <= 0.1
    # template heads serve every input no longer than the templates (the longest build input)
    assert fresh["reuse_fraction"] > 0.5 * res["template_fraction"]
    # the sweep over the stored template heads: one point each (no lookup), reuse grows with N
    k = res["policy_fixed_heads"]
    pts = json.loads(cli("eval", "--db", str(db), "--data", "sst2[300:340]", "--sweep", "--policy", "fixed:1",
                         "--policy", f"fixed:{k}", "--json").stdout)["points"]
    assert [p["policy"] for p in pts] == ["fixed:1", f"fixed:{k}"] and all(p["hit_rate"] == 0 for p in pts)
    assert 0 < pts[0]["reuse_fraction"] < pts[1]["reuse_fraction"] <= k / 270 + 1e-9
    # 'templates' stores a given share of ranked heads without choosing N
    t = json.loads(cli("templates", "--db", str(db), "--data", "sst2[100:140]", "--max-share", "0.1",
                       "--json").stdout)
    info = json.loads(cli("inspect", str(db), "--json").stdout)
    assert t["template_heads"] == info["template_heads"] == 27
    # the stored policy keeps only the template heads that still have templates, so 'default' still runs
    assert info["policy_fixed_heads"] <= 27
    cli("eval", "--db", str(db), "--data", "sst2[300:310]", "--json")
