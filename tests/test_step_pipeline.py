"""The training step never waits for the GPU between steps (issue 21), and a NaN still never
reaches the weights: the fused optimizer skips a flagged step on the device and the loop stops
when that step's numbers are read back, one step later."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import training.loop as loop
from training.config import build_config
from training.interrupt import TrainingDiverged
from training.run import run_training

EMRQA = Path(__file__).resolve().parents[1] / "examples" / "emrqa_sample.jsonl"
BAD_STEP = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(out: Path, **extra):
    settings = dict(
        stage="domain",
        preset="tiny",
        data=str(EMRQA),
        out=str(out),
        max_steps=6,
        batch_tokens=2048,
        log_every=100,
        save_every=0,
        compile=False,
        progress=False,
        plot=False,
        joint=True,
    )
    settings.update(extra)
    return build_config(settings)


@pytest.fixture
def nan_at_step(monkeypatch):
    """Step BAD_STEP's forward + backward returns a NaN loss and leaves NaN gradients; records, per
    optimizer step, the trainable weights after it and whether its numbers were still unread."""
    seen: dict = {"forwards": 0, "weights": [], "unread_after_step": []}
    real_fb, real_step = loop.forward_backward, loop.optimizer_step

    def forward_backward(model, batch, accelerator, grad_accum=1, weight=1.0):
        losses = real_fb(model, batch, accelerator, grad_accum, weight)
        seen["forwards"] += 1
        if seen["forwards"] == BAD_STEP:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)
            losses["lm"] = torch.full_like(losses["lm"], math.nan)
        return losses

    def optimizer_step(t, state, params, step_losses):
        lr = real_step(t, state, params, step_losses)
        seen["weights"].append([p.detach().clone() for p in params])
        seen["unread_after_step"].append(state.pending is not None)
        return lr

    monkeypatch.setattr(loop, "forward_backward", forward_backward)
    monkeypatch.setattr(loop, "optimizer_step", optimizer_step)
    return seen


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_nan_step_is_skipped_on_the_device_and_stops_the_run_when_read(nan_at_step, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=rf"training diverged at step {BAD_STEP}: non-finite loss \(lm\)"):
        run_training(config(out))
    weights = nan_at_step["weights"]
    # Steps were read back one step late: the host queued the next step before reading this one.
    assert nan_at_step["unread_after_step"] == [True] * BAD_STEP
    assert nan_at_step["forwards"] == BAD_STEP + 1  # the step after the NaN ran, its update did not
    assert len(weights) == BAD_STEP
    assert not same(weights[0], weights[1])  # the steps before learned
    assert same(weights[BAD_STEP - 2], weights[BAD_STEP - 1])  # the NaN step changed no weight
    assert all(torch.isfinite(w).all() for w in weights[-1])
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == BAD_STEP and "non-finite loss (lm)" in rows[-1]["diverged"]
    assert not (out / "export").exists()


def test_an_optimizer_that_cannot_skip_is_checked_before_its_step(nan_at_step, tmp_path, monkeypatch):
    import training.run as run

    real = run.make_optimizer

    def unfused(model, cfg):
        opt = real(model, cfg)
        for group in opt.param_groups:
            group["fused"] = None  # what a checkpoint from before the fused optimizer restores
        return opt

    monkeypatch.setattr(run, "make_optimizer", unfused)
    with pytest.raises(TrainingDiverged, match=rf"diverged at step {BAD_STEP}: non-finite loss"):
        run_training(config(tmp_path / "run"))
    assert nan_at_step["unread_after_step"] == [False] * (BAD_STEP - 1)  # each read before its update
    assert nan_at_step["forwards"] == BAD_STEP  # stopped before the NaN step's update
    assert len(nan_at_step["weights"]) == BAD_STEP - 1


def test_logged_losses_are_the_mean_of_every_step_read_late(tmp_path, lm_losses):
    """The logging window gets every step's losses, the last one read before the log line."""
    run_training(config(tmp_path / "run", max_steps=4, log_every=4))
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "lm" in r]
    assert len(lm_losses) == 4 and len(logged) == 1
    assert logged[0]["lm"] == pytest.approx(sum(lm_losses) / 4, rel=1e-5)
    assert logged[0]["grad_norm"] > 0


def test_make_optimizer_is_fused_and_skips_a_flagged_step():
    from training.config import TrainConfig
    from training.run import make_optimizer

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Linear(3, 2)
            self.head = None

    model = Tiny()
    opt = make_optimizer(model, TrainConfig(stage="domain", lr=0.1))  # type: ignore[arg-type]
    assert loop.skips_on_device(opt)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.found_inf = torch.tensor(1.0)  # type: ignore[attr-defined]
    opt.step()
    assert same(before, [p.detach() for p in model.parameters()])
    opt.found_inf = torch.tensor(0.0)  # type: ignore[attr-defined]
    opt.step()
    assert not same(before, [p.detach() for p in model.parameters()])
