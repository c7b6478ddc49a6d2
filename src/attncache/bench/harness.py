"""Timing primitives: interleaved medians, time inside modules, the machine's facts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def interleaved(
    variants: dict[str, Callable[[int], dict[str, float] | None]],
    n_items: int,
    repeats: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[str, list[float]]]:
    """Per variant and measure, the median per item, timing the variants in turn (A B A B ...).

    A variant may return its own measures (e.g. ``{"e2e": s, "attn": s}``); otherwise the call is
    timed here as ``e2e`` with ``clock``.
    """
    samples: dict[str, dict[str, list[list[float]]]] = {k: {} for k in variants}
    for i in range(n_items):
        for _ in range(warmup):
            for fn in variants.values():
                fn(i)
        for _ in range(repeats):
            for name, fn in variants.items():
                t0 = clock()
                got = fn(i)
                got = got if got is not None else {"e2e": clock() - t0}
                for measure, v in got.items():
                    samples[name].setdefault(measure, [[] for _ in range(n_items)])[i].append(v)
    return {
        k: {m: [statistics.median(x) for x in per] for m, per in v.items()}
        for k, v in samples.items()
    }


class AttentionTimer:
    """Accumulates wall time spent inside the given modules (forward pre/post hooks)."""

    def __init__(self, modules, sync: bool = False):
        self.sync = sync  # on a GPU, wait for the queued kernels so the hooks time the work itself
        self.total = 0.0
        self._t0 = 0.0
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, *_):
        if self.sync:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def _post(self, *_):
        if self.sync:
            torch.cuda.synchronize()
        self.total += time.perf_counter() - self._t0

    def remove(self):
        for h in self._handles:
            h.remove()


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = "cpu"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": dev,
    }


def ratio_of(num: list[float], den: list[float]) -> float | None:
    return sum(num) / sum(den) if num and sum(den) > 0 else None
