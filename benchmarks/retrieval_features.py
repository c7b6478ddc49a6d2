"""How good are the neighbours that different retrieval features find? (issue 4, "better features")

For held-out inputs, the map distance (mean row-wise total variation over layers, heads and sampled
rows, on the common top-left block) to the build entry chosen by each feature's nearest neighbour,
vs a random length-compatible entry, the oracle (the entry with the truly closest maps) and the
templates (every head's mean map, no retrieval).

    python benchmarks/retrieval_features.py --db runs/sst2-smollm2.db --build "sst2[0:436]" --data
    "sst2[654:872]" \
        --limit 60 --out runs/exp/retrieval_features_sst2.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from attncache.build.record import Recorder
from attncache.build.templates import mean_maps
from attncache.inputs import collate
from attncache.runtime.features import features
from attncache.workflows import Session


def feats_of(model, adapter, seq):
    return features(model, adapter, torch.tensor([seq]), [(0, len(seq))])


def hidden_means(model, seqs, layers):
    out = {k: [] for k in layers}
    with torch.no_grad():
        for s in seqs:
            hs = model(
                **collate([s], 0, True), output_hidden_states=True, logits_to_keep=1
            ).hidden_states
            for k in layers:
                out[k].append(hs[k][0].float().mean(0).numpy())
    return {k: np.stack(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument(
        "--build", required=True, help="the DATA the DB was built from (to recover token ids)"
    )
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--rows", type=int, default=8, help="rows sampled per map")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    s = Session.open(a.db)
    c, model = s.cache, s.model
    store = c.store
    # token ids of the entries: match each build sequence's projector input to the stored ones
    build = s.plan(a.build, quiet=True).seqs
    stored_f = c.db.features()
    bf = np.concatenate([feats_of(model, c.adapter, x) for x in build])
    match = [int(np.argmin(((bf - f) ** 2).sum(1))) for f in stored_f]
    ent_seqs = [build[m] for m in match]
    assert all(len(x) == int(L) for x, L in zip(ent_seqs, store.lengths)), (
        "could not recover the entries' inputs"
    )
    test = s.plan(a.data, a.limit, quiet=True).seqs[: a.limit]
    n_layers = c.shape.n_layers
    layers_h = sorted({min(k, n_layers) for k in (1, 4, 8)})
    mid = min(4, n_layers)
    feats = {
        "layer0 (projector input, raw)": (
            stored_f,
            np.concatenate([feats_of(model, c.adapter, x) for x in test]),
        )
    }
    feats["layer0 projected (what lookup uses)"] = (
        c.projector.project(feats["layer0 (projector input, raw)"][0]),
        c.projector.project(feats["layer0 (projector input, raw)"][1]),
    )
    he, ht = hidden_means(model, ent_seqs, layers_h), hidden_means(model, test, layers_h)
    for k in layers_h:
        feats[f"mean hidden state after layer {k}"] = (he[k], ht[k])

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    raw_e, raw_t = feats["layer0 (projector input, raw)"]
    feats[f"layers 0+{mid} concatenated"] = (
        np.concatenate([unit(raw_e[:, :-1]), unit(he[mid])], 1),
        np.concatenate([unit(raw_t[:, :-1]), unit(ht[mid])], 1),
    )
    nl = len(store.layout.layers)
    means = mean_maps(store)  # the template of every head (no retrieval)
    res = {
        k: []
        for k in list(feats)
        + ["random compatible entry", "oracle (closest maps)", "templates (mean maps)"]
    }
    with Recorder(model, c.adapter, list(store.layout.layers)) as rec:
        for t, x in enumerate(test):
            L = len(x)
            A = rec.run(collate([x], 0, True)).maps[0]  # [nl, H, L, L]
            comp = [e for e in range(len(store)) if c.compatible(e, L)]
            if not comp:
                continue
            rows = np.unique(np.linspace(0, L - 1, a.rows).astype(int))
            d = np.zeros(len(comp))
            for j, e in enumerate(comp):
                B = store.rows(e, rows, L)  # [nl, H, r, L]: the entry's rows, cropped to L columns
                d[j] = 0.5 * np.abs(A[:, :, rows, :] - B).sum(-1).mean()
            for name, (fe, ft) in feats.items():
                dist = ((fe[comp] - ft[t]) ** 2).sum(1)
                res[name].append(float(d[int(np.argmin(dist))]))
            res["random compatible entry"].append(float(d[rng.integers(len(comp))]))
            res["oracle (closest maps)"].append(float(d.min()))
            tm = means[:, :, :L, :L]
            tm = tm / tm.sum(-1, keepdims=True)
            res["templates (mean maps)"].append(
                float(0.5 * np.abs(A[:, :, rows, :] - tm[:, :, rows, :]).sum(-1).mean())
            )
    out = {
        "db": a.db,
        "data": a.data,
        "n": len(res["oracle (closest maps)"]),
        "layers": nl,
        "median_tv": {k: float(np.median(v)) for k, v in res.items()},
        "mean_tv": {k: float(np.mean(v)) for k, v in res.items()},
    }
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
