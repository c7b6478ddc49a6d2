#!/usr/bin/env bash
# The main job, from a fresh clone: set up, then score ARC-Easy 5-shot with lm-evaluation-harness twice
# on the default model (SmolLM2-135M, float32, CPU): `--model hf` (lm-eval's own backend, at batch 8) and
# `--model attncache`, on the same local task (40 held-out questions, 160 log-likelihood requests, the
# task's first 5 documents as shots for every question). Prints each backend's metrics and wall time
# (each a whole lm-eval process: start, model load, scoring), their ratio, and how far apart the
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
from pathlib import Path

d = Path(sys.argv[1])

def run(name):
    results = json.loads(next((d / name).rglob("results_*.json")).read_text())["results"]
    samples = [json.loads(x) for x in next((d / name).rglob("samples_*.jsonl")).open()]
    return results["arc_easy_local"], {s["doc_id"]: s for s in samples}, float((d / f"{name}.seconds").read_text())

(hf, hf_s, hf_t), (ours, ours_s, ours_t) = run("hf"), run("attncache")
assert hf_s.keys() == ours_s.keys(), "the two runs scored different documents"
pairs = [(a[0], b[0]) for k in hf_s for a, b in zip(hf_s[k]["resps"], ours_s[k]["resps"], strict=True)]
gap = max(abs(float(a[0]) - float(b[0])) for a, b in pairs)
greedy = sum(a[1] == b[1] for a, b in pairs)
print(f"\n{'backend':10s} {'acc':>6s} {'acc_norm':>9s} {'wall s':>8s}")
for name, r, t in (("hf b8", hf, hf_t), ("attncache", ours, ours_t)):
    print(f"{name:10s} {r['acc,none']:6.3f} {r['acc_norm,none']:9.3f} {t:8.1f}")
same = all(hf[k] == ours[k] for k in ("acc,none", "acc_norm,none"))
print(f"\n{hf_t / ours_t:.1f}x the wall time of lm-eval's HF backend; metrics identical: {same}; "
      f"{len(pairs)} log-likelihoods, max |difference| {gap:.1e}, is_greedy equal on {greedy}/{len(pairs)}")
print(f"JSON and per-sample logs in {d}/ (lm-eval's own output folders)")
PY
