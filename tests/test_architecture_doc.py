"""docs/architecture.md agrees with the code: every module listed once, on the floor that
tests/test_layers.py gives its package, and each floor names exactly that layer's packages."""

from __future__ import annotations

import re
from pathlib import Path

from test_layers import LAYER, MODULES

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
FLOOR = re.compile(r"^## Floor (\d+(?:\.\d+)?): (.+)$")
ENTRY = re.compile(r"^- `([\w/]+\.py)`: \S")


def read_floors(text: str) -> tuple[dict[float, list[str]], dict[str, list[float]]]:
    """(floor -> the packages its heading names, module file -> the floors it is listed on)."""
    floors: dict[float, list[str]] = {}
    listed: dict[str, list[float]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            match = FLOOR.match(line)
            current = float(match.group(1)) if match else None
            if match:
                floors[current] = [p.strip() for p in match.group(2).split(",")]
        elif current is not None and (entry := ENTRY.match(line)):
            listed.setdefault(entry.group(1), []).append(current)
    return floors, listed


def program_files() -> set[str]:
    return {str(path.relative_to(ROOT)) for name, path in MODULES.items() if path.name != "__init__.py"}


def test_floor_headings_match_the_layer_table():
    floors, _ = read_floors(DOC.read_text(encoding="utf-8"))
    expected: dict[float, set[str]] = {}
    for package, layer in LAYER.items():
        expected.setdefault(layer, set()).add(package)
    assert {n: set(p) for n, p in floors.items()} == expected


def test_every_module_is_listed_once_on_its_floor():
    _, listed = read_floors(DOC.read_text(encoding="utf-8"))
    files = program_files()
    assert sorted(files - set(listed)) == []  # every module has its line
    assert sorted(set(listed) - files) == []  # no line for a module that is gone
    for path, where in listed.items():
        assert where == [LAYER[path.split("/")[0].removesuffix(".py")]], (path, where)


def test_the_floor_line_reads_as_the_layers():
    text = DOC.read_text(encoding="utf-8")
    line = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith("plumbing ->"))
    groups = [g.strip().split("/") for g in line.split("->")]
    cli = {"train", "infer", "score"}
    layers = [{LAYER[p] for p in (cli if g == ["CLIs"] else g)} for g in groups]
    assert layers == [{n} for n in sorted(set(LAYER.values()))]


def test_the_checker_sees_a_misplaced_or_missing_module():
    floors, listed = read_floors("## Floor 1: data\n- `model/presets.py`: presets\n## Other\n- `data/x.py`: y\n")
    assert floors == {1.0: ["data"]} and listed == {"model/presets.py": [1.0]}
    assert listed["model/presets.py"] != [LAYER["model"]]
