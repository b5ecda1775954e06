"""The orchestration functions read as a list of named steps: each stays under 80 lines.

Parsed with ``ast`` (nothing is imported or run): the line span of each function,
docstring and decorators included, in the module that defines it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80
ORCHESTRATION = [
    ("training/run.py", "run_training"),
    ("inference/pipeline.py", "run_inference"),
    ("evaluation/cv.py", "run_cv"),
    ("bench/run.py", "main"),
    ("bench/journey.py", "main"),
    ("bench/scaling.py", "main"),
    ("bench/decode_profile.py", "main"),
    ("bench/multigpu.py", "main"),
    ("training/export.py", "export_run"),
]


def function_lines(path: Path, name: str) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
    assert len(found) == 1, f"{path}: expected one top-level function {name!r}, found {len(found)}"
    node = found[0]
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return node.end_lineno - first + 1


@pytest.mark.parametrize("module,name", ORCHESTRATION)
def test_orchestration_function_is_a_short_recipe(module, name):
    lines = function_lines(ROOT / module, name)
    assert lines < MAX_LINES, f"{module}:{name} is {lines} lines; split it into named steps (< {MAX_LINES})"


def test_the_size_check_sees_a_long_function(tmp_path):
    """Not vacuous: a long function is measured as long."""
    body = "\n".join(f"    x{i} = {i}" for i in range(100))
    (tmp_path / "m.py").write_text(f"@staticmethod\ndef long():\n{body}\n", encoding="utf-8")
    assert function_lines(tmp_path / "m.py", "long") == 102
