"""Token-budget batches: rows of similar length packed until rows x longest <= budget.

Fixed-row batches of mixed-length data waste most of their compute on padding (a row
of 300 real tokens padded to 2048); sorting by length and filling each batch up to a
token budget keeps padding small and the GPU busy with one large matmul per layer.
The order is a pure function of (seed, epoch), like ``EpochBatches``.
"""
from __future__ import annotations

import random
from typing import Sequence


def token_budget_batches(
    lengths: Sequence[int], max_tokens: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
    max_rows: int | None = None,
) -> list[list[int]]:
    """Index batches whose padded size (rows x longest row) stays within ``max_tokens``.

    Rows are sorted longest first so each batch holds neighbours in length; the batch
    order is then shuffled. A row longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        new_width = max(width, lengths[i])
        too_many = max_rows is not None and len(current) >= max_rows
        if current and (new_width * (len(current) + 1) > max_tokens or too_many):
            batches.append(current)
            current, new_width = [], lengths[i]
        current.append(i)
        width = new_width
    if current:
        batches.append(current)
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(batches)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded [rows x width] blocks that is padding."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - real / padded if padded else 0.0
