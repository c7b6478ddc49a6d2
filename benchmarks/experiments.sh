#!/usr/bin/env bash
# Every experiment behind docs/results.md. Each writes JSON to runs/exp/ (and PNGs to docs/).
# Run on a quiet machine: timings are medians of interleaved runs, but other load still skews them.
#   bash benchmarks/experiments.sh [sst2|piqa|mmlu|prefix|minilm|length|quant|calibrate|fidelity|fidbench|store|storebench|scale|speed|load|redesign|redesign_before|buildspeed|buildbefore|calspeed|calgoal|calexhaustive|batchscale|mmlu100|warm|memo|plain|allhit|peers|all]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=runs/exp
mkdir -p "$OUT" docs
what=${1:-all}
run() { echo "+ $*" >&2; "$@"; }
want() { [[ $what == all || $what == "$1" ]]; }

if want sst2; then
  # (2) SmolLM2 on SST-2: cache from one half, sweep on the other (layer and head policies); bench
  [ -d runs/sst2-smollm2.db ] || run attncache build --data "sst2[0:436]" --out runs/sst2-smollm2.db --quiet
  run attncache eval --db runs/sst2-smollm2.db --data "sst2[436:]" --policy all --policy default --json --quiet > $OUT/sst2_eval.json
  run attncache eval --db runs/sst2-smollm2.db --data "sst2[436:]" --sweep --policy all --policy default \
      --policy heads:27 --policy heads:81 --policy heads:135 --plot docs/sst2_sweep.png --json --quiet > $OUT/sst2_sweep.json
  for P in all default; do
    [ -s $OUT/sst2_bench_$P.json ] && continue  # timing runs are kept; delete the file to redo
    run attncache bench --db runs/sst2-smollm2.db --data "sst2[436:]" --policy $P --limit 40 --json --quiet > $OUT/sst2_bench_$P.json
  done
fi

if want calibrate; then
  # (issue 4) calibrate on sst2[436:654], check on the untouched sst2[654:872]
  rm -rf runs/sst2-cal.db && cp -r runs/sst2-smollm2.db runs/sst2-cal.db
  run attncache calibrate --db runs/sst2-cal.db --data "sst2[436:654]" --max-loss 0.05 --json --quiet > $OUT/calibrate_sst2.json
  run attncache eval --db runs/sst2-cal.db --data "sst2[654:]" --policy default --policy all --json --quiet > $OUT/calibrate_sst2_fresh.json
fi

if want fidelity; then
  # (issue 4) template heads vs the paper's all-layer reuse. Per task: the cache from one part of the data
  # (the DBs above), templates ranked and the calibration measured on a second part, the Pareto sweep and
  # the calibrated setting checked on an untouched third part.
  FIXED="--policy fixed:14 --policy fixed:27 --policy fixed:41 --policy fixed:54 --policy fixed:81 --policy fixed:108 --policy fixed:135 --policy fixed:162"
  fid() {  # name, source DB, rank/calibration data, test data, max-loss, extra args
    local name=$1 src=$2 cal=$3 test=$4 eps=$5
    shift 5
    rm -rf "runs/$name-tmpl.db" && cp -r "$src" "runs/$name-tmpl.db"
    run attncache templates --db "runs/$name-tmpl.db" --data "$cal" "$@" --json --quiet > "$OUT/fid_${name}_templates.json"
    # shellcheck disable=SC2086
    run attncache eval --db "runs/$name-tmpl.db" --data "$test" "$@" --sweep --policy all --policy default $FIXED \
        --policy fixed:54+default --plot "docs/fidelity_$name.png" --json --quiet > "$OUT/fid_${name}_sweep.json"
    rm -rf "runs/$name-cal.db" && cp -r "$src" "runs/$name-cal.db"
    run attncache calibrate --db "runs/$name-cal.db" --data "$cal" --max-loss "$eps" "$@" --json --quiet > "$OUT/fid_${name}_calibrate.json"
    run attncache eval --db "runs/$name-cal.db" --data "$test" "$@" --no-prefix-cache --json --quiet > "$OUT/fid_${name}_fresh.json"
  }
  fid sst2 runs/sst2-smollm2.db "sst2[436:654]" "sst2[654:872]" 0.05
  fid piqa runs/piqa-smollm2.db "piqa[400:700]" "piqa[800:1200]" 0.05
  fid mmlu2 runs/mmlu2.db "mmlu:2shot[20::30]" "mmlu:2shot[15::30]" 0.1 --max-tokens 1024
  # retrieval features: how close are the maps of the neighbour each feature finds (vs random, oracle, templates)
  run python benchmarks/retrieval_features.py --db runs/sst2-smollm2.db --build "sst2[0:436]" --data "sst2[654:872]" \
      --limit 60 --out $OUT/retrieval_features_sst2.json
  # which ranking of heads: attribution (kept), attribution / margin, the template's TV distance
  run python benchmarks/template_ranking.py --db runs/sst2-smollm2.db --rank "sst2[436:654]" --test "sst2[654:872]" \
      --out $OUT/template_ranking_sst2.json
  # ranking in 6 rounds (each with the earlier rounds' templates in place) instead of one
  rm -rf runs/sst2-greedy.db && cp -r runs/sst2-smollm2.db runs/sst2-greedy.db
  run attncache templates --db runs/sst2-greedy.db --data "sst2[436:654]" --rank-rounds 6 --json --quiet > $OUT/fid_sst2_greedy_templates.json
  # shellcheck disable=SC2086
  run attncache eval --db runs/sst2-greedy.db --data "sst2[654:872]" --sweep $FIXED --json --quiet > $OUT/fid_sst2_greedy_sweep.json
fi

if want fidbench; then
  # what template heads buy in time (after `fidelity`, which leaves runs/*-tmpl.db with 60 % of heads' templates)
  for P in fixed:54 fixed:135; do
    run attncache bench --db runs/sst2-tmpl.db --data "sst2[654:872]" --policy $P --limit 24 --repeats 3 --no-prefix-cache \
        --no-eager --json --quiet > "$OUT/fidbench_sst2_${P/:/}.json"
    run attncache bench --db runs/mmlu2-tmpl.db --data "mmlu:2shot[15::30]" --max-tokens 1024 --policy $P --limit 6 \
        --repeats 3 --no-prefix-cache --no-eager --json --quiet > "$OUT/fidbench_mmlu2_${P/:/}.json"
  done
fi

if want piqa; then
  [ -d runs/piqa-smollm2.db ] || run attncache build --data "piqa[0:400]" --out runs/piqa-smollm2.db --quiet
  run attncache eval --db runs/piqa-smollm2.db --data "piqa[400:800]" --sweep --plot docs/piqa_sweep.png --json --quiet > $OUT/piqa_sweep.json
  run attncache eval --db runs/piqa-smollm2.db --data "piqa[400:800]" --policy all --policy default --no-prefix-cache --json --quiet > $OUT/piqa_eval.json
fi

if want mmlu; then
  # (1) MMLU 0..5-shot: every 30th question cached, a disjoint every-30th evaluated, 8 timed; prompts over
  # 1024 tokens are skipped (a few 5-shot history prompts reach ~2,000 tokens: 2.2 GB of maps each)
  for K in 0 1 2 3 4 5; do
    [ -s $OUT/mmlu${K}_bench_all.json ] && continue  # done; delete the file to redo
    DB=runs/mmlu${K}.db
    [ -d $DB ] || run attncache build --data "mmlu:${K}shot[0::30]" --out $DB --max-tokens 1024 --compression float16 --quiet
    run attncache inspect $DB --json > $OUT/mmlu${K}_inspect.json
    run attncache eval --db $DB --data "mmlu:${K}shot[15::30]" --max-tokens 1024 --policy all --policy default --no-prefix-cache --json --quiet > $OUT/mmlu${K}_eval.json
    [ $K = 5 ] && L=4 || L=8
    run attncache bench --db $DB --data "mmlu:${K}shot[15::30]" --max-tokens 1024 --policy all --limit $L --repeats 3 --no-prefix-cache --json --quiet > $OUT/mmlu${K}_bench_all.json
  done
fi

if want prefix; then
  # the exact tier, alone (--policy none): MMLU 5-shot in dataset order (questions of a subject follow
  # each other) and PIQA (two continuations per prompt)
  run attncache eval --db runs/mmlu5.db --data "mmlu:5shot[0:60]" --policy none --batch-size 1 --json --quiet > $OUT/prefix_mmlu5_eval.json
  run attncache bench --db runs/mmlu5.db --data "mmlu:5shot[0:30]" --policy none --repeats 1 --pass-repeats 2 --no-eager --json --quiet > $OUT/prefix_mmlu5_bench.json
  run attncache eval --db runs/piqa-smollm2.db --data "piqa[400:600]" --policy none --batch-size 1 --json --quiet > $OUT/prefix_piqa_eval.json
  run attncache bench --db runs/piqa-smollm2.db --data "piqa[400:600]" --policy none --limit 60 --repeats 1 --no-eager --json --quiet > $OUT/prefix_piqa_bench.json
fi

if want minilm; then
  # (3) MiniLM embeddings: SST-2 sentences and RTE pairs
  [ -d runs/sst2-minilm.db ] || run attncache build --model minilm-l6 --data "sst2[0:436]" --out runs/sst2-minilm.db --quiet
  run attncache eval --db runs/sst2-minilm.db --data "sst2[436:]" --policy all --policy default --json --quiet > $OUT/minilm_sst2_eval.json
  [ -d runs/rte-minilm.db ] || run attncache build --model minilm-l6 --data "rte[0:138]" --out runs/rte-minilm.db --quiet
  run attncache eval --db runs/rte-minilm.db --data "rte[138:]" --policy all --policy default --json --quiet > $OUT/minilm_rte_eval.json
  for B in 1 32; do
    run attncache bench --db runs/sst2-minilm.db --data "sst2[436:]" --policy all --limit 64 --batch-size $B --json --quiet > $OUT/minilm_bench_b$B.json
  done
fi

if want length; then
  # (4) speedup vs length, real text, all layers, hits (1024-2048 tokens: the GPU check and MMLU rows)
  run python benchmarks/length_scaling.py --lengths 64,128,256,512,1024 --per-length 2 --repeats 3 \
      --out $OUT/length_scaling.json --plot docs/length_scaling.png
fi

if want quant; then
  # (5) dynamic int8 SmolLM2 on caches recorded in fp32
  run attncache eval --db runs/sst2-smollm2.db --data "sst2[436:]" --policy all --policy default --quantize int8 --json --quiet > $OUT/quant_sst2_eval.json
  run attncache bench --db runs/sst2-smollm2.db --data "sst2[436:]" --policy all --limit 24 --quantize int8 --json --quiet > $OUT/quant_sst2_bench.json
  run attncache bench --db runs/mmlu5.db --data "mmlu:5shot[15::30]" --max-tokens 1024 --policy all --limit 4 --repeats 3 --quantize int8 --no-prefix-cache --json --quiet > $OUT/quant_mmlu5_bench.json
fi

if want store; then
  # (issue 6) compression: the same DB re-encoded (same entries, projector and hits), so only map precision
  # differs; then a DB storing only the policy layers; then the fetch cost at MMLU lengths
  for DB in sst2-smollm2 piqa-smollm2; do run attncache migrate runs/$DB.db; done
  for C in float16 int8 sparse; do
    SRC=runs/sst2-smollm2.db; [ $C = float16 ] || { [ -d runs/sst2-$C.db ] || run attncache compress $SRC --to $C --out runs/sst2-$C.db --quiet; SRC=runs/sst2-$C.db; }
    run attncache inspect $SRC --json > $OUT/store_sst2_${C}_inspect.json
    run attncache eval --db $SRC --data "sst2[436:]" --policy all --policy default --json --quiet > $OUT/store_sst2_$C.json
    SRC=runs/piqa-smollm2.db; [ $C = float16 ] || { [ -d runs/piqa-$C.db ] || run attncache compress $SRC --to $C --out runs/piqa-$C.db --quiet; SRC=runs/piqa-$C.db; }
    run attncache inspect $SRC --json > $OUT/store_piqa_${C}_inspect.json
    run attncache eval --db $SRC --data "piqa[400:600]" --policy all --policy default --no-prefix-cache --json --quiet > $OUT/store_piqa_$C.json
    # the DB threshold hits 0.5 % of PIQA inputs; at 0.25 about half hit (piqa_sweep.json), so maps matter
    run attncache eval --db $SRC --data "piqa[400:600]" --policy all --policy default --threshold 0.25 --no-prefix-cache --json --quiet > $OUT/store_piqa_t025_$C.json
  done
  [ -d runs/sst2-auto.db ] || run attncache build --data "sst2[0:436]" --out runs/sst2-auto.db --compression int8 --store-layers auto --quiet
  run attncache inspect runs/sst2-auto.db --json > $OUT/store_sst2_auto_inspect.json
  run attncache eval --db runs/sst2-auto.db --data "sst2[436:]" --policy default --json --quiet > $OUT/store_sst2_auto.json
fi

if want storebench; then
  # lookup + fetch as a share of prefill at MMLU 2-shot lengths (~400 tokens): float16 views vs int8 decode
  run attncache migrate runs/mmlu2.db
  [ -d runs/mmlu2-int8.db ] || run attncache compress runs/mmlu2.db --to int8 --out runs/mmlu2-int8.db --quiet
  for C in float16 int8; do
    DB=runs/mmlu2.db; [ $C = int8 ] && DB=runs/mmlu2-int8.db
    run attncache bench --db $DB --data "mmlu:2shot[15::30]" --max-tokens 1024 --policy all --limit 6 --repeats 3 --no-prefix-cache --no-eager --json --quiet > $OUT/store_mmlu2_bench_$C.json
    run attncache bench --db $DB --data "mmlu:2shot[15::30]" --max-tokens 1024 --policy default --limit 6 --repeats 3 --no-prefix-cache --no-eager --json --quiet > $OUT/store_mmlu2_bench_default_$C.json
  done
fi

if want scale; then
  # (issue 6) 10k-entry store: open, lookup p50/p99, fetch bandwidth vs memcpy; LRU vs LFU on a Zipf stream
  run python benchmarks/store_scale.py --sizes 1000,2000,5000,10000 --out $OUT/store_scale.json
fi

if want speed; then
  # (issue 3) speedup vs accuracy per threshold: bench at the thresholds of the SST-2 sweep
  run python benchmarks/speed_accuracy.py --db runs/sst2-smollm2.db --data "sst2[436:]" --sweep $OUT/sst2_sweep.json \
      --out $OUT/speed_accuracy_sst2.json --plot docs/speed_accuracy_sst2.png
fi

if want load; then
  # (issue 8) HTTP load test on loopback: MiniLM embeddings, cache attached vs detached, concurrency 8
  run python benchmarks/load_test.py --db runs/sst2-minilm.db --data "sst2[436:]" --requests 300 --concurrency 8 \
      --out $OUT/load_test_minilm.json
fi

if want redesign; then
  # (issue 14) the redesign changes no behaviour: the SST-2 timing and the MMLU 5-shot prefix rows again
  [ -d runs/sst2-smollm2.db ] || run attncache build --data "sst2[0:436]" --out runs/sst2-smollm2.db --compression float16 --quiet
  for P in all default; do
    run attncache bench --db runs/sst2-smollm2.db --data "sst2[436:]" --policy $P --limit 40 --json --quiet > $OUT/redesign_sst2_bench_$P.json
  done
  [ -d runs/mmlu5-small.db ] || run attncache build --data "mmlu:5shot[0::100]" --out runs/mmlu5-small.db --max-tokens 1024 --quiet
  run attncache bench --db runs/mmlu5-small.db --data "mmlu:5shot[0:30]" --policy none --repeats 1 --pass-repeats 3 --no-eager --json --quiet > $OUT/redesign_prefix_mmlu5_bench.json
fi

if want buildspeed; then
  # (issue 16) pair labels before (the checkout before the redesign: git worktree add /tmp/old 1f3554f) and after,
  # on the same DBs (float16 and int8 maps of sst2[0:436]), same machine; and build's stage times
  [ -d runs/sst2-int8.db ] || run attncache compress runs/sst2-smollm2.db --to int8 --out runs/sst2-int8.db --quiet
  for C in smollm2 int8; do
    run python benchmarks/pair_labels.py --db runs/sst2-$C.db --out $OUT/pair_labels_after_$C.json
    [ -d /tmp/old/src ] && PYTHONPATH=/tmp/old/src run python benchmarks/pair_labels.py --db runs/sst2-$C.db --out $OUT/pair_labels_before_$C.json
  done
  rm -rf runs/sst2-buildtime.db
  { time attncache build --data "sst2[0:436]" --out runs/sst2-buildtime.db ; } 2> $OUT/build_sst2_stages.log > /dev/null
fi


if want redesign_before; then
  # the same two benches with the code before the redesign (git worktree add /tmp/old 1f3554f), same machine
  for P in all default; do
    PYTHONPATH=/tmp/old/src run attncache bench --db runs/sst2-smollm2.db --data "sst2[436:]" --policy $P --limit 40 --json --quiet > $OUT/redesign_before_sst2_bench_$P.json
  done
  PYTHONPATH=/tmp/old/src run attncache bench --db runs/mmlu5-small.db --data "mmlu:5shot[0:30]" --policy none --repeats 1 --pass-repeats 3 --no-eager --json --quiet > $OUT/redesign_before_prefix_mmlu5_bench.json
fi

if want batchscale; then
  # (issue 13) workloads against plain SDPA at its best batch size (1, 4, 8, 16, 32), attncache at its own;
  # the exact tiers alone (no map DB), medians of interleaved passes; agreement from eval on the same rows
  # batch 1 is left out of the screen: it was never plain SDPA's best on these jobs (1/4/8/16/32 screened before)
  B=(--no-per-item --limit 1000 --pass-repeats 3 --batch-sizes 4,8,16,32 --json --quiet)
  job() {  # name, DATA
    run attncache bench --model smollm2-135m --data "$2" "${B[@]}" > $OUT/batchscale_$1_bench.json
    run attncache eval --model smollm2-135m --data "$2" --no-memo --json --quiet > $OUT/batchscale_$1_eval.json
  }
  job mmlu5 "mmlu:5shot[0:30]"            # dataset order: three subjects sharing their 5-shot prompts
  job sst2_4shot "sst2:4shot[0:64]"       # one instruction prompt with 4 fixed shots for every row
  job arc5 "arc_easy:5shot[0:40]"         # one 5-shot prefix, 4 continuations per question
  job hellaswag "hellaswag[0:40]"         # one context, four endings of ~20-30 tokens
  job piqa "piqa[0:64]"                   # one goal, two solutions
  job sst2_0shot "sst2[436:500]"          # nothing to share: the tiers must cost ~nothing
  # zero-shot with a calibrated map DB (the demo's DB): defaults, and the paper's mode
  [ -d runs/sst2-cal-default.db ] || run attncache build --data "sst2[0:436]" --out runs/sst2-cal-default.db --quiet
  run attncache inspect --db runs/sst2-cal-default.db --json > $OUT/batchscale_sst2_db_inspect.json
  for P in default all; do
    run attncache bench --db runs/sst2-cal-default.db --data "sst2[436:500]" --policy $P "${B[@]}" > $OUT/batchscale_sst2_db_$P.json
  done
  run attncache eval --db runs/sst2-cal-default.db --data "sst2[436:]" --policy default --policy all --no-memo --json --quiet > $OUT/batchscale_sst2_db_eval.json
fi

if want mmlu100; then
  # (issue 13) MMLU 5-shot on 100 rows in dataset order: more rows per subject than 30 rows have (11
  # subjects; a 5.0x token bound, the whole validation set's is 5.9x, 30 rows' 4.0x)
  run attncache bench --model smollm2-135m --data "mmlu:5shot[0:100]" --limit 1000 --no-per-item --pass-repeats 3 \
      --batch-sizes 4,8,16 --json --quiet > $OUT/batchscale_mmlu5_100_bench.json
  run attncache eval --model smollm2-135m --data "mmlu:5shot[0:100]" --no-memo --json --quiet \
      > $OUT/batchscale_mmlu5_100_eval.json
fi

if want warm; then
  # (issue 13) a warm start: one eval keeps MMLU's 5-shot prompts (--prefix-dir, from the even rows),
  # then the odd rows (new questions on the same prompts) timed cold and warm against the same baseline
  rm -rf runs/mmlu-prompts
  run attncache eval --model smollm2-135m --data "mmlu:5shot[0:30:2]" --prefix-dir runs/mmlu-prompts --json --quiet \
      > $OUT/warm_mmlu5_keep.json
  W=(--model smollm2-135m --data "mmlu:5shot[1:30:2]" --no-per-item --limit 1000 --pass-repeats 3 --batch-sizes 4,8,16 --json --quiet)
  run attncache bench "${W[@]}" > $OUT/warm_mmlu5_cold_bench.json
  run attncache bench "${W[@]}" --prefix-dir runs/mmlu-prompts > $OUT/warm_mmlu5_warm_bench.json
  run attncache eval --model smollm2-135m --data "mmlu:5shot[1:30:2]" --prefix-dir runs/mmlu-prompts --no-memo \
      --json --quiet > $OUT/warm_mmlu5_eval.json
fi

if want memo; then
  # (issue 13) the memo across runs: the same eval twice on a DB, the second answered from it
  rm -rf runs/memo.db && cp -r runs/sst2-cal-default.db runs/memo.db
  for K in 1 2; do
    run attncache eval --db runs/memo.db --data "sst2[436:636]" --policy default --json --quiet > $OUT/memo_eval_$K.json
  done
fi

if want plain; then
  # (issue 13) the plain path: sorting, matmul precision, bf16 weights (agreement measured)
  run python benchmarks/plain_path.py --data "sst2[436:500]" --compile --out $OUT/plain_path_sst2.json
fi

if want allhit; then
  # (issue 13) first, how this CPU multiplies A @ V per precision (fp16 maps: as stored, or converted)
  run python benchmarks/half_products.py --out $OUT/half_products.json
  # (issue 13) the map mechanism where every input hits (the DB recorded from the timed rows): the
  # batched workload pass (map tier only) against the per-item in-RAM bound at batch 1
  [ -d runs/mmlu-allhit.db ] || run attncache build --data "mmlu[0:48]" --out runs/mmlu-allhit.db \
      --no-calibrate --quiet
  run attncache bench --db runs/mmlu-allhit.db --data "mmlu[0:48]" --policy all --batch-sizes 1,8,16 \
      --no-eager --no-prefix-cache --json --quiet > $OUT/allhit_mmlu.json
fi

if want peers; then
  # (issue 13) CTranslate2 on the same token ids (pip install ctranslate2: not a project dependency)
  run python benchmarks/peers.py --data "sst2[436:500]" --out $OUT/peers_sst2.json
  run python benchmarks/peers.py --data "mmlu:5shot[0:30]" --batch-sizes 1,8,16 --out $OUT/peers_mmlu5.json
  # the engines that keep state between calls, every pass starting empty (summarize_tiers takes these)
  run python benchmarks/peers.py --data "sst2[436:500]" --batch-sizes 16 --engines ct2-static,llamacpp-on \
      --out $OUT/peers_sst2_cold.json
  run python benchmarks/peers.py --data "mmlu:5shot[0:30]" --batch-sizes 16 --engines ct2-static,llamacpp-on \
      --out $OUT/peers_mmlu5_cold.json
fi

if want calspeed; then
  # (issue 16) the calibration search on ~150 classification rows of ~120 tokens (MMLU zero-shot: four
  # single-token choices), a DB of 153 other MMLU rows; and SST-2. Search vs every candidate to the end,
  # then the searched setting stored in a copy of the DB and checked on rows no step has seen
  [ -d runs/mmlu0.db ] || run attncache build --data "mmlu[0::10]" --out runs/mmlu0.db --no-calibrate --quiet
  [ -s $OUT/calspeed_mmlu0_search.json ] || run attncache calibrate --db runs/mmlu0.db --data "mmlu[1::10]" --limit 150 \
      --max-loss 0.05 --dry-run --json --quiet > $OUT/calspeed_mmlu0_search.json
  for M in search exhaustive; do
    X=""; [ $M = exhaustive ] && X="--exhaustive"
    run attncache calibrate --db runs/sst2-smollm2.db --data "sst2[436:654]" --max-loss 0.05 --dry-run $X --json --quiet > $OUT/calspeed_sst2_$M.json
  done
  rm -rf runs/sst2-calfresh.db && cp -r runs/sst2-smollm2.db runs/sst2-calfresh.db
  run attncache calibrate --db runs/sst2-calfresh.db --data "sst2[436:654]" --max-loss 0.05 --json --quiet > $OUT/calspeed_sst2_stored.json
  run attncache eval --db runs/sst2-calfresh.db --data "sst2[654:]" --policy default --no-memo --json --quiet > $OUT/calspeed_sst2_fresh.json
fi

if want buildbefore; then
  # (issue 16) the build before this work (git worktree add /tmp/old 1f3554f), same rows and machine, and
  # its pair labels on the int8 DB again with the machine otherwise idle
  rm -rf runs/sst2-buildtime-old.db
  { time PYTHONPATH=/tmp/old/src attncache build --data "sst2[0:436]" --out runs/sst2-buildtime-old.db ; } 2> $OUT/build_sst2_stages_before.log > /dev/null
  rm -rf runs/sst2-buildtime-old.db
  PYTHONPATH=/tmp/old/src run python benchmarks/pair_labels.py --db runs/sst2-int8.db --out $OUT/pair_labels_before_int8.json
  # and the build now, right after it
  rm -rf runs/sst2-buildtime.db
  { time attncache build --data "sst2[0:436]" --out runs/sst2-buildtime.db ; } 2> $OUT/build_sst2_stages.log > /dev/null
fi

if want calgoal; then
  # (issue 16) its goal under the select/verify statistics: 150 rows of ~120 tokens (MMLU zero-shot) cannot
  # bound 5 % (56 verifying rows, 59 needed), so the same rows at --max-loss 0.10 (29 needed): the search
  # vs every candidate to the end, then the searched setting stored and checked on 300 untouched rows
  [ -d runs/mmlu0.db ] || run attncache build --data "mmlu[0::10]" --out runs/mmlu0.db --no-calibrate --quiet
  for M in search exhaustive; do
    X=""; [ $M = exhaustive ] && X="--exhaustive"
    run attncache calibrate --db runs/mmlu0.db --data "mmlu[1::10]" --limit 150 --max-loss 0.10 --dry-run $X \
        --json --quiet > $OUT/calgoal_mmlu0_$M.json
  done
  rm -rf runs/mmlu0-cal.db && cp -r runs/mmlu0.db runs/mmlu0-cal.db
  run attncache calibrate --db runs/mmlu0-cal.db --data "mmlu[1::10]" --limit 150 --max-loss 0.10 --json --quiet \
      > $OUT/calgoal_mmlu0_stored.json
  run attncache eval --db runs/mmlu0-cal.db --data "mmlu[2::10]" --limit 300 --policy default --no-memo --json \
      --quiet > $OUT/calgoal_mmlu0_fresh.json
fi

if want calexhaustive; then
  # (issue 16) every MMLU candidate to the end: only its choice matters (its time is not compared)
  run attncache calibrate --db runs/mmlu0.db --data "mmlu[1::10]" --limit 150 --max-loss 0.05 --dry-run --exhaustive \
      --json --quiet > $OUT/calspeed_mmlu0_exhaustive.json
fi
