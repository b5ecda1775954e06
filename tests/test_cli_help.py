"""train.py explains itself: every config key in --help, the resolved config with --print-config."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

from training.config import TrainConfig, build_config
from training.config_docs import FIELD_HELP

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_every_config_key_has_a_meaning():
    names = [f.name for f in fields(TrainConfig)]
    assert sorted(FIELD_HELP) == sorted(names)
    assert all(FIELD_HELP[n].strip() for n in names)


def test_help_lists_every_key_with_type_default_and_meaning():
    proc = run_train("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  --")}
    stages = {stage: build_config({"stage": stage}) for stage in ("domain", "task")}
    for field in fields(TrainConfig):
        line = lines[f"--{field.name}"]
        shown = [repr(getattr(cfg, field.name)) for cfg in stages.values()]
        assert line.split()[1:4] == [field.type, *shown], line  # type, then each stage's own default
        assert FIELD_HELP[field.name] in line
    # the defaults a user gets, not the dataclass's: the domain stage's TOML turns these on
    assert lines["--batch_tokens"].split()[2:4] == ["16384", "8192"]  # configs/domain.toml, configs/task.toml
    assert lines["--joint"].split()[2:4] == ["True", "False"]
    for flag in ("--print-config", "--no-progress", "--verbose", "--config", "--resume"):
        assert flag in proc.stdout
    # Written out by hand, not derived from TrainConfig: what a user reads for a few keys.
    expected = {
        "--lr": ("float", "0.0002", "learning rate"),
        "--log_every": ("int", "10", "every N optimizer steps"),
        "--pos_weight": ("float", "5.0", "positive"),
        "--head_pooling": ("str", "'mean'", "attention"),
        "--max_length": ("int", "2048", "skipped"),
    }
    for flag, (kind, default, meaning) in expected.items():
        assert lines[flag].split()[1:3] == [kind, default] and meaning in lines[flag], lines[flag]


def test_print_config_shows_the_resolved_config_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = run_train(
        "--stage",
        "task",
        "--preset",
        "tiny",
        "--lr",
        "3e-4",
        "--joint",
        "--out",
        str(out),
        "--print-config",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    printed = tomllib.loads(proc.stdout)
    expected = build_config(dict(stage="task", preset="tiny", lr=3e-4, joint=True, out=str(out))).to_dict()
    assert printed == expected
    # Independently of build_config: the overrides, then configs/task.toml, then the dataclass defaults.
    assert (printed["stage"], printed["preset"], printed["lr"], printed["joint"], printed["out"]) == (
        "task",
        "tiny",
        3e-4,
        True,
        str(out),
    )
    task_toml = tomllib.loads((ROOT / "configs" / "task.toml").read_text(encoding="utf-8"))
    assert len(task_toml) >= 5 and printed["lr"] != task_toml["lr"]
    assert {k: printed[k] for k in task_toml if k not in ("lr", "joint")} == {
        k: v for k, v in task_toml.items() if k not in ("lr", "joint")
    }
    assert printed["lora_r"] == 16 and "lora_r" not in task_toml  # the dataclass default
    assert list(tmp_path.iterdir()) == []


def test_no_progress_sets_progress_false(tmp_path):
    proc = run_train("--stage", "domain", "--no-progress", "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tomllib.loads(proc.stdout)["progress"] is False


def test_unknown_key_is_one_line_exit_2(tmp_path):
    proc = run_train("--no_such_key", "1", "--print-config", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_score_cv_takes_training_keys_like_train_py(tmp_path, monkeypatch):
    """`score.py cv --max_steps 2 ...` means what `--set max_steps=2` means (one override parser)."""
    import evaluation.cv
    import score
    from evaluation.head import parse_settings

    seen = {}
    monkeypatch.setattr(evaluation.cv, "run_cv", lambda opts: seen.setdefault("opts", opts))
    monkeypatch.setattr(evaluation.cv, "print_summary", lambda result: None)
    base = ["cv", "--xml", "x.xml", "--key", "k.json", "--out", str(tmp_path / "cv"), "--seed", "3"]
    assert (
        score.main(
            base
            + [
                "--max_steps",
                "2",
                "--lr",
                "1e-3",
                "--gradient_checkpointing",
                "false",
                "--head_layer",
                "-2",
                "--set",
                "log_every=1",
            ]
        )
        == 0
    )
    opts = seen["opts"]
    assert opts.seed == 3
    assert parse_settings(opts.settings) == {
        "log_every": 1,
        "max_steps": 2,
        "lr": 1e-3,
        "gradient_checkpointing": False,
        "head_layer": -2,
    }


def test_score_cv_unknown_key_is_one_line_exit_2(tmp_path, capsys):
    import pytest

    import score

    with pytest.raises(SystemExit) as exit_info:
        score.main(["cv", "--xml", "x.xml", "--key", "k.json", "--out", str(tmp_path / "cv"), "--no_such_key", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no_such_key" in err


def _import_bitsandbytes(verbose: bool) -> str:
    code = (
        "import warnings; from plumbing.console import quiet_library_noise; "
        f"quiet_library_noise({verbose}); import bitsandbytes; "
        "warnings.warn('library internals moved', FutureWarning)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_library_noise_hidden_unless_verbose():
    loud, quiet = _import_bitsandbytes(True), _import_bitsandbytes(False)
    assert "library internals moved" in loud and "library internals moved" not in quiet
    assert "gemm_4bit_forward" not in quiet  # present in `loud` only on CPUs where bitsandbytes says it


def test_no_progress_hides_loading_bars(monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    from plumbing.console import hide_progress_bars

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    try:
        hide_progress_bars()
        assert not hf_logging.is_progress_bar_enabled()
        assert are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()
        enable_progress_bars()


def test_no_progress_reaches_transformers_imported_afterwards():
    """hide_progress_bars() does not import transformers (the standalone load never needs it);
    a transformers imported afterwards still hides its bars."""
    script = (
        "import sys\n"
        "from plumbing.console import hide_progress_bars\n"
        "hide_progress_bars()\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers.utils import logging\n"
        "print(logging.is_progress_bar_enabled())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_lora_head_and_loss_defaults_have_one_source():
    """TrainConfig reads LoRA and head defaults from their classes; LossSettings reads TrainConfig."""
    import inspect

    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from model.presets import LoraSettings
    from training.joint import LossSettings

    cfg, lora, loss = TrainConfig(), LoraSettings(), LossSettings()
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (lora.r, lora.alpha, lora.dropout)
    head = HeadConfig(hidden_size=8)
    for name in ("proj_dim", "mlp_dim", "pooling", "layer", "relevance", "dropout"):
        assert getattr(cfg, f"head_{name}") == getattr(head, name), name
    assert NotePairHead(8).config == HeadConfig(hidden_size=8)
    assert (loss.align_weight, loss.pos_weight, loss.relevance_weight) == (
        cfg.align_weight,
        cfg.pos_weight,
        cfg.relevance_weight,
    )
    source = inspect.getsource(LossSettings) + inspect.getsource(TrainConfig)
    assert "lora_r: int = LoraSettings.r" in source and "align_weight: float = TrainConfig.align_weight" in source
