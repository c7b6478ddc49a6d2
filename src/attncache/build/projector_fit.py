"""Training the Siamese projector: pairs, map-distance labels, the fit, and layer/head stability.

The projector is trained (SmoothL1) so that ``||f(x) - f(y)||`` matches the *map distance* label

    d(x, y) = mean over layers, heads and rows of TV(A_x[row], A_y[row])  +  alpha * |L_x - L_y|

with TV = 0.5 * L1 between the two rows. Inputs of different lengths are compared on their common
top-left ``Lmin x Lmin`` block. For causal models that block is *exactly* the map of the
shared-length prefix (row i only attends to columns <= i), which is also what replay uses when it
crops a longer entry. For bidirectional models the cropped rows are renormalised to sum to 1; replay
never crops there, so the length term keeps different-length pairs apart. Rows are subsampled
(``rows`` per pair, the same rows on both sides) so a label costs O(layers * heads * rows * L), and
each side is decoded in one gather (``MapStore.rows``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..db import MapStore, Projector
from ..progress import Stage


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


@dataclass
class FitResult:
    projector: Projector
    report: dict  # what the manifest keeps: pairs, loss, pearson, config, layer/head distances
    layer_distance: np.ndarray  # [n_stored_layers] mean map distance over the closest pairs


def pair_distance(
    store: MapStore, i: int, j: int, rows: int, causal: bool, rng: np.random.Generator
) -> np.ndarray:
    """Per stored layer and head, the mean row TV between entries i and j on their common block."""
    li, lj = int(store.lengths[i]), int(store.lengths[j])
    length = min(li, lj)
    picked = np.sort(rng.choice(length, size=min(rows, length), replace=False))
    a = store.rows(i, picked, length)
    b = store.rows(j, picked, length)
    if not causal and li != lj:
        a = a / np.maximum(a.sum(-1, keepdims=True), 1e-12)
        b = b / np.maximum(b.sum(-1, keepdims=True), 1e-12)
    return (0.5 * np.abs(a - b).sum(-1)).mean(axis=2)  # [n_layers, H]


def sample_pairs(lengths: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Half uniform pairs, half pairs of near-equal length (the ones a lookup must rank well)."""
    count = len(lengths)
    if count < 2:
        return np.zeros((0, 2), dtype=np.int64)
    if count * (count - 1) // 2 <= n:
        return np.array([(i, j) for i in range(count) for j in range(i + 1, count)], dtype=np.int64)
    half = n // 2
    i = rng.integers(0, count, size=half)
    j = (i + rng.integers(1, count, size=half)) % count
    order = np.argsort(lengths, kind="stable")
    pos = rng.integers(0, count - 1, size=n - half)
    off = rng.integers(1, min(8, count - 1) + 1, size=n - half)
    i2, j2 = order[pos], order[np.minimum(pos + off, count - 1)]
    pairs = np.concatenate([np.stack([i, j], 1), np.stack([i2, j2], 1)])
    return pairs[pairs[:, 0] != pairs[:, 1]]


def pair_labels(
    store: MapStore, pairs: np.ndarray, cfg: ProjectorConfig, causal: bool, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(labels [P], per-(layer, head) TV [P, n_layers, H])."""
    rng = np.random.default_rng(cfg.seed + 1)
    per_head = np.zeros(
        (len(pairs), len(store.layout.layers), store.layout.n_heads), dtype=np.float32
    )
    with Stage(len(pairs), "pair labels", progress) as bar:
        for k, (i, j) in enumerate(pairs):
            per_head[k] = pair_distance(store, int(i), int(j), cfg.rows, causal, rng)
            bar.update()
    dl = np.abs(store.lengths[pairs[:, 0]] - store.lengths[pairs[:, 1]]).astype(np.float32)
    return per_head.mean(axis=(1, 2)) + cfg.alpha * dl, per_head


def train(
    feats: np.ndarray,
    pairs: np.ndarray,
    labels: np.ndarray,
    cfg: ProjectorConfig,
    progress: bool = True,
) -> tuple[Projector, dict]:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    projector = Projector(feats.shape[1], cfg.hidden, cfg.out_dim)
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    projector.mean.copy_(x.mean(0))
    projector.std.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1]))
    if len(pairs) == 0:
        projector.eval()
        return projector, {"pairs": 0, "final_loss": None}
    p = torch.from_numpy(pairs)
    y = torch.from_numpy(labels.astype(np.float32))
    opt = torch.optim.Adam(projector.parameters(), lr=cfg.lr)
    loss_fn = nn.SmoothL1Loss(beta=0.05)
    last = float("nan")
    projector.train()
    with Stage(cfg.epochs, "projector", progress) as bar:
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(p), generator=gen)
            total, count = 0.0, 0
            for start in range(0, len(p), cfg.batch):
                idx = perm[start : start + cfg.batch]
                a, b = projector(x[p[idx, 0]]), projector(x[p[idx, 1]])
                loss = loss_fn((a - b).pow(2).sum(-1).add(1e-9).sqrt(), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                count += len(idx)
            last = total / count
            bar.update()
    projector.eval()
    with torch.no_grad():
        pred = (projector(x[p[:, 0]]) - projector(x[p[:, 1]])).norm(dim=-1).numpy()
    corr = (
        float(np.corrcoef(pred, labels)[0, 1])
        if len(labels) > 2 and labels.std() > 0
        else float("nan")
    )
    return projector, {
        "pairs": int(len(pairs)),
        "final_loss": last,
        "pearson": corr,
        "config": asdict(cfg),
    }


def fit_projector(
    store: MapStore, feats: np.ndarray, causal: bool, cfg: ProjectorConfig, progress: bool
) -> FitResult:
    """Labels for sampled pairs, the projector fit, and per-(layer, head) stability."""
    rng = np.random.default_rng(cfg.seed)
    pairs = sample_pairs(store.lengths, cfg.pairs, rng)
    labels, per_head = pair_labels(store, pairs, cfg, causal, progress)
    projector, report = train(feats, pairs, labels, cfg, progress)
    # Stability: mean map distance per (layer, head) over the closest quarter of pairs.
    close = labels <= np.quantile(labels, 0.25)
    head_tv = per_head[close].mean(0) if close.any() else per_head.mean(0)
    layer_tv = head_tv.mean(1)
    report["layer_distance"] = [round(float(x), 5) for x in layer_tv]
    report["head_distance"] = [[round(float(x), 5) for x in row] for row in head_tv]
    report["in_dim"] = int(feats.shape[1])
    return FitResult(projector, report, layer_tv)


def default_policy(layer_tv: np.ndarray, layers: list[int], fraction: float) -> dict:
    """The ``fraction`` of stored layers whose maps differ least between close build inputs."""
    k = max(1, math.ceil(len(layers) * fraction))
    best = sorted(np.argsort(layer_tv, kind="stable")[:k].tolist())
    return {
        "layers": [layers[i] for i in best],
        "source": f"build: the {k} layers with the smallest map distance between close build "
        "inputs",
    }
