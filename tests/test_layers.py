"""Imports run one way: plumbing -> data -> model/heads -> training/baselines/metrics -> reports -> inference/evaluation
-> CLIs -> bench.

``reports`` (``report.html``) has a floor of its own: inference and evaluation both write the page, so it lies
below them, and it scores each case with the official per-case terms of ``metrics``, so it lies above that.

Parses every module of the program (imports inside functions included) and fails on an import of a
higher layer, or of another package of the same layer (the only sideways reach allowed: ``model``
loads and runs the head, so ``model`` may import ``heads``; never the reverse). The three CLIs
(train.py, infer.py, score.py) import nothing from each other. ``bench/`` sits on top: it may import
any layer, and a CLI only through its public entry points (``main``, ``build_parser``). No module
imports another package's private (``_``) names.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {
    "plumbing": 0,
    "data": 1,
    "model": 2,
    "heads": 2,
    "training": 3,
    "baselines": 3,
    "metrics": 3,
    "reports": 3.5,
    "inference": 4,
    "evaluation": 4,
    "train": 5,
    "infer": 5,
    "score": 5,
    "bench": 6,
}
CLIS = ("train", "infer", "score")
# Within a layer only these reach sideways (model loads and runs the head; never the reverse).
SIDEWAYS = {("model", "heads")}
# What bench may use of a CLI module: its public entry points, never its internals.
CLI_ENTRY_POINTS = {"main", "build_parser"}


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute dotted name
    names: tuple[str, ...] = ()  # what ``from module import ...`` took ("" for ``import module``)

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def program_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the program (tests excluded)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", "mutants") or any(p.startswith(".") for p in rel.parts):
            continue
        out[".".join(rel.with_suffix("").parts)] = path
    return out


def imports_of(source: str, module: str) -> list[Import]:
    """Every import statement in ``source`` (any depth: functions, classes, try blocks), relative
    ones resolved against ``module`` (a dotted name; a package's ``__init__`` counts as the package)."""
    package = module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target:
                found.append(Import(node.lineno, target, tuple(a.name for a in node.names)))
    return found


def layer_violations(module: str, source: str) -> list[str]:
    """Why each import of ``module`` breaks the layering ([] when none does)."""
    own = module.split(".")[0]
    if own not in LAYER:
        return [f"{module}: top-level package {own!r} has no layer in tests/test_layers.py"]
    bad = []
    for imp in imports_of(source, module):
        top = imp.top
        if top not in LAYER or top == own:
            continue
        where = f"{module}:{imp.line} imports {imp.module}"
        if LAYER[top] > LAYER[own]:
            bad.append(f"{where} (a higher layer)")
        elif LAYER[top] == LAYER[own] and (own, top) not in SIDEWAYS:
            bad.append(f"{where} (sideways within a layer)")
        elif own == "bench" and top in CLIS:
            internals = sorted(set(imp.names) - CLI_ENTRY_POINTS) if imp.names else []
            if internals:
                bad.append(f"{where} (CLI internals {internals}; only {sorted(CLI_ENTRY_POINTS)})")
    if own == "bench":
        bad += cli_attribute_violations(module, source)
    return bad


def cli_attribute_violations(module: str, source: str) -> list[str]:
    """``import train`` then ``train.something``: only the entry points may be used."""
    tree = ast.parse(source)
    bound = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name in CLIS}
    return [
        f"{module}:{n.lineno} uses {n.value.id}.{n.attr} (a CLI's internals)"
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id in bound
        and n.attr not in CLI_ENTRY_POINTS
    ]


MODULES = program_modules()


def test_every_top_level_package_has_a_layer():
    tops = {name.split(".")[0] for name in MODULES}
    assert tops - set(LAYER) == set()
    assert {"plumbing", "data", "model", "heads", "training", "inference", "train", "infer", "score"} <= tops


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer_or_sideways(module):
    assert layer_violations(module, MODULES[module].read_text(encoding="utf-8")) == []


def test_heads_never_import_model():
    for module, path in MODULES.items():
        if module.split(".")[0] == "heads":
            assert not [i for i in imports_of(path.read_text(encoding="utf-8"), module) if i.top == "model"], module


def test_the_clis_import_nothing_from_each_other():
    for cli in CLIS:
        tops = {i.top for i in imports_of(MODULES[cli].read_text(encoding="utf-8"), cli)}
        assert tops & (set(CLIS) - {cli}) == set(), cli
        assert "bench" not in tops, cli


def test_no_module_imports_another_packages_private_names():
    reached = [
        f"{module}:{imp.line} imports {imp.module}.{name}"
        for module, path in MODULES.items()
        for imp in imports_of(path.read_text(encoding="utf-8"), module)
        if imp.top in LAYER and imp.top != module.split(".")[0]
        for name in imp.names
        if name.startswith("_")
    ]
    assert reached == []


# The checker itself: each rule is seen, including imports inside functions and relative ones.
@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("metrics.x", "def f():\n    from inference.pipeline import run_inference\n", "a higher layer"),
        ("training.x", "import metrics.subtask4\n", "sideways"),
        ("heads.x", "def f():\n    import model.backbone\n", "sideways"),
        ("score", "from train import main\n", "sideways"),
        ("data.x", "try:\n    from score import main\nexcept ImportError:\n    pass\n", "a higher layer"),
        ("evaluation.sub.x", "from ...inference import fast\n", "sideways"),
        ("bench.x", "from infer import _subtasks\n", "CLI internals"),
        ("bench.x", "import train\ntrain.build_parser()\ntrain.usage()\n", "internals"),
        ("newpkg.x", "import data\n", "has no layer"),
        ("reports.x", "from inference.pipeline import run_inference\n", "a higher layer"),
        ("metrics.x", "from reports.page import render_report\n", "a higher layer"),
        ("plumbing.x", "def f():\n    from data.records import Case\n", "a higher layer"),
    ],
)
def test_the_checker_finds_each_kind_of_violation(module, source, expected):
    found = layer_violations(module, source)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    "module, source",
    [
        ("model.x", "from heads.alignment import NotePairHead\n"),
        ("inference.x", "from .memory import plan\nfrom model.export_folder import read_manifest\n"),
        ("evaluation.x", "def f():\n    from training.run import run_training\n"),
        ("bench.x", "import infer\ninfer.main([])\nfrom train import build_parser\n"),
        ("train", "from training.config import build_config\n"),
        ("reports.x", "from metrics.alignment import per_case_alignment\n"),
        ("evaluation.x", "from reports.page import write_report\n"),
        ("data.x", "from plumbing.errors import InputError\n"),
    ],
)
def test_the_checker_allows_downward_imports(module, source):
    assert layer_violations(module, source) == []
