#!/usr/bin/env bash
# One-shot GPU benchmark for a lent machine: prints one JSON object on stdout (< 5 minutes).
#   bash benchmarks/gpu/run.sh            # everything
#   bash benchmarks/gpu/run.sh --skip-model   # kernels only
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 290 "$PY" benchmarks/gpu/bench.py "$@"
