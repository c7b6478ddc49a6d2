#!/usr/bin/env bash
# Every experiment behind docs/results.md, in order. Each writes JSON to runs/exp/ (and PNGs to docs/).
# Run on a quiet machine: the timings are medians of interleaved runs, but other load still skews them.
#   bash benchmarks/experiments.sh [sst2|piqa|mmlu|minilm|length|quant|prefix|all]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=runs/exp
mkdir -p "$OUT" docs
what=${1:-all}
run() { echo "+ $*" >&2; "$@"; }

if [[ $what == all || $what == sst2 ]]; then
  # (2) SmolLM2 on SST-2: cache from one half, sweep on the other; bench both policies
  [ -d runs/sst2-smollm2.db ] || run attncache build --data "sst2[0:436]" --out runs/sst2-smollm2.db --quiet
  run attncache eval --db runs/sst2-smollm2.db --data "sst2[436:]" --sweep --plot docs/sst2_sweep.png --json --quiet > $OUT/sst2_sweep.json
  for P in all default; do
    run attncache bench --db runs/sst2-smollm2.db --data "sst2[436:]" --policy $P --limit 40 --json --quiet > $OUT/sst2_bench_$P.json
  done
fi

if [[ $what == all || $what == piqa ]]; then
  [ -d runs/piqa-smollm2.db ] || run attncache build --data "piqa[0:400]" --out runs/piqa-smollm2.db --quiet
  run attncache eval --db runs/piqa-smollm2.db --data "piqa[400:800]" --sweep --plot docs/piqa_sweep.png --json --quiet > $OUT/piqa_sweep.json
  run attncache eval --db runs/piqa-smollm2.db --data "piqa[400:800]" --policy all --policy default --json --quiet > $OUT/piqa_eval.json
  run attncache bench --db runs/piqa-smollm2.db --data "piqa[400:800]" --policy default --limit 30 --json --quiet > $OUT/piqa_bench_default.json
fi

if [[ $what == all || $what == mmlu ]]; then
  # (1) MMLU 0..5-shot: 52 cached prompts (every 30th), 51 disjoint evaluated, 8 timed (maps are ~110 MB per 5-shot entry)
  for K in 0 1 2 3 4 5; do
    DB=runs/mmlu${K}.db
    [ -d $DB ] || run attncache build --data "mmlu:${K}shot[0::30]" --out $DB --quiet
    run attncache inspect $DB --json > $OUT/mmlu${K}_inspect.json
    run attncache eval --db $DB --data "mmlu:${K}shot[15::30]" --policy all --policy default --no-prefix-cache --json --quiet > $OUT/mmlu${K}_eval.json
    run attncache bench --db $DB --data "mmlu:${K}shot[15::30]" --policy all --limit 8 --repeats 3 --no-prefix-cache --json --quiet > $OUT/mmlu${K}_bench_all.json
  done
fi

if [[ $what == all || $what == prefix ]]; then
  # the exact tier: MMLU 5-shot in dataset order (questions of a subject follow each other), PIQA choices
  run attncache eval --db runs/mmlu5.db --data "mmlu:5shot[0:120]" --policy default --batch-size 1 --json --quiet > $OUT/prefix_mmlu5_eval.json
  run attncache bench --db runs/mmlu5.db --data "mmlu:5shot[0:60]" --policy default --limit 60 --repeats 1 --no-eager --json --quiet > $OUT/prefix_mmlu5_bench.json
  run attncache eval --db runs/piqa-smollm2.db --data "piqa[400:600]" --policy none --batch-size 1 --json --quiet > $OUT/prefix_piqa_eval.json
  run attncache bench --db runs/piqa-smollm2.db --data "piqa[400:600]" --policy none --limit 100 --repeats 1 --no-eager --json --quiet > $OUT/prefix_piqa_bench.json
fi

if [[ $what == all || $what == minilm ]]; then
  # (3) MiniLM embeddings: SST-2 sentences and RTE pairs
  [ -d runs/sst2-minilm.db ] || run attncache build --model minilm-l6 --data "sst2[0:436]" --out runs/sst2-minilm.db --quiet
  run attncache eval --db runs/sst2-minilm.db --data "sst2[436:]" --policy all --policy default --json --quiet > $OUT/minilm_sst2_eval.json
  run attncache eval --db runs/sst2-minilm.db --data "sst2[436:]" --sweep --plot docs/minilm_sst2_sweep.png --json --quiet > $OUT/minilm_sst2_sweep.json
  [ -d runs/rte-minilm.db ] || run attncache build --model minilm-l6 --data "rte[0:138]" --out runs/rte-minilm.db --quiet
  run attncache eval --db runs/rte-minilm.db --data "rte[138:]" --policy all --policy default --json --quiet > $OUT/minilm_rte_eval.json
  for B in 1 32; do
    run attncache bench --db runs/sst2-minilm.db --data "sst2[436:]" --policy all --limit 64 --batch-size $B --json --quiet > $OUT/minilm_bench_b$B.json
  done
fi

if [[ $what == all || $what == length ]]; then
  # (4) speedup vs length, real text, all layers, hits
  run python benchmarks/length_scaling.py --lengths 64,128,256,512,1024,2048 --per-length 1 --repeats 3 \
      --out $OUT/length_scaling.json --plot docs/length_scaling.png
fi

if [[ $what == all || $what == quant ]]; then
  # (5) dynamic int8 SmolLM2 on the SST-2 cache (maps recorded in fp32)
  run attncache eval --db runs/sst2-smollm2.db --data "sst2[436:]" --policy all --policy default --quantize int8 --json --quiet > $OUT/quant_sst2_eval.json
  run attncache bench --db runs/sst2-smollm2.db --data "sst2[436:]" --policy all --limit 40 --quantize int8 --json --quiet > $OUT/quant_sst2_bench.json
  run attncache bench --db runs/mmlu5.db --data "mmlu:5shot[15::30]" --policy all --limit 8 --repeats 3 --quantize int8 --no-prefix-cache --json --quiet > $OUT/quant_mmlu5_bench.json
fi
