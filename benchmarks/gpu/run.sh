#!/usr/bin/env bash
# Run benchmarks/gpu/validate.py on a machine where this package is not installed (a GPU
# machine with torch + Triton and no network): a folder of symlinks makes `deltadq_vllm`,
# `deltadq_vllm.kernels` and `deltadq_vllm.tools` importable exactly as the installed package
# lays them out (pyproject's package-dir), without pip. Arguments go to validate.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-python3}
if ! (cd /tmp && "$PY" -c "import deltadq_vllm.kernels") 2>/dev/null; then
  SHIM=$(mktemp -d)
  mkdir -p "$SHIM/deltadq_vllm"
  for f in "$ROOT"/deltadq_vllm/*; do ln -s "$f" "$SHIM/deltadq_vllm/"; done
  ln -s "$ROOT/kernels" "$SHIM/deltadq_vllm/kernels"
  ln -s "$ROOT/tools" "$SHIM/deltadq_vllm/tools"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  echo "run.sh: package made importable from $SHIM"
fi
exec "$PY" "$ROOT/benchmarks/gpu/validate.py" "$@"
