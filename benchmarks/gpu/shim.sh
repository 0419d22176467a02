# Source this on a machine where the package is not installed (a GPU machine with torch +
# Triton and no network): a folder of symlinks makes `deltadq_vllm`, `deltadq_vllm.kernels`
# and `deltadq_vllm.tools` importable exactly as the installed package lays them out
# (pyproject's package-dir), without pip; PYTHONPATH points at it. Run scripts from outside
# the checkout's root (or by path): a bare `deltadq_vllm/` in the current directory would
# shadow it for `python -m` / `python -c`.
_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if ! (cd /tmp && "${PYTHON:-python3}" -c "import deltadq_vllm.kernels") 2>/dev/null; then
  _SHIM=$(mktemp -d)
  mkdir -p "$_SHIM/deltadq_vllm"
  for _f in "$_ROOT"/deltadq_vllm/*; do ln -s "$_f" "$_SHIM/deltadq_vllm/"; done
  ln -s "$_ROOT/kernels" "$_SHIM/deltadq_vllm/kernels"
  ln -s "$_ROOT/tools" "$_SHIM/deltadq_vllm/tools"
  export PYTHONPATH="$_SHIM${PYTHONPATH:+:$PYTHONPATH}"
  echo "shim.sh: package made importable from $_SHIM"
fi
