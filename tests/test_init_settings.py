"""A stage started from --init loads its adapter and head as trained: their settings are recorded,
and an explicit different --lora_* / --head_* is refused instead of silently ignored."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from training.config import build_config
from training.run import run_training

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
XML, KEY, EMRQA = EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json", EXAMPLES / "emrqa_sample.jsonl"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def domain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "domain"
    cfg = build_config(
        dict(
            stage="domain",
            preset="tiny",
            data=str(EMRQA),
            out=str(out),
            max_steps=1,
            batch_size=2,
            batch_tokens=0,
            lora_r=4,
            lora_alpha=8,
            head_proj_dim=16,
            progress=False,
            plot=False,
        )
    )
    run_training(cfg)
    return out


def task_cli(init: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--stage",
            "task",
            "--preset",
            "tiny",
            "--init",
            str(init),
            "--xml",
            str(XML),
            "--key",
            str(KEY),
            *extra,
            "--print-config",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_resolved_config_takes_the_init_adapter_settings(domain_run):
    proc = task_cli(domain_run)
    assert proc.returncode == 0, proc.stderr
    cfg = tomllib.loads(proc.stdout)
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["head_proj_dim"]) == (4, 8, 16)
    assert "lora_r 16 -> 4" in proc.stderr  # said on screen, not silent
    assert task_cli(domain_run, "--lora_r", "4").returncode == 0  # the same value is fine


@pytest.mark.parametrize("key, value", [("lora_r", "32"), ("lora_dropout", "0.1"), ("head_proj_dim", "64")])
def test_explicit_different_value_is_refused(domain_run, key, value):
    proc = task_cli(domain_run, f"--{key}", value)
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert f"--{key}" in line and "--init" in line


def test_run_config_records_the_adapter_it_trained(domain_run, tmp_path):
    cfg = build_config(
        dict(
            stage="task",
            joint=True,
            preset="tiny",
            init=str(domain_run),
            xml=str(XML),
            key=str(KEY),
            out=str(tmp_path / "task"),
            max_steps=1,
            batch_size=1,
            progress=False,
            plot=False,
        )
    )
    assert cfg.lora_r == 16  # the task preset's value: not what the adapter has
    run_training(cfg)
    recorded = json.loads((tmp_path / "task" / "config.json").read_text())
    assert (recorded["lora_r"], recorded["lora_alpha"], recorded["head_proj_dim"]) == (4, 8, 16)
    adapter = json.loads((tmp_path / "task" / "export" / "adapter_config.json").read_text())
    assert adapter["r"] == 4


def test_cv_refuses_an_explicit_setting_that_differs_from_the_init_export(domain_run, tmp_path):
    """score.py cv starts every fold from --init: the same rule as train.py, before anything is written."""
    out = tmp_path / "cv"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "score.py"),
            "cv",
            "--xml",
            str(XML),
            "--key",
            str(KEY),
            "--folds",
            "2",
            "--preset",
            "tiny",
            "--init",
            str(domain_run),
            "--out",
            str(out),
            "--lora_r",
            "32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert "--lora_r" in line and "--init" in line
    assert not out.exists()
