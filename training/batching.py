"""Batches of training items: which items go together, in what order, on which process.

An epoch is a deterministic list of *global* batches, a pure function of
``(seed, epoch)`` so a resumed run sees exactly the batches an uninterrupted run would,
without touching the global RNG: fixed-size :class:`EpochBatches` (optionally grouped
by length) or :class:`TokenBudgetBatches` (see below). :func:`rank_micro_batches`
splits them between processes and micro-steps; :func:`collate` turns one batch into
tensors: a right-padded [B, T] block plus every example's note/answer spans stacked as
``(row, start, end)`` rows, the flattened 0/1 pair targets of the examples that have
citations, and relevance targets where the key gives them, with the index tensors the
losses gather by (answer-token positions, scored pairs, labelled notes).

Token-budget batches: rows of similar length packed until rows x longest <= budget.
Fixed-row batches of mixed-length data waste most of their compute on padding (a row
of 300 real tokens padded to 2048); sorting by length and filling each batch up to a
token budget keeps padding small and the GPU busy with one large matmul per layer.

Sharding between processes:
Which micro-batches each process trains on, in lock-step with the other processes.

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
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from data.prompts import IGNORE_INDEX
from heads.alignment import pair_rows

if TYPE_CHECKING:
    from .data import TrainItem


def token_budget_batches(
    lengths: Sequence[int],
    max_tokens: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
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


class EpochBatches:
    """Deterministic batches of item indices per epoch: shuffled with ``seed + epoch``,
    optionally grouped by length (sorted within windows of 50 batches, then the
    batches shuffled) to cut padding. The training loop asks for an epoch's batches and
    resumes inside them itself (``rank_micro_batches``)."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True, group_by_length: bool = False
    ):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length

    def batches(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            window = self.batch_size * 50
            order = [
                i
                for w in range(0, len(order), window)
                for i in sorted(order[w : w + window], key=lambda j: -self.lengths[j])
            ]
        out = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.group_by_length and self.shuffle:
            rng.shuffle(out)
        return out

    def num_batches(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


class TokenBudgetBatches(EpochBatches):
    """``EpochBatches`` whose batches are filled to a token budget (see token_budget_batches)."""

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int, shuffle: bool = True):
        super().__init__(lengths, 1, seed, shuffle, group_by_length=True)
        self.max_tokens = max_tokens
        self._count = len(self.batches(0))

    def batches(self, epoch: int) -> list[list[int]]:
        return token_budget_batches(self.lengths, self.max_tokens, seed=self.seed, epoch=epoch, shuffle=self.shuffle)

    def num_batches(self) -> int:
        return self._count


# Batch widths are padded up to a multiple of 8: the compiled decoder layer's graph guards on
# the sequence length's alignment (inductor's ``is_aligned_realized_tensor``: T % 8 == 0), so
# mixed widths compiled a second graph mid-run (issue 21: a 20 s recompile in the timed steps).
PAD_WIDTH_TO = 8


def collate(items: Sequence[TrainItem], pad_id: int) -> dict:
    """Right-padded tensors plus stacked spans/targets (see module docstring)."""
    width = -(-max(len(it) for it in items) // PAD_WIDTH_TO) * PAD_WIDTH_TO
    b = len(items)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    note_spans, answer_spans, note_counts, answer_counts = [], [], [], []
    pair_targets, has_pairs, rel_targets, rel_mask, pair_index = [], [], [], [], []
    for row, it in enumerate(items):
        enc = it.encoded
        n = len(enc)
        input_ids[row, :n] = torch.tensor(enc.input_ids)
        labels[row, :n] = torch.tensor(enc.labels)
        attention[row, :n] = 1
        cited = bool(enc.pairs) and bool(enc.answer_spans)
        if cited:  # every (answer, note) pair of the example, in pair_targets' row-major order
            pair_targets += [t for row_t in enc.pair_targets() for t in row_t]
            pair_index += pair_rows(len(answer_spans), len(note_spans), len(enc.answer_spans), len(enc.note_spans))
        note_spans += [(row, s, e) for s, e in enc.note_spans]
        answer_spans += [(row, s, e) for s, e in enc.answer_spans]
        note_counts.append(len(enc.note_spans))
        answer_counts.append(len(enc.answer_spans))
        has_pairs.append(cited)
        rel = it.relevance if it.relevance is not None and len(it.relevance) == len(enc.note_spans) else None
        rel_targets += rel if rel is not None else [0.0] * len(enc.note_spans)
        rel_mask += [rel is not None] * len(enc.note_spans)
    # Where the losses read the batch, worked out here on the host: the training step then
    # indexes with these tensors and never waits for the GPU to count (no boolean masks there).
    next_labels = labels[:, 1:].reshape(-1)
    answer_positions = (next_labels != IGNORE_INDEX).nonzero().reshape(-1)
    relevance_mask = torch.tensor(rel_mask, dtype=torch.bool)
    relevance_index = relevance_mask.nonzero().reshape(-1)
    relevance_targets = torch.tensor(rel_targets, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "right_padded": True,  # every row's padding follows its tokens: causal attention needs no mask
        "labels": labels,
        "note_spans": torch.tensor(note_spans, dtype=torch.long).reshape(-1, 3),
        "answer_spans": torch.tensor(answer_spans, dtype=torch.long).reshape(-1, 3),
        "note_counts": torch.tensor(note_counts, dtype=torch.long),
        "answer_counts": torch.tensor(answer_counts, dtype=torch.long),
        "pair_targets": torch.tensor(pair_targets, dtype=torch.float32),
        "has_pairs": torch.tensor(has_pairs, dtype=torch.bool),
        "relevance_targets": relevance_targets,
        "relevance_mask": relevance_mask,
        # [N] flat positions in [B, T-1] whose next token has a label, and those labels
        "answer_positions": answer_positions,
        "answer_targets": next_labels[answer_positions],
        # [P, 2] (answer span, note span) rows of every pair with a target, and the labelled notes
        "pair_index": torch.tensor(pair_index, dtype=torch.long).reshape(-1, 2),
        "relevance_index": relevance_index,
        "relevance_labels": relevance_targets[relevance_index],
    }


# --- sharding between processes ------------------------------------------------------


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
