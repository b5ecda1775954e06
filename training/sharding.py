"""Which micro-batches each process trains on, in lock-step with the other processes.

An epoch is a deterministic list of *global* batches (``EpochBatches`` /
``TokenBudgetBatches``: a pure function of seed and epoch). One optimizer step takes
a window of ``processes * grad_accum`` consecutive global batches; inside a window,
rank ``r`` takes the window's batches ``r, r + P, r + 2P, ...``. The last window of an
epoch may be short: every rank still runs the same number of micro-steps in it (the
ranks without a batch of their own run a *filler*, a real batch whose loss is scaled
by 0), so every collective (DDP's gradient all-reduce, FSDP's gathers, the token and
loss reductions, gradient clipping) is entered the same number of times on every rank.
The summed gradient is exactly what one process taking the whole window with
``grad_accum * processes`` micro-batches computes, so layouts can be swapped on resume.

Why not accelerate's ``BatchSamplerShard``: it treats any batch whose length differs
from the sampler's ``batch_size`` as incomplete. Token-budget batches have varying
lengths, so all but the end-of-epoch batch were dropped and that one was padded with
a negative slice of the first batches: one oversized batch per rank per epoch (the
"epoch grows by one every step" of issue 13) and, when the last batch was longer than
the first ``P`` batches together, an *empty* batch on one rank (collate fails there).
Even with fixed-size batches it repeats examples to fill a short last batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence


@dataclass(frozen=True)
class MicroBatch:
    """One micro-step of one rank."""

    indices: list[int]  # dataset indices
    weight: float  # 1.0, or 0.0 for a filler that only keeps the ranks in step
    last_of_step: bool  # synchronise gradients and take the optimizer step after this one
    consumed: int  # global batches of the epoch done once this micro-step's window is done
    end_of_epoch: bool  # this micro-step's window is the epoch's last


def steps_in_epoch(num_batches: int, start: int, processes: int, grad_accum: int) -> int:
    """Optimizer steps left in an epoch of ``num_batches`` global batches from ``start`` on."""
    return math.ceil(max(0, num_batches - start) / (processes * grad_accum))


def rank_micro_batches(
    global_batches: Sequence[Sequence[int]], start: int, processes: int, rank: int, grad_accum: int
) -> Iterator[MicroBatch]:
    """This rank's micro-batches of one epoch from global batch ``start`` on (see module doc)."""
    if not 0 <= rank < processes or grad_accum < 1:
        raise ValueError(f"bad layout: rank {rank} of {processes}, grad_accum {grad_accum}")
    n = len(global_batches)
    window = processes * grad_accum
    for first in range(start, n, window):
        size = min(window, n - first)
        micro_steps = math.ceil(size / processes)  # the same on every rank
        end = first + size
        for j in range(micro_steps):
            k = j * processes + rank
            real = k < size
            yield MicroBatch(
                indices=list(global_batches[first + k] if real else global_batches[first]),
                weight=1.0 if real else 0.0,
                last_of_step=j == micro_steps - 1,
                consumed=end,
                end_of_epoch=end == n,
            )
