#!/usr/bin/env bash
# Run benchmarks/gpu/validate.py on a machine where this package is not installed (a GPU
# machine with torch + Triton and no network; see shim.sh). Arguments go to validate.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/shim.sh
exec "${PYTHON:-python3}" "$PWD/benchmarks/gpu/validate.py" "$@"
