"""The Siamese feature projector: pair labels, training, projection.

The projector f is a small MLP; the predicted distance between inputs x and y is ``||f(x) - f(y)||_2``.
It is trained (SmoothL1) to match the *map distance* label

    d(x, y) = mean over layers, heads and rows of TV(A_x[row], A_y[row])  +  alpha * |L_x - L_y|

with TV = 0.5 * L1 between the two rows.

Inputs of different lengths: the maps are compared on their common top-left ``Lmin x Lmin`` block.
For causal models that block is *exactly* the map of the shared-length prefix (row i only attends to
columns <= i), which is also what replay uses when it crops a longer entry. For bidirectional models the
cropped rows are renormalised to sum to 1 (a zero row is left at zero); replay never crops there, so the
length term keeps different-length pairs apart. Rows are subsampled (``rows`` per pair, the same rows on
both sides) so a label costs O(layers * heads * rows * L) rather than O(L^2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .store import MapStore


@dataclass
class ProjectorConfig:
    hidden: int = 256
    out_dim: int = 64
    alpha: float = 0.01  # label weight per token of length difference
    pairs: int = 4000
    rows: int = 16
    epochs: int = 60
    batch: int = 256
    lr: float = 1e-3
    seed: int = 0


class Projector(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 256, out_dim: int = 64):
        super().__init__()
        self.in_dim, self.hidden, self.out_dim = in_dim, hidden, out_dim
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, out_dim))

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
        p = cls(in_dim, hidden, out_dim)
        state = load_file(str(path))
        expected = {k: tuple(v.shape) for k, v in p.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise ValueError(f"projector weights do not match the manifest (expected {expected}, got {got})")
        p.load_state_dict(state)
        p.eval()
        return p


def pair_distance(store: MapStore, i: int, j: int, rows: int, causal: bool, rng: np.random.Generator) -> np.ndarray:
    """Per stored layer and head, the mean row TV between entries i and j on their common block [n_layers, H]."""
    Li, Lj = int(store.lengths[i]), int(store.lengths[j])
    L = min(Li, Lj)
    r = np.sort(rng.choice(L, size=min(rows, L), replace=False))
    a = torch.from_numpy(store.rows(i, r, L))
    b = torch.from_numpy(store.rows(j, r, L))
    if not causal and Li != Lj:
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        b = b / b.sum(-1, keepdim=True).clamp_min(1e-12)
    tv = 0.5 * (a - b).abs().sum(-1)  # [nl, H, rows]
    return tv.mean(dim=2).numpy()


def sample_pairs(lengths: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Half uniform pairs, half pairs of near-equal length (the ones a lookup must rank well)."""
    N = len(lengths)
    if N < 2:
        return np.zeros((0, 2), dtype=np.int64)
    total = N * (N - 1) // 2
    if total <= n:
        return np.array([(i, j) for i in range(N) for j in range(i + 1, N)], dtype=np.int64)
    half = n // 2
    i = rng.integers(0, N, size=half)
    j = (i + rng.integers(1, N, size=half)) % N
    order = np.argsort(lengths, kind="stable")
    pos = rng.integers(0, N - 1, size=n - half)
    off = rng.integers(1, min(8, N - 1) + 1, size=n - half)
    i2, j2 = order[pos], order[np.minimum(pos + off, N - 1)]
    pairs = np.concatenate([np.stack([i, j], 1), np.stack([i2, j2], 1)])
    return pairs[pairs[:, 0] != pairs[:, 1]]


def pair_labels(store: MapStore, pairs: np.ndarray, cfg: ProjectorConfig, causal: bool,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(labels [P], per-(layer, head) TV [P, n_layers, H])."""
    rng = np.random.default_rng(cfg.seed + 1)
    per_head = np.zeros((len(pairs), len(store.layout.layers), store.layout.n_heads), dtype=np.float32)
    for k, (i, j) in enumerate(tqdm(pairs, desc="pair labels", disable=not progress, leave=False)):
        per_head[k] = pair_distance(store, int(i), int(j), cfg.rows, causal, rng)
    dl = np.abs(store.lengths[pairs[:, 0]] - store.lengths[pairs[:, 1]]).astype(np.float32)
    return per_head.mean(axis=(1, 2)) + cfg.alpha * dl, per_head


def train(feats: np.ndarray, pairs: np.ndarray, labels: np.ndarray, cfg: ProjectorConfig,
          progress: bool = True) -> tuple[Projector, dict]:
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    proj = Projector(feats.shape[1], cfg.hidden, cfg.out_dim)
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    proj.mean.copy_(x.mean(0))
    proj.std.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1]))
    if len(pairs) == 0:
        proj.eval()
        return proj, {"pairs": 0, "final_loss": None}
    p = torch.from_numpy(pairs)
    y = torch.from_numpy(labels.astype(np.float32))
    opt = torch.optim.Adam(proj.parameters(), lr=cfg.lr)
    loss_fn = nn.SmoothL1Loss(beta=0.05)
    last = float("nan")
    proj.train()
    for _ in tqdm(range(cfg.epochs), desc="projector", disable=not progress, leave=False):
        perm = torch.randperm(len(p), generator=g)
        tot, cnt = 0.0, 0
        for s in range(0, len(p), cfg.batch):
            idx = perm[s : s + cfg.batch]
            a, b = proj(x[p[idx, 0]]), proj(x[p[idx, 1]])
            pred = (a - b).pow(2).sum(-1).add(1e-9).sqrt()
            loss = loss_fn(pred, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
            cnt += len(idx)
        last = tot / cnt
    proj.eval()
    with torch.no_grad():
        pred = (proj(x[p[:, 0]]) - proj(x[p[:, 1]])).norm(dim=-1).numpy()
    corr = float(np.corrcoef(pred, labels)[0, 1]) if len(labels) > 2 and labels.std() > 0 else float("nan")
    return proj, {"pairs": int(len(pairs)), "final_loss": last, "pearson": corr, "config": asdict(cfg)}
