#!/usr/bin/env bash
# One short GPU lease, in order of value (about 9 minutes on an H100/H200; no vLLM, no
# network, the package not installed). Each step has its own time limit, so one that hangs
# or runs long does not cost the others; every result lands in benchmarks/results/gpu/ and,
# when the device tool's $OUT is set, in $OUT (lease.log, gpu_results.tgz, the graph check).
#
#   bash benchmarks/gpu/lease.sh            # all steps
#   STEPS=graph,sweep bash benchmarks/gpu/lease.sh
#   SMOKE=1 TRITON_INTERPRET=1 PYTHON=.venv/bin/python bash benchmarks/gpu/lease.sh  # CPU
#
# 0. artifact (first when its data is there): real `deltadq compress` artifacts of SmolLM2
#    fine-tunes through the kernels, against the decoder and `deltadq merge`'s checkpoint
#    (artifact_check.py; its data made here with `artifact_check.py --prepare --data
#    .gpucarry ...` and carried: .gpucarry)
# 1. env + sweep: device facts, measured copy / GEMM ceilings, random kernel configurations
#    against the float64 reference (validate.py)
# 2. graph: the serving delta layers under CUDA graphs (graph_check.py: no host syncs,
#    replay == eager == each row's own fine-tune, a delta loaded after capture, the
#    7B-shaped decode-step timing)
# 3. tune: this GPU's kernel table (decode buckets of 7B/8B shapes, v3: the only variant
#    that ever won), merged into kernels/configs/<GPU name>.json
# 4. stack: the 32-layer (--quick: 8-layer) 7B-shaped decode step with the table just tuned
# 5. lowrank: a low-rank LM head / embedding kept as factors vs its 16-bit conversion
#    (benchmarks/kernels/lowrank_head.py: arena bytes, register time, head and lookup times)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
export PYTHON=${PYTHON:-python3}
PY=$PYTHON
SM=${SMOKE:+--smoke}   # SMOKE=1 TRITON_INTERPRET=1: every step's tiny CPU mode (checks the script)
STEPS=${STEPS:-artifact,sweep,graph,tune,stack,lowrank}   # run in this order
R=benchmarks/results/gpu
mkdir -p "$R"
LOG=${OUT:+$OUT/lease.log}
LOG=${LOG:-$R/lease.log}
source benchmarks/gpu/shim.sh
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
GPU=${GPU:-unknown}
step() { [[ ",$STEPS," == *",$1,"* ]]; }
run() {  # run LIMIT_S NAME CMD...: one step under its own limit; its rc and seconds logged
  local lim=$1 name=$2 t0=$SECONDS; shift 2
  echo "=== $name (limit ${lim}s): $*"
  timeout -k 5 "$lim" "$@"
  echo "=== $name rc=$? in $((SECONDS - t0))s"
}
{
  date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  step artifact && [ -f "${ARTIFACT_DATA:-.gpucarry}/manifest.json" ] && run "${ARTIFACT_S:-200}" artifact "$PY" benchmarks/gpu/artifact_check.py \
                  --data "${ARTIFACT_DATA:-.gpucarry}" --out "$R/artifact_check-$GPU.json" \
                  ${SM:+--smoke --device cpu}
  step sweep && { run 100 env+sweep "$PY" benchmarks/gpu/validate.py --only env,sweep --budget-s 90 $SM
                  cp "$R/validate.json" "$R/validate-sweep.json" 2>/dev/null; }
  step graph && run "${GRAPH_S:-240}" graph "$PY" benchmarks/gpu/graph_check.py \
                  --out "$R/graph_check-$GPU.json" $SM
  step tune && { run "${TUNE_S:-170}" tune "$PY" benchmarks/gpu/validate.py --only tune \
                  --budget-s $((${TUNE_S:-170} - 10)) --tune-variants v3 --tune-preset 7b,8b \
                  --tune-ratios 16,64 --tune-tokens 1,2,4,8,16,32 \
                  ${SM:---tune-merge-into "kernels/configs/$GPU.json"} $SM
                 cp "$R/validate.json" "$R/validate-tune.json" 2>/dev/null; }
  step stack && run "${STACK_S:-80}" stack "$PY" benchmarks/gpu/validate.py --only stack \
                  --budget-s $((${STACK_S:-80} - 5)) --quick $SM
  step lowrank && run "${LOWRANK_S:-150}" lowrank "$PY" benchmarks/kernels/lowrank_head.py $SM
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_results.tgz" "$R" kernels/configs benchmarks/results/kernels/lowrank_head-*.json
    cp "$R/graph_check-$GPU.json" "$R/artifact_check-$GPU.json" "$OUT/" 2>/dev/null
  fi
  date -u
} 2>&1 | tee "$LOG"
