"""plumbing.timing.StepClock: what a model load and an export record about their steps."""

from __future__ import annotations

import time

from plumbing.timing import StepClock
from training.export import _steps_line


def test_step_clock_records_each_step_since_the_previous_one():
    took: dict[str, float] = {}
    clock = StepClock(took)
    time.sleep(0.02)
    clock("first_s")
    clock("second_s")
    assert list(took) == ["first_s", "second_s"]
    assert took["first_s"] >= 0.02 and 0 <= took["second_s"] < took["first_s"]


def test_step_clock_restart_leaves_out_the_seconds_a_callee_timed():
    took: dict[str, float] = {}
    clock = StepClock(took)
    time.sleep(0.03)  # timed by someone else
    clock.restart()
    clock("after_s")
    assert list(took) == ["after_s"] and took["after_s"] < 0.03


def test_step_clock_without_a_record_records_nothing():
    clock = StepClock(None)
    clock("base_s")  # no dict to fill, no error
    assert clock.into is None


def test_export_steps_line():
    took = {"adapter_s": 0.29, "head_s": 0.0, "calibration_s": 3.72, "manifest_s": 0.03, "fsync_s": 0.07}
    assert _steps_line(took) == "4.1 s (adapter 0.3 s, head 0.0 s, calibration 3.7 s, manifest 0.0 s, fsync 0.1 s)"
