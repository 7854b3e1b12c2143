#!/usr/bin/env bash
# The project's python, found when a make target RUNS (not when the Makefile is parsed), so that
# `make env stage1 stage2 stage3` uses the environment `make env` built a moment earlier on the same line:
#   .venv/bin/python when it exists, else `conda run -n $ENV_NAME python` when conda has that env, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$root/.venv/bin/python" ]; then
  exec "$root/.venv/bin/python" "$@"
fi
env_name="${ENV_NAME:-nextgpt}"
if command -v conda >/dev/null 2>&1 && conda env list 2>/dev/null | awk '{print $1}' | grep -qx "$env_name"; then
  exec conda run --no-capture-output -n "$env_name" python "$@"
fi
exec python3 "$@"
