#!/usr/bin/env bash
# Mutation testing (mutmut) of metrics/, heads/, data/submission.py, model/calibration.py and
# training/joint.py against the fast tests that cover them ([tool.mutmut] in pyproject.toml).
# Re-run when those modules change; record the result in docs/mutation.md.
#   bash scripts/mutation.sh            # run (resumes where a previous run stopped)
#   bash scripts/mutation.sh --fresh    # forget earlier results first
# Survivors: .venv/bin/mutmut results; one mutant's diff: .venv/bin/mutmut show NAME
# mutmut maps tests to functions in-process (a subprocess is not traced) and, when resuming, traces
# only new test names: after changing a test's body, rename it or use --fresh (docs/mutation.md).
# From a worktree without .venv: PYTHON=/path/to/.venv/bin/python bash scripts/mutation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ "${1:-}" = "--fresh" ]; then
    rm -rf mutants
fi
# One torch thread per mutant's test run: mutmut forks a child per mutant.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
"$PY" -m mutmut run --max-children "${MUTATION_JOBS:-2}"
"$PY" -m mutmut results 2>/dev/null | grep -vE ": (killed|skipped)$" || true
