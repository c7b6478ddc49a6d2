#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (unit tests on tiny random models + the real-model tier).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks
python -m pytest -q --durations=15 "$@"
