"""Template maps as stored: one map per (layer, head), served to every input with no lookup.

A DB keeps the templates of the heads calibration chose, in rank order (the first changes answers
least), as one ``[n, L, L]`` float16 array (``templates-<g>.npy``, memory-mapped). For a causal
model row ``i`` of a template depends only on tokens ``0..i``, so one template serves every length
by its top-left crop; for an encoder the crop's rows are renormalised. How templates are made and
ranked: ``build/templates.py``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

CROP_CACHE = (
    256  # cropped, renormalised template tensors kept in memory (per (layer, heads, length))
)


@dataclass
class Templates:
    """Template maps of some (layer, head) pairs, in rank order."""

    heads: list[tuple[int, int]]
    maps: np.ndarray  # [len(heads), Lt, Lt]
    causal: bool
    _pos: dict = field(default_factory=dict, repr=False)
    _crops: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        assert self.maps.ndim == 3 and self.maps.shape[0] == len(self.heads), (
            self.maps.shape,
            len(self.heads),
        )
        assert self.maps.shape[1] == self.maps.shape[2], self.maps.shape
        self._pos = {(int(layer), int(h)): i for i, (layer, h) in enumerate(self.heads)}

    @property
    def max_len(self) -> int:
        return int(self.maps.shape[1])

    def has(self, layer: int, heads) -> bool:
        return all((layer, h) in self._pos for h in heads)

    def first(self, n: int) -> Templates:
        """The ``n`` best-ranked templates."""
        return Templates(self.heads[:n], self.maps[:n], self.causal)

    def get(self, layer: int, heads: tuple[int, ...], length: int) -> torch.Tensor:
        """[len(heads), L, L] float32 maps (cropped, rows summing to 1); recent crops stay in
        memory."""
        key = (layer, heads, length)
        with self._lock:
            hit = self._crops.get(key)
        if hit is not None:
            return hit
        if length > self.max_len:
            raise ValueError(f"no template longer than {self.max_len} tokens")
        idx = [self._pos[(layer, h)] for h in heads]
        crop = torch.from_numpy(np.asarray(self.maps[idx, :length, :length], dtype=np.float32))
        crop = crop / crop.sum(-1, keepdim=True).clamp_min(1e-12)
        with self._lock:
            if len(self._crops) >= CROP_CACHE:
                self._crops.pop(next(iter(self._crops)))
            self._crops[key] = crop
        return crop
