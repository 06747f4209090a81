#!/usr/bin/env bash
# The GPU benchmark for a lent machine (see bench.py): JSON to $OUT/gpu_bench.json, or --out PATH,
# rewritten after every section; the machine needs only this checkout and a CUDA build of torch.
#   bash benchmarks/gpu/run.sh            # everything, under 8 minutes
#   bash benchmarks/gpu/run.sh --quick    # NF4 only, fewer sizes: under 3 minutes
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
limit=470
for arg in "$@"; do
  if [ "$arg" = "--quick" ]; then limit=170; fi
done
exec timeout "$limit" "$PY" benchmarks/gpu/bench.py "$@"
