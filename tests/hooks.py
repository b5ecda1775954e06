"""Setting training.hooks' test-only environment variables around a run or a launch.

``ARCHEHR_TEST_STOP_AFTER_STEPS=N`` stops a training run after step N (after
checkpointing) as if interrupted; ``ARCHEHR_TEST_RECORD_BATCHES=DIR`` makes every
process append its micro-batches' dataset indices to ``DIR/batches-rankR.jsonl``.
They are environment variables, not config keys, so they reach processes started by
``accelerate launch`` (which inherit the environment) and never a run's saved config.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from training.hooks import RECORD_BATCHES_ENV, STOP_AFTER_STEPS_ENV


@contextlib.contextmanager
def train_hooks(stop_after_steps: int = 0, record_batches: str | Path | None = None) -> Iterator[None]:
    """The hooks set for the ``with`` block (in this process and what it starts), then restored."""
    values = {
        STOP_AFTER_STEPS_ENV: str(stop_after_steps) if stop_after_steps else None,
        RECORD_BATCHES_ENV: str(record_batches) if record_batches else None,
    }
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: dict[str, str | None]) -> None:
    """Set each variable; None removes it."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
