"""Experiment trackers (``--report_to``) through accelerate's tracker API, beside ``log.jsonl``.

``RUN/log.jsonl`` stays the source of truth (resume, loss curve and tests read it); a tracker
gets a copy of every numeric value of every row written there, under ``train/<key>`` at the
row's optimizer step, so TensorBoard, W&B, MLflow or Trackio show the same series (losses,
learning rate, tokens/s, grad norm, tokens seen, peak memory). Only numbers and the run's
config (file paths, no note text) reach a tracker.

* ``tensorboard`` writes event files to ``RUN/tensorboard/`` (offline): ``tensorboard --logdir RUN``.
  On ``--resume`` the steps after the checkpoint are purged (``purge_step``), as in ``log.jsonl``.
* ``wandb``, ``mlflow``, ``trackio`` follow their own settings (``WANDB_*``, ``MLFLOW_TRACKING_URI``, ...).

A tracker whose package is missing is refused before any work (:func:`check_tracker_installed`,
called by the config's validation), never silently dropped as accelerate itself would.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from plumbing.errors import InputError

# --report_to value -> the packages (any one of them) accelerate's tracker imports.
TRACKER_PACKAGES: dict[str, tuple[str, ...]] = {
    "none": (),
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
}
TRACKERS = tuple(TRACKER_PACKAGES)
PROJECT = "archehr"  # the project / experiment name of the hosted trackers
TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/: the event files
PREFIX = "train/"


def check_tracker_installed(name: str) -> None:
    """InputError (exit 2, one line) when ``--report_to name`` cannot run here."""
    packages = TRACKER_PACKAGES.get(name, ())
    if packages and not any(importlib.util.find_spec(p) is not None for p in packages):
        raise InputError(
            f"--report_to {name} needs the {packages[0]} package: pip install {packages[0]} "
            f"(or pip install '.[trackers]' in the archehr checkout), or use --report_to none"
        )


def accelerator_kwargs(report_to: str, out: str | Path) -> dict:
    """What ``Accelerator(...)`` needs for the tracker (nothing for ``none``)."""
    if report_to == "none":
        return {}
    from accelerate.utils import ProjectConfiguration

    # Only the logging folder: project_dir stays unset, so accelerate names no checkpoints.
    return {"log_with": [report_to], "project_config": ProjectConfiguration(logging_dir=str(out))}


def _hparams(config: dict) -> dict:
    """The run's config as the scalar values every tracker accepts."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


def start_trackers(accelerator, report_to: str, config: dict, resumed_step: int = 0) -> None:
    """Open the tracker's run (main process only; accelerate skips the others)."""
    if report_to == "none":
        return
    run_name = Path(str(config.get("out") or PROJECT)).name
    init_kwargs = {
        # RUN/tensorboard/; a resumed run drops the events after its checkpoint, as log.jsonl does.
        "tensorboard": {"purge_step": resumed_step + 1} if resumed_step else {},
        "wandb": {"name": run_name},
        "mlflow": {"run_name": run_name},
        "trackio": {"name": run_name},
    }
    project = TENSORBOARD_DIR if report_to == "tensorboard" else PROJECT
    accelerator.init_trackers(project, config=_hparams(config), init_kwargs={report_to: init_kwargs[report_to]})


def tracker_values(row: dict) -> dict[str, float]:
    """The numeric series of one log row, as ``train/<key>`` (per-rank lists as ``key_rankN``)."""
    values: dict[str, float] = {}
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, list):
            for rank, item in enumerate(value):
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    values[f"{PREFIX}{key}_rank{rank}"] = item
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values[f"{PREFIX}{key}"] = value
    return values


def log_row(accelerator, row: dict) -> None:
    """Send one ``log.jsonl`` row to the open trackers (none open: nothing happens)."""
    if getattr(accelerator, "trackers", None) and "step" in row:
        values = tracker_values(row)
        if values:
            accelerator.log(values, step=int(row["step"]))


def finish_trackers(accelerator) -> None:
    """Close the trackers' runs (flushes TensorBoard; ends the W&B / MLflow run). Not
    ``accelerator.end_training``: that would also tear down the process group."""
    for tracker in getattr(accelerator, "trackers", []):
        tracker.finish()
    if getattr(accelerator, "trackers", None):
        accelerator.trackers.clear()
