#!/usr/bin/env bash
# The main job, from a fresh clone: set up, then score ARC-Easy 5-shot with lm-evaluation-harness twice
# on the default model (SmolLM2-135M, float32, CPU): `--model hf` (lm-eval's own backend, at batch 8) and
# `--model attncache`, on the same local task (40 held-out questions, 160 log-likelihood requests, the
# task's first 5 documents as shots for every question). Prints each backend's metrics, its scoring
# time (lm-eval's log, from "Running loglikelihood requests" to the results, to the second) and its
# whole process's wall time (start, imports, model load included), the ratios, and how far apart the
# per-request log-likelihoods are. JSON and per-sample logs in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
D=runs/demo  # its own folder: experiment runs in runs/ are left alone
rm -rf "$D" && mkdir -p "$D"
attncache lm-eval-task arc_easy "$D/tasks" --shots 5 --limit 40 > /dev/null 2>&1
HF_FOLDER=$(python -c "from attncache import models; print(models.hf_folder('smollm2-135m'))")
COMMON=(--include_path "$D/tasks" --tasks arc_easy_local --batch_size 8 --log_samples)
timed() {  # name, then the lm-eval arguments: wall seconds into $D/NAME.seconds
  local name=$1 t0
  shift
  echo "== lm-eval --model $name on ARC-Easy 5-shot (40 questions, 160 requests)"
  t0=$(date +%s.%N)
  attncache lm-eval run "$@" "${COMMON[@]}" --output_path "$D/$name" > "$D/$name.log" 2>&1 \
    || { tail -20 "$D/$name.log" >&2; exit 1; }
  python -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)" \
    > "$D/$name.seconds"
}
timed hf --model hf --model_args "pretrained=$HF_FOLDER,dtype=float32" --device cpu
timed attncache --model attncache --model_args pretrained=smollm2-135m
python - "$D" <<'PY'
import json, sys
from datetime import datetime
from pathlib import Path

d = Path(sys.argv[1])

def stamp(log, marker):  # lm-eval's own log line time (to the second)
    line = next(x for x in log.splitlines() if marker in x)
    return datetime.strptime(line.split()[0], "%Y-%m-%d:%H:%M:%S")

def run(name):
    results = json.loads(next((d / name).rglob("results_*.json")).read_text())["results"]
    samples = [json.loads(x) for x in next((d / name).rglob("samples_*.jsonl")).open()]
    log = (d / f"{name}.log").read_text()
    scoring = stamp(log, "Saving results aggregated") - stamp(log, "Running loglikelihood requests")
    wall = float((d / f"{name}.seconds").read_text())
    return results["arc_easy_local"], {s["doc_id"]: s for s in samples}, wall, scoring.total_seconds()

(hf, hf_s, hf_t, hf_score), (ours, ours_s, ours_t, ours_score) = run("hf"), run("attncache")
assert hf_s.keys() == ours_s.keys(), "the two runs scored different documents"
pairs = [(a[0], b[0]) for k in hf_s for a, b in zip(hf_s[k]["resps"], ours_s[k]["resps"], strict=True)]
gap = max(abs(float(a[0]) - float(b[0])) for a, b in pairs)
greedy = sum(a[1] == b[1] for a, b in pairs)
print(f"\n{'backend':10s} {'acc':>6s} {'acc_norm':>9s} {'scoring s':>10s} {'process s':>10s}")
for name, r, t, sc in (("hf b8", hf, hf_t, hf_score), ("attncache", ours, ours_t, ours_score)):
    print(f"{name:10s} {r['acc,none']:6.3f} {r['acc_norm,none']:9.3f} {sc:10.0f} {t:10.1f}")
same = all(hf[k] == ours[k] for k in ("acc,none", "acc_norm,none"))
print(f"\nscoring {hf_score / max(ours_score, 1):.1f}x faster, the whole lm-eval process {hf_t / ours_t:.1f}x; "
      f"metrics identical: {same}\n{len(pairs)} log-likelihoods: max |difference| {gap:.1e}, "
      f"is_greedy equal on {greedy}/{len(pairs)}")
print(f"JSON and per-sample logs in {d}/ (lm-eval's own output folders)")
PY
