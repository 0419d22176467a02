#!/usr/bin/env bash
# The base-check cost on a 7B-sized checkpoint (13.5 GB bf16) on a server-class machine
# (the lent device: 16 cores). Writes its JSON under $OUT (or benchmarks/results/base_hash).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
echo "python: $($PY --version 2>&1); cores: $(nproc); $(free -g | awk '/Mem/{print "mem "$2" GiB"}')"
grep -o -w -m1 sha_ni /proc/cpuinfo || echo "no sha_ni"
$PY -c "import torch, sys; print('torch', torch.__version__)" || { echo "no torch"; exit 3; }
export PYTHONPATH=$PWD
mkdir -p "${OUT:-/tmp/out}"
WORK=${WORK:-/tmp/hashbench}
$PY -c "
import hashlib, os, time
b = os.urandom(512 << 20)
t = time.perf_counter(); hashlib.sha256(b).digest(); print(f'sha256 one core: {len(b)/(time.perf_counter()-t)/1e9:.2f} GB/s')"
$PY benchmarks/base_hash/run.py --make-gb 13.5 --work "$WORK" --label device-13.5gb
cp benchmarks/results/base_hash/device-13.5gb.json "${OUT:-/tmp/out}/" 2>/dev/null
# cold page cache, when the machine allows it
if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
  echo "page cache dropped"
  $PY benchmarks/base_hash/run.py --checkpoint "$WORK/synthetic-13.5gb" --label device-13.5gb-cold
  cp benchmarks/results/base_hash/device-13.5gb-cold.json "${OUT:-/tmp/out}/" 2>/dev/null
else
  echo "cannot drop the page cache here: the numbers above read from memory"
fi
