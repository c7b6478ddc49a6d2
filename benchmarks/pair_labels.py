"""Time build's pair labels (the row-wise TV of sampled entry pairs) on an existing DB.

Runs against whichever attncache is importable, so the same command measures an older checkout too:

    python benchmarks/pair_labels.py --db runs/sst2-smollm2.db --pairs 4000 --out
    runs/exp/pair_labels.json PYTHONPATH=/tmp/old/src python benchmarks/pair_labels.py --db ...
    --out runs/exp/pair_labels_before.json

Writes the labels next to the JSON (``.npy``) so two runs can be checked for equal results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def open_store(db: str):
    try:  # the current layout
        from attncache.build.projector_fit import ProjectorConfig, pair_labels, sample_pairs
        from attncache.db import Database

        d = Database.open(db)
        return d.store, d.causal, ProjectorConfig, pair_labels, sample_pairs
    except ImportError:  # before the redesign
        from attncache.projector import ProjectorConfig, pair_labels, sample_pairs

        from attncache.cache import AttnCache

        c = AttnCache.open(db)
        return c.store, c.adapter.causal, ProjectorConfig, pair_labels, sample_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    store, causal, config, pair_labels, sample_pairs = open_store(a.db)
    cfg = config(pairs=a.pairs)
    pairs = sample_pairs(store.lengths, cfg.pairs, np.random.default_rng(cfg.seed))
    pair_labels(store, pairs[:50], cfg, causal, progress=False)  # warm the page cache
    t0 = time.perf_counter()
    labels, per_head = pair_labels(store, pairs, cfg, causal, progress=False)
    seconds = time.perf_counter() - t0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out.with_suffix(".npy"), labels)
    res = {
        "db": a.db,
        "entries": len(store),
        "pairs": int(len(pairs)),
        "seconds": seconds,
        "pairs_per_s": len(pairs) / seconds,
        "codec": store.layout.codec,
    }
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
