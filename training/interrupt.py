"""Stopping training cleanly: deferred SIGINT/SIGTERM and the non-finite guard.

Inside :class:`StopRequests` a first SIGINT or SIGTERM (Ctrl-C, cluster preemption)
only sets a flag; the loop checks it after each optimizer step, saves a checkpoint at
that step and ends with :class:`~plumbing.errors.Interrupted` (exit 130, one line saying
how to resume). A second signal gives up at once (exit 130; the previous checkpoint
stands, a half-written one is never renamed into place).

:func:`check_finite` stops a run whose loss or gradient norm stopped being a finite
number: one line naming the step, the last good checkpoint kept, no export (exit 2).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import torch

from plumbing.errors import EXIT_INTERRUPTED, InputError, Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(InputError):
    """Loss or gradient norm became NaN/inf: usually the learning rates; exit 2."""


class StopRequests:
    """Context manager: SIGINT/SIGTERM set ``requested`` instead of killing the process."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            print(f"{signal.Signals(signum).name} again: stopping without a new checkpoint", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED)
        self.requested = signum
        print(
            f"{signal.Signals(signum).name}: saving a checkpoint after the current step (signal again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def any_rank(self, accelerator) -> bool:
        """Whether any process was asked to stop (all ranks then stop at the same step)."""
        flag = self.requested is not None
        if accelerator.num_processes == 1:
            return flag
        total = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum")
        return bool(total.item() > 0)


def interrupted_message(step: int, run_dir: Path) -> Interrupted:
    return Interrupted(f"interrupted at step {step}; resume with: python train.py --resume {run_dir}")


def non_finite(values: dict[str, float]) -> list[str]:
    return [k for k, v in values.items() if not math.isfinite(v)]


def check_finite(
    step: int,
    bad_losses: list[str],
    grad_norm: float | None,
    accelerator,
    last_good: Callable[[], Path | None],
    run_dir: Path,
    anywhere: bool | None = None,
) -> None:
    """Raise :class:`TrainingDiverged` (on every rank) when this step's loss or grad norm is not finite.

    ``anywhere``: whether any process saw a non-finite number, when the caller already reduced
    that flag on the device (the training loop does, with the step's other numbers); else it is
    reduced here."""
    local = bool(bad_losses) or (grad_norm is not None and not math.isfinite(grad_norm))
    flag = local if anywhere is None else anywhere or local
    if anywhere is None and accelerator.num_processes > 1:
        flag = bool(accelerator.reduce(torch.tensor(float(local), device=accelerator.device), "sum").item() > 0)
    if not flag:
        return
    what = (
        f"non-finite loss ({', '.join(bad_losses)})"
        if bad_losses
        else (f"non-finite gradient norm ({grad_norm})" if local else "non-finite loss on another process")
    )
    good = last_good()
    kept = f"last good checkpoint: {good}" if good is not None else "no checkpoint was saved"
    raise TrainingDiverged(
        f"training diverged at step {step}: {what}; {kept}; nothing exported (lower --lr / --head_lr?)", run_dir
    )


_active: list[StopRequests] = []


class deferred_stops(StopRequests):
    """:class:`StopRequests` that the training loop sees (``with deferred_stops(): run_training(...)``)."""

    def __enter__(self) -> "deferred_stops":
        super().__enter__()
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)
        super().__exit__(*exc)


def stop_requested(accelerator) -> bool:
    """Whether a signal asked the run to stop (False outside :class:`deferred_stops`)."""
    return _active[-1].any_rank(accelerator) if _active else False
