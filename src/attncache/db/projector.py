"""The Siamese feature projector's weights and forward: ``f(x)``, a small MLP.

The predicted map distance between inputs x and y is ``||f(x) - f(y)||_2``. Training lives in
``build/projector_fit.py``; this module only holds, saves and loads the weights (safetensors).
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


class Projector(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 256, out_dim: int = 64):
        super().__init__()
        self.in_dim, self.hidden, self.out_dim = in_dim, hidden, out_dim
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    @torch.no_grad()
    def project(self, feats: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
        return self(x).numpy().astype(np.float32)

    def save(self, path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path, in_dim: int, hidden: int, out_dim: int) -> Projector:
        projector = cls(in_dim, hidden, out_dim)
        state = load_file(str(path))
        expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise ValueError(
                f"projector weights do not match the manifest (expected {expected}, got {got})"
            )
        projector.load_state_dict(state)
        projector.eval()
        return projector
