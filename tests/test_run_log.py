"""What a run folder tells about the run: the learning rate each logged step used, every loss part
plotted, and an export README that is a real model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import build_config
from training.data import file_sha256
from training.run import plot_losses, run_training

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
XML, KEY = EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runlog") / "run"
    cfg = build_config(
        dict(
            stage="task",
            joint=True,
            preset="tiny",
            xml=str(XML),
            key=str(KEY),
            out=str(out),
            max_steps=1,
            batch_size=1,
            lr=3e-4,
            warmup_ratio=0.0,
            schedule="cosine",
            log_every=1,
            progress=False,
        )
    )
    return run_training(cfg)


def test_one_step_run_logs_the_rate_it_used_and_plots_every_loss_part(one_step_run, tmp_path):
    run = one_step_run.export_dir.parent
    setup, row = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # the set-up's fixed cost by step, before the first step's row (what the journey reports)
    assert setup["step"] == 0 and list(setup["setup_steps_s"]) == ["tokenizer_s", "data_s", "model_s", "prepare_s"]
    assert all(v >= 0 for v in setup["setup_steps_s"].values())
    assert row["step"] == 1
    assert row["lr"] == pytest.approx(3e-4)  # not the schedule's value after the last step (0)
    assert {"loss", "lm", "align", "relevance"} <= set(row)
    assert (run / "loss_curve.png").stat().st_size > 0
    assert plot_losses(run / "log.jsonl", tmp_path / "again.png") == ["loss", "lm", "align", "relevance"]


def test_export_readme_is_a_model_card(one_step_run):
    export = one_step_run.export_dir
    card = (export / "README.md").read_text(encoding="utf-8")
    manifest = json.loads((export / "manifest.json").read_text(encoding="utf-8"))
    assert "More Information Needed" not in card  # PEFT's blank template is gone
    assert "research only" in card.lower() and "not for clinical decisions" in card.lower()
    assert "randomly initialised `tiny`" in card
    assert file_sha256(XML) in card and file_sha256(KEY) in card
    assert f"threshold {manifest['alignment']['threshold']}" in card
    assert "score.py cv" in card  # no CV scores recorded yet: it says how to get them
