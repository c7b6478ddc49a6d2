"""The timing harness: interleaving, medians, and that it detects a slowed variant."""

import os
import statistics

import torch

from attncache.bench import interleaved, machine


class FakeClock:
    """Time that moves only when a variant says so: timings independent of machine load."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_detects_slowed_variant():
    order, clock = [], FakeClock()
    costs = {"a": [1.0, 1.0, 9.0, 1.0, 1.0], "b": [4.0, 4.0, 4.0, 30.0, 4.0]}  # one outlier each

    def variant(name):
        def fn(i):
            order.append(name)
            clock.now += costs[name][sum(1 for x in order if x == name) % 5]

        return fn

    med = interleaved(
        {"a": variant("a"), "b": variant("b")}, n_items=3, repeats=5, warmup=1, clock=clock
    )
    assert len(med["a"]["e2e"]) == 3
    assert sum(med["b"]["e2e"]) / sum(med["a"]["e2e"]) == 4.0  # medians: the outliers do not count
    assert order[:6] == ["a", "b"] * 3  # A B A B: never a block of one variant
    assert len(order) == 2 * 3 * (5 + 1)  # every item: warm-up, then the repeats


def test_interleaved_uses_reported_measures():
    med = interleaved(
        {"x": lambda i: {"e2e": float(i), "attn": 0.5}}, n_items=2, repeats=3, warmup=0
    )
    assert med["x"] == {"e2e": [0.0, 1.0], "attn": [0.5, 0.5]}
    assert statistics.median([1.0, 5.0, 2.0]) == 2.0


def test_machine_facts():
    m = machine()
    assert m["threads"] == torch.get_num_threads() and m["cores"] == os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    assert m["torch"] == torch.__version__ and m["device"] == gpu
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            assert m["cpu"] == names[0]
    assert m["cpu"]
