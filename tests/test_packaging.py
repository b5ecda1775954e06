"""The checkout is the program: installing it ships no module, and configs resolve the same from anywhere."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERIC = (
    "plumbing",
    "data",
    "model",
    "heads",
    "metrics",
    "reports",
    "training",
    "evaluation",
    "inference",
    "baselines",
    "bench",
    "score",
    "train",
    "infer",
)


def _copy_checkout(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git",
        ".venv",
        "runs",
        "build",
        "dist",
        "*.egg-info",
        "__pycache__",
        ".pytest_cache",
        ".bench_cache",
        ".whl",
        "mutants",
    )
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def test_non_editable_install_ships_no_module(tmp_path):
    """`pip install .` into a fresh venv: the distribution is there, no generic name is importable."""
    # The dev extra pins setuptools >= 77 (to build the wheel offline): missing it is a broken
    # test environment, not a reason to pass silently.
    assert importlib.util.find_spec("setuptools") is not None, "pip install -e '.[dev]'"
    from importlib.metadata import version

    assert int(version("setuptools").split(".")[0]) >= 77, "pip install -e '.[dev]'"
    src = _copy_checkout(tmp_path / "src")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        cwd=tmp_path,
    )
    [wheel] = (tmp_path / "dist").glob("archehr-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        cwd=tmp_path,
    )
    neutral = tmp_path / "elsewhere"
    neutral.mkdir()
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, sys; "
        f"print(json.dumps([m.version('archehr'), [n for n in {list(GENERIC)!r} if u.find_spec(n)]]))"
    )
    out = subprocess.run([str(python), "-I", "-c", probe], check=True, cwd=neutral, capture_output=True, text=True)
    version, importable = json.loads(out.stdout)
    assert version == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert importable == []


def _print_config(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, "--print-config"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_resolved_config_is_the_same_from_any_working_folder(tmp_path):
    args = ("--stage", "domain", "--preset", "tiny", "--max_steps", "2")
    here = _print_config(ROOT, *args)
    elsewhere = _print_config(tmp_path, *args)
    assert here.returncode == 0 and elsewhere.returncode == 0, here.stderr + elsewhere.stderr
    assert here.stdout == elsewhere.stdout
    resolved = tomllib.loads(here.stdout)
    preset = tomllib.loads((ROOT / "configs" / "domain.toml").read_text())
    assert len(preset) >= 5  # the loop below has something to check
    assert resolved["lr"] == 2e-4 and resolved["stage"] == "domain" and resolved["preset"] == "tiny"
    for key, value in preset.items():  # the stage's TOML was read, not the dataclass defaults
        if key != "max_steps":
            assert resolved[key.replace("-", "_")] == value, key
    assert resolved["max_steps"] == 2
    assert list(tmp_path.iterdir()) == []  # --print-config writes nothing


def test_missing_stage_preset_is_exit_2(tmp_path):
    src = _copy_checkout(tmp_path / "src")
    (src / "configs" / "domain.toml").unlink()
    proc = subprocess.run(
        [
            sys.executable,
            str(src / "train.py"),
            "--stage",
            "domain",
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "run"),
            "--print-config",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "domain.toml" in line and "not found" in line
    assert proc.stdout == "" and not (tmp_path / "run").exists()


def test_missing_config_file_is_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / "nope.toml"), "--print-config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "nope.toml" in proc.stderr


@pytest.mark.slow  # ~23 s on 2 busy cores: a tiny task run, then a fresh interpreter loads it
def test_notebook_recipe_loads_an_export(tmp_path):
    """The README's notebook recipe, verbatim, from a folder outside the checkout."""
    from training.config import build_config
    from training.run import run_training

    examples = ROOT / "examples"
    cfg = build_config(
        dict(
            stage="task",
            joint=True,
            preset="tiny",
            xml=str(examples / "archehr-qa.xml"),
            key=str(examples / "archehr-qa_key.json"),
            out=str(tmp_path / "run"),
            max_steps=1,
            batch_size=1,
            progress=False,
            plot=False,
        )
    )
    export = run_training(cfg).export_dir
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("```python\n", readme.index("### From a notebook")) + len("```python\n")
    recipe = readme[start : readme.index("```", start)]
    recipe = recipe.replace('"/path/to/archehr"', repr(str(ROOT))).replace('"runs/task/export"', repr(str(export)))
    script = recipe + "\nprint(type(loaded.head).__name__, loaded.score_pairs is not None)\n"
    neutral = tmp_path / "notebook"
    neutral.mkdir()
    proc = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=neutral, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("True")


def test_domain_stage_runs_from_another_folder_with_the_checkout_config(tmp_path):
    """The acceptance run: tiny domain stage from a neutral folder; the config it records is the
    one --print-config resolves in the checkout; stdout holds only the result, logs go to stderr."""
    out = tmp_path / "run"
    args = (
        "--stage",
        "domain",
        "--preset",
        "tiny",
        "--data",
        str(ROOT / "examples" / "emrqa_sample.jsonl"),
        "--out",
        str(out),
        "--max_steps",
        "2",
        "--batch_tokens",
        "0",
        "--batch_size",
        "2",
        "--log_every",
        "1",
        "--save_every",
        "0",
        "--plot",
        "false",
        "--no-progress",
    )
    expected = _print_config(ROOT, *args)
    assert expected.returncode == 0, expected.stderr
    neutral = tmp_path / "elsewhere"
    neutral.mkdir()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=neutral, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == f"export: {out / 'export'}\n"
    assert "step 1/2" in proc.stderr and "step 2/2" in proc.stderr
    assert "FutureWarning" not in proc.stderr and "gemm_4bit_forward" not in proc.stderr  # hidden without --verbose
    assert (out / "config.toml").read_text(encoding="utf-8") == expected.stdout
    assert list(neutral.iterdir()) == []


def test_stage_presets_hold_no_copy_of_a_default():
    """One source for each default: a stage TOML sets only what differs from TrainConfig's defaults."""
    from dataclasses import fields

    from training.config import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for path in sorted((ROOT / "configs").glob("*.toml")):
        preset = tomllib.loads(path.read_text(encoding="utf-8"))
        copies = [k for k, v in preset.items() if k != "stage" and defaults.get(k) == v]
        assert copies == [], f"{path.name} repeats TrainConfig's defaults for {copies}"


def test_batch_size_unused_under_a_token_budget_is_said(capsys):
    from training.config import build_config

    build_config({"stage": "task", "batch_size": 2})
    assert "--batch_size is not used while batch_tokens = 8192" in capsys.readouterr().err
    build_config({"stage": "task", "batch_size": 2, "batch_tokens": 0})
    assert capsys.readouterr().err == ""
