"""The timing harness: interleaving, medians, and that it detects a slowed variant."""

import time

from attncache.bench import interleaved, machine


def test_interleaved_detects_slowed_variant():
    order = []

    def fast(i):
        order.append("a")
        time.sleep(0.002)

    def slow(i):
        order.append("b")
        time.sleep(0.008)

    med = interleaved({"a": fast, "b": slow}, n_items=3, repeats=5, warmup=1)
    assert len(med["a"]["e2e"]) == 3
    ratio = sum(med["b"]["e2e"]) / sum(med["a"]["e2e"])
    assert 2.0 < ratio < 8.0
    assert order[:6] == ["a", "b"] * 3  # A B A B: never a block of one variant


def test_interleaved_uses_reported_measures():
    med = interleaved({"x": lambda i: {"e2e": float(i), "attn": 0.5}}, n_items=2, repeats=3, warmup=0)
    assert med["x"] == {"e2e": [0.0, 1.0], "attn": [0.5, 0.5]}


def test_machine_facts():
    m = machine()
    assert m["threads"] >= 1 and m["torch"] and m["cpu"]
