#!/usr/bin/env bash
# Installs qforge (editable) with its test extras, once: later calls only compare a stamp (the package
# metadata and the interpreter) and return in well under a second.
# On a machine without torch it installs the CPU wheel first (torch==2.13.0), so a CPU machine never pulls a
# multi-GB CUDA build; a GPU server keeps its own torch if it meets the floor, and is told otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1  # the checkout root must never be on sys.path (see Makefile)
PY=${PYTHON:-python3}
FLOOR=2.13
STAMP=.cache/setup.stamp
want=$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)-$("$PY" -c 'import sys; print(sys.prefix)' | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$PY" -c "import qforge.engine, transformers" 2>/dev/null; then
    exit 0
fi
have=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [ -z "$have" ]; then
    "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
elif ! "$PY" -c "import sys, torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < tuple(map(int, '$FLOOR'.split('.'))))"; then
    echo "error: torch $have is installed; qforge needs torch>=$FLOOR: upgrade it with your CUDA build (pip install 'torch>=$FLOOR' --index-url <your CUDA index>) or use a fresh venv" >&2
    exit 2
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
mkdir -p .cache && echo "$want" > "$STAMP"
