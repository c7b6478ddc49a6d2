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
                         "--json", timeout=2400).stdout)  # 19 candidate policies: minutes on 2 busy cores
    assert res["disagreement_bound"] <= 0.1 and res["reuse_fraction"] > 0
    info = json.loads(cli("inspect", str(db), "--json").stdout)
    assert info["policy_layers"] == res["policy_layers"] and info["policy_heads"] == res["policy_heads"]
    assert info["threshold"] == res["threshold"]
    fresh = json.loads(cli("eval", "--db", str(db), "--data", "sst2[300:600]", "--json").stdout)
    assert 1 - fresh["agreement"] <= 0.1
    assert fresh["accuracy_baseline"] - fresh["accuracy_cached"] <= 0.1
