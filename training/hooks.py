"""Test and debugging hooks of the training loop: environment variables, never user config.

They are not :class:`~training.config.TrainConfig` fields, so they never reach a run's
``config.toml``, ``--help`` or a resumed run:

- ``ARCHEHR_TEST_STOP_AFTER_STEPS=N`` (tests): stop after optimizer step ``N``, after
  checkpointing, as if interrupted (0 or unset: off).
- ``ARCHEHR_TEST_RECORD_BATCHES=DIR`` (debugging, tests): every process appends the
  dataset indices of each real micro-batch it trains on to ``DIR/batches-rankR.jsonl``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

STOP_AFTER_STEPS_ENV = "ARCHEHR_TEST_STOP_AFTER_STEPS"
RECORD_BATCHES_ENV = "ARCHEHR_TEST_RECORD_BATCHES"


@dataclass(frozen=True)
class TrainHooks:
    stop_after_steps: int = 0  # > 0: stop (after checkpointing) as if interrupted
    record_batches: Path | None = None

    def stops_at(self, step: int) -> bool:
        return self.stop_after_steps > 0 and step >= self.stop_after_steps

    def record(self, rank: int, step: int, epoch: int, indices: list[int]) -> None:
        if self.record_batches is None:
            return
        self.record_batches.mkdir(parents=True, exist_ok=True)
        seen = {"rank": rank, "step": step, "epoch": epoch, "index": indices}
        with (self.record_batches / f"batches-rank{rank}.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(seen) + "\n")


def train_hooks() -> TrainHooks:
    """The hooks this process was started with (read once per run)."""
    stop = os.environ.get(STOP_AFTER_STEPS_ENV, "").strip()
    record = os.environ.get(RECORD_BATCHES_ENV, "").strip()
    return TrainHooks(int(stop) if stop else 0, Path(record) if record else None)
