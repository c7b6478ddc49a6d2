"""The replay arithmetic: ``A @ V`` for grouped query heads, and projections restricted to some
heads.

Pure tensor functions; every index tensor is made on the device of the data it indexes and cached.
"""

from __future__ import annotations

import functools
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn


def apply_maps(maps: torch.Tensor, v: torch.Tensor, group: int) -> torch.Tensor:
    """A @ V with grouped-query heads, no per-head loop.

    maps: [H_q, L, L]; v: [H_kv, L, d] -> [H_q, L, d]. Query head h reads KV head h // group.
    """
    hq, length, lk = maps.shape
    hkv, _, d = v.shape
    assert hq == hkv * group and v.shape[1] == lk, (maps.shape, v.shape, group)
    if v.dtype != maps.dtype:
        dtype = product_dtype(maps.dtype, v.dtype, v.device.type)
        return apply_maps(maps.to(dtype), v.to(dtype), group).to(v.dtype)
    if group == 1:
        return torch.bmm(maps, v)
    if maps.is_contiguous():
        # The query heads of one KV group are adjacent: stack their rows, one bmm per KV head.
        return torch.bmm(maps.view(hkv, group * length, lk), v).view(hq, length, d)
    return torch.matmul(maps.view(hkv, group, length, lk), v.unsqueeze(1)).reshape(hq, length, d)


def apply_head_maps(maps: torch.Tensor, v: torch.Tensor, kv_of_head: torch.Tensor) -> torch.Tensor:
    """A @ V for a subset of query heads: maps [n, L, L], v [H_kv, L, d], kv_of_head [n] -> [n, L,
    d]."""
    vs = v.index_select(0, kv_of_head)
    if vs.dtype != maps.dtype:
        dtype = product_dtype(maps.dtype, v.dtype, v.device.type)
        return torch.bmm(maps.to(dtype), vs.to(dtype)).to(v.dtype)
    return torch.bmm(maps, vs)


@functools.lru_cache(maxsize=16)
def product_dtype(stored: torch.dtype, compute: torch.dtype, device: str) -> torch.dtype:
    """The precision ``A @ V`` runs in for maps stored as ``stored`` and values in ``compute``.

    Multiplying the stored maps as they are saves a full-size copy per layer, but only where the
    device multiplies that precision natively: GPUs, and CPUs with half-precision matrix units
    (AVX512-FP16, AMX). Elsewhere (measured: AMD EPYC with AVX-512 but no FP16 arithmetic) an
    fp16 product is 20-40x slower than converting the maps first. So on CPU both are
    timed once per process on a typical shape and the faster one is kept."""
    if stored == compute or device != "cpu":
        return stored
    maps, v = torch.rand(3, 3 * 128, 128).to(stored), torch.rand(3, 128, 64)

    def seconds(fn) -> float:
        fn()  # first call: allocation, kernel selection
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        return time.perf_counter() - t0

    native = seconds(lambda: torch.bmm(maps, v.to(stored)))
    converted = seconds(lambda: torch.bmm(maps.to(compute), v))
    return stored if native <= converted else compute


@functools.lru_cache(maxsize=256)
def index_tensor(values: tuple[int, ...], device: str) -> torch.Tensor:
    """A cached long tensor of ``values`` on ``device`` (policies use the same few head sets per
    layer)."""
    return torch.tensor(values, dtype=torch.long, device=device)


_ROWS: weakref.WeakKeyDictionary = (
    weakref.WeakKeyDictionary()
)  # lin -> {key: (weight rows, bias rows)}


def linear_rows(lin: nn.Module, x: torch.Tensor, heads: list[int], d: int) -> torch.Tensor:
    """The output columns of ``lin`` belonging to ``heads`` (head_dim ``d`` each), computing only
    those.

    The selected weight rows are kept per module and head set: a policy uses the same few sets on
    every forward, and copying them each time would cost as much as the product on short inputs. A
    dynamically quantized Linear has no weight tensor to slice: it computes every column and keeps
    the wanted ones.
    """
    weight = getattr(lin, "weight", None)
    if not isinstance(weight, torch.Tensor):
        cols = index_tensor(tuple(h * d + i for h in heads for i in range(d)), str(x.device))
        return lin(x).index_select(-1, cols)
    per = _ROWS.setdefault(lin, {})
    key = (tuple(heads), d, weight.data_ptr(), weight._version)
    wb = per.get(key)
    if wb is None:
        idx = index_tensor(tuple(h * d + i for h in heads for i in range(d)), str(weight.device))
        bias = lin.bias.detach().index_select(0, idx) if lin.bias is not None else None
        wb = (weight.detach().index_select(0, idx), bias)
        if len(per) > 64:
            per.clear()
        per[key] = wb
    return F.linear(x, *wb)
