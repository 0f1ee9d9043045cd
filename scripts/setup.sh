#!/usr/bin/env bash
# Installs qforge (editable) with its test extras. Installs the CPU torch wheel first when no torch is
# present, so a fresh CPU machine never pulls a multi-GB CUDA build; GPU servers keep their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
