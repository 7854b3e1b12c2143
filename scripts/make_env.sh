#!/usr/bin/env bash
# `make env`: conda env from env.yml when conda exists, else .venv with pip. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_NAME=${ENV_NAME:-nextgpt}
if [ ! -x .venv/bin/python ] && command -v conda >/dev/null 2>&1; then
  if conda env list | awk '{print $1}' | grep -qx "$ENV_NAME"; then
    echo "[env] updating conda env '$ENV_NAME' from env.yml"
    conda env update -n "$ENV_NAME" -f env.yml --prune
  else
    echo "[env] creating conda env '$ENV_NAME' from env.yml"
    conda env create -n "$ENV_NAME" -f env.yml
  fi
  # the nextgpt package (code/nextgpt) importable from anywhere; no build isolation: nothing to download
  conda run -n "$ENV_NAME" python -m pip install -q -e . --no-build-isolation --no-deps
  echo "[env] done: make targets run through 'conda run -n $ENV_NAME'"
  exit 0
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[env] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
else
  echo "[env] .venv exists; installing anything missing from requirements.txt"
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -r requirements.txt
# the nextgpt package (code/nextgpt) importable from anywhere; no build isolation, so the build uses the venv's
# setuptools (Python >= 3.12 venvs come without it)
.venv/bin/python -c "import setuptools" 2>/dev/null || .venv/bin/python -m pip install -q "setuptools>=64"
.venv/bin/python -m pip install -q -e . --no-build-isolation --no-deps
.venv/bin/python -m pip check
echo "[env] done: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
