"""Shared test fixtures. Tests never download anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests explore new inputs on every local run; CI replays a fixed sequence (derandomize) so
# a pass or failure there belongs to the commit, not to the draw. A failure found locally is kept
# in .hypothesis/ and replayed until fixed.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """``../shared/fixtures`` (CI has it, a user's clone does not: skip there)."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip("../shared/fixtures is absent (only CI and the developers have it)")
    return SHARED_FIXTURES


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a training test module, restored afterwards: the tiny model gains
    little from a second thread, and on a busy 2-core machine two spinning OpenMP threads made
    these tests ~10x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    from model.presets import bundled_tokenizer_dir

    return AutoTokenizer.from_pretrained(bundled_tokenizer_dir())


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip (not fail) where CUDA is absent, also when selected with -m gpu."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lm_losses(monkeypatch) -> list[float]:
    """Every micro-batch's LM loss, in order, as ``training.loop.forward_backward`` returned it."""
    import training.loop as loop

    seen: list[float] = []
    real = loop.forward_backward

    def forward_backward(*args, **kwargs):
        losses = real(*args, **kwargs)
        seen.append(float(losses["lm"]))
        return losses

    monkeypatch.setattr(loop, "forward_backward", forward_backward)
    return seen
