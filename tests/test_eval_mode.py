"""model.head_scoring.eval_mode: scoring in the middle of training leaves each module's mode as it was."""

from __future__ import annotations

import pytest
from torch import nn

from model.head_scoring import eval_mode


def test_eval_mode_restores_each_module_own_mode_even_after_an_error():
    training, frozen = nn.Linear(2, 2).train(), nn.Linear(2, 2).eval()
    with eval_mode(training, frozen):
        assert not training.training and not frozen.training
    assert training.training and not frozen.training
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(training, frozen):
            raise RuntimeError("boom")
    assert training.training and not frozen.training
