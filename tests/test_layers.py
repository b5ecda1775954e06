"""Imports run one way: data -> model/heads -> training/baselines/metrics -> inference/evaluation -> CLIs.

Parses every module of the lower layers (function-local imports included) and fails on an import of
a higher layer: the lower layers are where a cycle or an upward reach hurts first.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"data": 0, "model": 1, "heads": 1, "training": 2, "baselines": 2, "metrics": 2, "inference": 3,
         "evaluation": 3, "bench": 4, "train": 4, "infer": 4, "score": 4}
# Within a layer only these reach sideways (model loads and runs the head; never the reverse).
SIDEWAYS = {("model", "heads")}


def imported_tops(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops & set(LAYER)


def upward_imports(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).glob("*.py")):
        for top in imported_tops(path):
            sideways = LAYER[top] == LAYER[package] and top != package and (package, top) not in SIDEWAYS
            if LAYER[top] > LAYER[package] or sideways:
                bad.append(f"{path.relative_to(ROOT)} imports {top}")
    return bad


@pytest.mark.parametrize("package", ["data", "heads", "model"])
def test_lower_layers_import_nothing_above_them(package):
    assert upward_imports(package) == []


def test_evaluation_and_inference_do_not_reach_each_other_or_training_export():
    for package in ("evaluation", "inference"):
        for path in (ROOT / package).glob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert "training.export" not in modules, path
            other = "inference" if package == "evaluation" else "evaluation"
            assert not any(m.split(".")[0] == other for m in modules), path
