#!/usr/bin/env bash
# Create .venv and install archehr's dependencies with the test extras. The checkout is the
# program: `pip install .` ships no module (run train.py / infer.py / score.py from here).
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
.venv/bin/python -m pip install -q '.[dev]'
echo "archehr dependencies installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
