"""Stopping mid-run and resuming reaches exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from training.checkpoints import checkpoint_dirs
from training.config import build_config
from training.run import run_training
from hooks import train_hooks
from synthetic import make_cases, write_archehr


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weights(export_dir) -> dict[str, torch.Tensor]:
    out = {f"adapter/{k}": v for k, v in load_file(str(export_dir / "adapter_model.safetensors")).items()}
    out.update({f"head/{k}": v for k, v in load_file(str(export_dir / "head.safetensors")).items()})
    return out


def test_resume_matches_uninterrupted_run(tmp_path):
    write_archehr(make_cases(8, seed=5), tmp_path / "c.xml", tmp_path / "k.json")
    common = dict(
        stage="task",
        joint=True,
        preset="tiny",
        xml=str(tmp_path / "c.xml"),
        key=str(tmp_path / "k.json"),
        batch_size=2,
        batch_tokens=0,
        grad_accum=2,
        epochs=3,
        lr=1e-3,
        head_lr=3e-3,
        lora_dropout=0.1,
        head_dropout=0.1,
        log_every=1,
        progress=False,
        plot=False,
        gradient_checkpointing=False,
    )
    # 8 cases / batch 2 = 4 micro-batches = 2 optimizer steps per epoch: step 3 stops mid-epoch 2.
    full = run_training(build_config(dict(common, out=str(tmp_path / "full"))))
    assert full.steps == 6 and not full.interrupted

    with train_hooks(stop_after_steps=3):
        part = run_training(build_config(dict(common, out=str(tmp_path / "part"))))
    assert part.interrupted and part.steps == 3 and part.export_dir is None
    assert not (tmp_path / "part" / "export").exists()
    [ckpt] = checkpoint_dirs(tmp_path / "part")
    assert ckpt.name == "step-3"
    for name in (
        "adapter/adapter_model.safetensors",
        "head/head.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng-0.json",
        "rng-0.pt",
        "trainer_state.json",
    ):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["position"]) == (3, 1, 2)

    # Resume through the CLI, as a user would (the stop hook is not set any more).
    assert train.main(["--resume", str(tmp_path / "part"), "--progress", "false"]) == 0
    expected, got = weights(full.export_dir), weights(tmp_path / "part" / "export")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, different[:5]
    # And the weights really moved during the resumed half (not a trivially equal pair).
    mid = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(mid[k], got[f"adapter/{k}"]) for k in mid)

    full_log, full_setup = log_rows(tmp_path / "full")
    part_log, part_setup = log_rows(tmp_path / "part")
    assert [r["step"] for r in part_log] == [r["step"] for r in full_log] == list(range(1, 7))
    assert [r["loss"] for r in part_log] == [r["loss"] for r in full_log]
    assert full_setup == [0] and part_setup == [0, 3]  # each process's set-up, at the step it started from


def log_rows(run: Path) -> tuple[list[dict], list[int]]:
    """(the step rows of a run's log.jsonl, the steps of its set-up rows)."""
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "setup_steps_s" not in r], [r["step"] for r in rows if "setup_steps_s" in r]


def test_token_count_carries_over_a_resume_between_log_lines(tmp_path):
    """A checkpoint between two log lines holds the tokens of the unlogged steps too: the resumed
    run's log counts the same tokens as an uninterrupted run's (issue 23, friction 9)."""
    write_archehr(make_cases(8, seed=5), tmp_path / "c.xml", tmp_path / "k.json")
    common = dict(
        stage="task",
        preset="tiny",
        xml=str(tmp_path / "c.xml"),
        key=str(tmp_path / "k.json"),
        batch_size=2,
        batch_tokens=0,
        grad_accum=1,
        epochs=1,
        log_every=2,
        progress=False,
        plot=False,
        gradient_checkpointing=False,
    )
    run_training(build_config(dict(common, out=str(tmp_path / "full"))))
    with train_hooks(stop_after_steps=3):  # the checkpoint at step 3, one step after the last log line
        run_training(build_config(dict(common, out=str(tmp_path / "part"))))
    assert train.main(["--resume", str(tmp_path / "part"), "--progress", "false"]) == 0
    full_log, part_log = log_rows(tmp_path / "full")[0], log_rows(tmp_path / "part")[0]
    assert [r["step"] for r in part_log] == [r["step"] for r in full_log] == [2, 4]
    assert [r["tokens"] for r in part_log] == [r["tokens"] for r in full_log]


def test_test_hooks_are_not_config_keys(monkeypatch, tmp_path):
    """stop_after_steps / record_batches are environment variables (training.hooks), not TrainConfig:
    refused on the command line, never saved, and dropped from a run saved when they were keys."""
    import dataclasses

    from plumbing.errors import InputError
    from training.config import TrainConfig, parse_overrides
    from training.hooks import train_hooks as read_hooks

    assert not {"stop_after_steps", "record_batches"} & {f.name for f in dataclasses.fields(TrainConfig)}
    for key in ("stop_after_steps", "record_batches"):
        with pytest.raises(InputError, match="unknown config key"):
            parse_overrides([f"--{key}", "3"])
    old_run = dict(dataclasses.asdict(build_config({"stage": "domain"})), stop_after_steps=3, record_batches="b")
    assert build_config({"out": "o"}, base=old_run).out == "o"

    assert read_hooks().stop_after_steps == 0 and read_hooks().record_batches is None
    with train_hooks(stop_after_steps=3, record_batches=tmp_path / "b"):
        hooks = read_hooks()
        assert hooks.stops_at(3) and not hooks.stops_at(2) and hooks.record_batches == tmp_path / "b"
    assert read_hooks().stop_after_steps == 0
