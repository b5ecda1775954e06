"""The benchmark times the training step train.py runs (issue 21), not a copy of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import training.loop as loop
from training.config import build_config
from training.run import run_training

EMRQA = Path(__file__).resolve().parents[1] / "examples" / "emrqa_sample.jsonl"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def step_calls(monkeypatch):
    """Every call of training.loop.train_step, by the caller's module."""
    import inspect

    calls: list[str] = []
    real = loop.train_step

    def spy(*args, **kwargs):
        calls.append(inspect.stack()[1].frame.f_globals["__name__"])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", spy)
    return calls


def test_bench_and_train_py_run_the_same_step_function(step_calls, tmp_path, lm_losses):
    from bench.run import StepVariant, load_ours, run_ours
    from bench.synthetic import training_examples
    from training.data import TrainItem

    run_training(
        build_config(
            dict(
                stage="domain",
                preset="tiny",
                data=str(EMRQA),
                out=str(tmp_path / "run"),
                max_steps=2,
                batch_tokens=2048,
                progress=False,
                plot=False,
                joint=True,
            )
        )
    )
    assert step_calls == ["training.loop", "training.loop"]  # train.py's loop, once per optimizer step

    model = load_ours(None, "tiny", torch.device("cpu"), False, False, False)
    from model.presets import get_preset

    vocab = get_preset("tiny").arch["vocab_size"]
    items = [TrainItem(e) for e in training_examples(8, 256, vocab, seed=0)]
    del lm_losses[:]  # the bench's steps only
    row = run_ours(
        model, items, StepVariant("tiny", "tokens", max_tokens=1024), steps=2, warmup=1, device=torch.device("cpu")
    )
    assert step_calls[2:] == ["bench.run"] * 3  # the bench: 1 warm-up + 2 timed steps, the same function
    # One micro-batch a step: the first step's LM loss (before any update), and the mean of all three
    assert row["first_lm_loss"] == pytest.approx(lm_losses[0], abs=1e-4)
    assert row["mean_lm_loss"] == pytest.approx(sum(lm_losses) / 3, abs=1e-4)
    assert row["first_lm_loss"] != pytest.approx(row["mean_lm_loss"], abs=1e-4)  # so the two checks differ
    assert row["batches"] == 2 and row["real_tokens"] > 0 and row["warmup_s"] >= 0 and row["recompiles"] == 0


def test_bench_frees_a_variants_model_before_loading_the_next(monkeypatch):
    """A variant's peak memory is its own: when the load settings change, the model held so
    far is gone before the next one loads (a bf16 base once added 8 GB to the next peak)."""
    import gc
    import weakref
    from types import SimpleNamespace

    from bench import run

    alive_at_load: list[bool] = []
    previous: list[weakref.ref] = []

    def fake_load(*args):
        gc.collect()
        alive_at_load.append(any(ref() is not None for ref in previous))
        model = torch.nn.Linear(2, 2)
        previous.append(weakref.ref(model))
        return model

    monkeypatch.setattr(run, "load_ours", fake_load)
    monkeypatch.setattr(run, "our_reference_loss", lambda model, rows, device: 0.0)
    b = SimpleNamespace(model_dir="", preset="tiny", device=torch.device("cpu"), seqs=[256], result={})
    held = run.HeldModel()
    nf4, bf16 = run.VARIANTS[7], run.VARIANTS[8]
    first = run.ensure_model(b, nf4, held, {256: []})
    assert run.ensure_model(b, nf4, held, {256: []}) is first  # same settings: no new load
    del first
    run.ensure_model(b, bf16, held, {256: []})
    run.ensure_model(b, nf4, held, {256: []})
    assert alive_at_load == [False, False, False]
    assert len(b.result["numerics"]) == 3
