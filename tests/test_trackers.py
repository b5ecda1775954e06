"""``--report_to``: TensorBoard event files hold every series of ``log.jsonl`` (tiny preset, CPU,
offline), a resumed run's events are not doubled, and a tracker whose package is missing is
refused with one line before any work."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import train
from tests.hooks import train_hooks
from training.config import build_config
from training.run import run_training
from training.trackers import TENSORBOARD_DIR, check_tracker_installed, tracker_values

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = EXAMPLES / "emrqa_sample.jsonl"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(out: Path, **overrides):
    values = dict(
        stage="domain",
        preset="tiny",
        data=str(DATA),
        out=str(out),
        max_steps=4,
        batch_size=2,
        log_every=1,
        progress=False,
        plot=False,
        gradient_checkpointing=False,
        report_to="tensorboard",
    )
    values.update(overrides)
    return build_config(values)


def _events(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in RUN/tensorboard, as (step, value) pairs in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    event_dirs = {p.parent for p in (run / TENSORBOARD_DIR).rglob("events.out.tfevents.*")}
    for folder in event_dirs:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in series.items()}


def _log_rows(run: Path) -> list[dict]:
    """The rows sent to the trackers: all but the set-up row (log.jsonl only)."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "setup_steps_s" not in r]


def _expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for tag, value in tracker_values(row).items():
            expected.setdefault(tag, []).append((row["step"], value))
    return expected


def _assert_same_series(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        # TensorBoard stores scalars as float32.
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard (the dev extra)")
def test_tensorboard_event_files_hold_every_logged_series(tmp_path):
    run = tmp_path / "run"
    result = run_training(_config(run))
    rows = _log_rows(run)
    assert result.steps == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    got = _events(run)
    _assert_same_series(got, _expected(rows))
    # The series the issue names: losses, learning rate, tokens/s, grad norm (and tokens seen).
    assert {"train/loss", "train/lm", "train/lr", "train/tokens_per_s", "train/grad_norm", "train/tokens"} <= set(got)
    assert all(v > 0 for _, v in got["train/grad_norm"])
    assert (run / "log.jsonl").is_file()  # the source of truth stays


def _raw_points(run: Path, tag: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``tag``'s points in the run's main event files, in write order: all of them, and those left
    after applying each restart marker (a SessionLog START at step s drops earlier points >= s)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog
    from tensorboard.util.tensor_util import make_ndarray

    everything: list[tuple[int, float]] = []
    kept: list[tuple[int, float]] = []
    for path in sorted((run / TENSORBOARD_DIR).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                kept = [(s, v) for s, v in kept if s < event.step]
            for value in event.summary.value:
                if value.tag == tag:
                    number = (
                        value.simple_value
                        if value.WhichOneof("value") == "simple_value"
                        else make_ndarray(value.tensor).item()
                    )
                    everything.append((event.step, number))
                    kept.append((event.step, number))
    return everything, kept


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard (the dev extra)")
def test_resumed_run_purges_the_events_after_its_checkpoint(tmp_path):
    import shutil

    run = tmp_path / "run"
    with train_hooks(stop_after_steps=3):
        first = run_training(_config(run, max_steps=5, save_every=2))
    assert first.interrupted and first.steps == 3
    # As if the process died after logging step 3 and before its checkpoint: resume from step 2.
    shutil.rmtree(run / "checkpoints" / "step-3")
    final = run_training(
        build_config({"out": str(run)}, base=json.loads((run / "config.json").read_text())), resume=True
    )
    assert final.steps == 5
    rows = _log_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    everything, kept = _raw_points(run, "train/tokens_per_s")
    assert [s for s, _ in everything] == [1, 2, 3, 3, 4, 5]  # step 3 was written by both attempts
    # ... and the resumed writer's restart marker drops the first one, as log.jsonl was truncated.
    assert kept == [(r["step"], pytest.approx(r["tokens_per_s"], rel=1e-6)) for r in rows]
    _assert_same_series(_events(run), _expected(rows))


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "trackio"])
def test_a_missing_tracker_package_is_one_line_before_any_work(tracker, tmp_path, capsys):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(
            ["--stage", "domain", "--preset", "tiny", "--data", str(DATA), "--out", str(out), "--report_to", tracker]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install {tracker}" in err[0] and "--report_to" in err[0]
    assert not out.exists()


def test_a_missing_tensorboard_is_refused_too(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a),
    )
    with pytest.raises(Exception, match="pip install tensorboard"):
        check_tracker_installed("tensorboard")
    check_tracker_installed("none")


def test_an_unknown_tracker_is_a_bad_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(
            [
                "--stage",
                "domain",
                "--preset",
                "tiny",
                "--data",
                str(DATA),
                "--out",
                str(tmp_path / "r"),
                "--report_to",
                "comet",
            ]
        )
    assert stop.value.code == 2
    assert "--report_to must be one of none, tensorboard, wandb, mlflow, trackio" in capsys.readouterr().err


def test_tracker_values_keep_numbers_only():
    row = {
        "step": 7,
        "epoch": 0,
        "loss": 1.5,
        "lr": 1e-4,
        "resumed_from": "step-5",
        "flag": True,
        "max_mem_gb_ranks": [1.0, 2.0],
        "bad": float("nan"),
    }
    assert tracker_values(row) == {
        "train/epoch": 0,
        "train/loss": 1.5,
        "train/lr": 1e-4,
        "train/max_mem_gb_ranks_rank0": 1.0,
        "train/max_mem_gb_ranks_rank1": 2.0,
    }
