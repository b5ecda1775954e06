#!/usr/bin/env bash
# Create .venv and install archehr with its test extras.
# torch goes in first and pinned: an unpinned torch pulled in by another package
# would fetch whatever build the index prefers. Override for your hardware, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC
.venv/bin/python -m pip install -q -e '.[dev]'
echo "archehr installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
