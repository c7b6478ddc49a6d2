"""Growing a DB while it serves: record inputs that missed, insert them under the byte cap, retrain.

Inserts evict (LRU or LFU, ``db/eviction.py``) to stay within the cap and are visible to the
inserting process's next lookup at once, to other processes when they reopen. ``retrain`` refits the
projector on every stored entry and re-indexes (after much online growth the build-time fit no
longer covers it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from ..db import Database, VectorIndex, encode_entry
from ..runtime.adapters import Adapter
from .pipeline import default_threshold, unique
from .projector_fit import ProjectorConfig, fit_projector
from .record import RecordOptions, record


def insert(
    db: Database, maps: Sequence[np.ndarray], feats: np.ndarray, lock_wait_s: float = 10.0
) -> list[int]:
    """Add entries (maps ``[n_stored_layers, H, L, L]`` and projector inputs); returns their
    uids."""
    layout = db.store.layout
    blobs = [encode_entry(layout, np.asarray(m, dtype=np.float32)) for m in maps]
    lengths = [int(np.shape(m)[-1]) for m in maps]
    return db.commit_entries(blobs, lengths, np.asarray(feats, dtype=np.float32), lock_wait_s)


def learn(
    db: Database,
    model: nn.Module,
    adapter: Adapter,
    seqs: Sequence[Sequence[int]],
    progress: bool = False,
    lock_wait_s: float = 10.0,
) -> int:
    """Record ``seqs`` on ``model`` (running its own attention) and insert them; how many were
    stored."""
    todo = unique(seqs)
    if not todo:
        return 0
    maps, feats = [], []
    learning = RecordOptions(progress=progress, desc="learning")
    for got in record(model, adapter, db.store.layout.layers, todo, learning):
        maps.append(got.maps)
        feats.append(got.feats)
    return len(insert(db, maps, np.stack(feats), lock_wait_s))


def retrain(db: Database, progress: bool = True, lock_wait_s: float = 10.0) -> dict:
    """Fit the projector again on every stored entry, re-project, re-index, re-derive the
    threshold."""
    with db.writing(lock_wait_s):
        feats = db.features()
        cfg = ProjectorConfig(**db.train_report.get("config", {}))
        fit = fit_projector(db.store, feats, db.causal, cfg, progress)
        vectors = fit.projector.project(feats)

        index = VectorIndex.build(vectors, db.store.table.uid)
        table = db.store.table
        old = db.threshold
        m = dict(db.manifest)
        m["projector"] = {**m["projector"], "train": fit.report}
        m["threshold"] = default_threshold(
            index,
            vectors,
            table,
            db.allow_crop,
            table.uid.tolist(),
            db.manifest.get("threshold_quantile", 0.5),
        )
        db.write_generation(m, feats, vectors, fit.projector, index)
        return {
            "entries": len(db.store),
            "pearson": fit.report.get("pearson"),
            "threshold_before": old,
            "threshold": db.threshold,
        }
