"""What a run folder tells about the run: the learning rate each logged step used, every loss part plotted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import build_config
from training.loop import plot_losses, run_training

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_one_step_run_logs_the_rate_it_used_and_plots_every_loss_part(tmp_path):
    cfg = build_config(dict(stage="task", joint=True, preset="tiny", xml=str(EXAMPLES / "archehr-qa.xml"),
                            key=str(EXAMPLES / "archehr-qa_key.json"), out=str(tmp_path / "run"), max_steps=1,
                            batch_size=1, lr=3e-4, warmup_ratio=0.0, schedule="cosine", log_every=1,
                            progress=False))
    run_training(cfg)
    [row] = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert row["step"] == 1
    assert row["lr"] == pytest.approx(3e-4)  # not the schedule's value after the last step (0)
    assert {"loss", "lm", "align", "relevance"} <= set(row)
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
    assert plot_losses(tmp_path / "run" / "log.jsonl", tmp_path / "again.png") == ["loss", "lm", "align", "relevance"]
