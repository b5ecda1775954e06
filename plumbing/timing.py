"""Seconds per named step of a multi-step job (a model load, an export), for run records."""

from __future__ import annotations

import time


class StepClock:
    """Seconds since the previous call, recorded under a name (GPU work finished first, so a
    step's queued kernels are charged to it). With ``into`` None it records nothing and never
    waits for the GPU."""

    def __init__(self, into: dict[str, float] | None):
        self.into, self.now, self.last = into, time.perf_counter, time.perf_counter()

    def restart(self) -> None:
        """Start the next step now, recording nothing (a callee timed the seconds in between)."""
        self.last = self.now()

    def __call__(self, name: str) -> None:
        if self.into is None:
            return
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = self.now()
        self.into[name] = round(t - self.last, 3)
        self.last = t
