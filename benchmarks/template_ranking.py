"""Which ranking picks the heads that tolerate a template best? (issue 4)

Ranks every head on RANK data by (a) attribution of the decision margin (what `attncache templates`
does), (b) the same with each row's effect divided by its exact margin, (c) the template's row-wise
total variation to the exact maps; then measures agreement and accuracy of the first k heads'
templates on TEST data.

    python benchmarks/template_ranking.py --db runs/sst2-smollm2.db --rank "sst2[436:654]" --test
    "sst2[654:872]" \
        --out runs/exp/template_ranking_sst2.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from attncache.build.calibrate import choice_targets
from attncache.build.templates import RankData, Target, mean_maps, rank, select
from attncache.tasks import RunOptions, choice_scores, run
from attncache.workflows import Session
from attncache.workflows.sweep import points, policy_curves


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--rank", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--ks", default="14,27,54,81,108,135")
    ap.add_argument("--out")
    a = ap.parse_args()
    s = Session.open(a.db)
    c = s.cache
    rp, tp = s.plan(a.rank, quiet=True), s.plan(a.test, quiet=True)
    ex_r = run(s.model, s.tokenizer, rp, RunOptions(batch_size=8, progress=False))
    ex_t = run(s.model, s.tokenizer, tp, RunOptions(batch_size=8, progress=False))
    means = mean_maps(c.store)
    layers = c.store.layout.layers
    H = c.shape.n_heads
    targets = choice_targets(rp, ex_r, list(range(len(rp.rows))))
    relative = []
    for t in targets:
        sc = sorted(choice_scores(rp.rows[t.row], ex_r))[::-1]
        m = max(sc[0] - sc[1], 1e-3)
        relative.append(Target(t.seq, [(f, tok, w / m) for f, tok, w in t.terms], t.row))

    def ranked(targets):
        return rank(RankData(s.model, c.adapter, means, layers, rp.seqs, targets))

    scores = {
        "attribution": ranked(targets),
        "attribution / margin": ranked(relative),
        "template TV": ranked(None),
    }
    ks = [int(k) for k in a.ks.split(",")]
    out = []
    for name, sc in scores.items():
        flat = np.argsort(sc.ravel(), kind="stable")[: max(ks)]
        c.use_templates(select(means, layers, [(layers[i // H], i % H) for i in flat], True))
        for k, cv in zip(ks, policy_curves(s, tp, ex_t, [f"fixed:{k}" for k in ks], 8, False)):
            p = points(s, tp, ex_t, cv, [-1.0])[0].as_dict()
            row = {
                "ranking": name,
                "k": k,
                "reuse_fraction": p["reuse_fraction"],
                "agreement": p["agreement"],
                "accuracy_exact": p["accuracy_baseline"],
                "accuracy_cached": p["accuracy_cached"],
            }
            out.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"db": a.db, "rank": a.rank, "test": a.test, "rows": out}, f)


if __name__ == "__main__":
    main()
