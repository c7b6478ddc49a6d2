#!/usr/bin/env bash
# The main job: set up, build a SmolLM2 cache from half of SST-2, evaluate on the disjoint other half
# (exact vs cached accuracy, agreement, hit rate, reuse fraction) for the DB's default policy and the
# paper's all-layer policy, then time both with the interleaved benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
DB=runs/demo/sst2-smollm2.db  # its own folder: experiment DBs in runs/ are left alone
mkdir -p runs/demo
echo "== build: SmolLM2 maps of sst2[0:436] -> $DB"
attncache build --data "sst2[0:436]" --out "$DB" --force
echo "== eval on the disjoint sst2[436:872]"
attncache eval --db "$DB" --data "sst2[436:]" --policy default --policy all --quiet
for P in default all; do
  echo "== bench (policy $P, 24 held-out prompts, batch 1, interleaved medians of 5)"
  attncache bench --db "$DB" --data "sst2[436:]" --policy "$P" --quiet --json > "runs/demo/bench-$P.json"
  python - "runs/demo/bench-$P.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ["policy", "n", "hit_rate", "attn_speedup_vs_sdpa", "e2e_speedup_vs_sdpa", "workload_speedup_vs_sdpa",
        "bound_e2e_speedup", "fraction_of_bound", "lookup_ms_median", "fetch_ms_median", "prefill_ms_median_sdpa"]
for k in keys:
    v = r.get(k)
    print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
print(f"{'machine':28s} {r['machine']['cpu']}, {r['machine']['threads']} threads, torch {r['machine']['torch']}")
PY
done
