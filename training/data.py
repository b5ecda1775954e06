"""Training examples for both stages, their batching and collation.

Everything is tokenised once up front (:class:`TrainItem`); a batch is a right-padded
[B, T] block plus every example's note/answer spans stacked as ``(row, start, end)``
rows, the flattened 0/1 pair targets of the examples that have citations, and
relevance targets where the key gives them. The batch order is a pure function of
``(seed, epoch)`` so a resumed run sees exactly the batches an uninterrupted run
would, without touching the global RNG.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from data.errors import InputError
from data.prompts import IGNORE_INDEX, EncodedExample, PromptExample, encode_example, example_from_case
from data.records import Case

RELEVANT_LABELS = ("essential", "supplementary")


@dataclass
class TrainItem:
    encoded: EncodedExample
    # One 0/1 target per note sentence (span order), or None when unlabelled.
    relevance: list[float] | None = None

    def __len__(self) -> int:
        return len(self.encoded)


def relevance_targets(case: Case) -> list[float] | None:
    if not case.relevance:
        return None
    return [1.0 if case.relevance.get(sid) in RELEVANT_LABELS else 0.0 for sid in case.note_ids]


def encode_items(
    tokenizer, examples: Sequence[PromptExample], max_length: int, relevance: Sequence[list[float] | None] | None = None
) -> tuple[list[TrainItem], int]:
    """Tokenise examples; those longer than ``max_length`` are dropped (returns the count dropped)."""
    items, dropped = [], 0
    for i, ex in enumerate(examples):
        enc = encode_example(tokenizer, ex)
        if len(enc) > max_length:
            dropped += 1
            continue
        items.append(TrainItem(enc, relevance[i] if relevance is not None else None))
    return items, dropped


def emrqa_evidence_pairs(rec, ex: PromptExample) -> set[tuple[str, str]]:
    """The (answer, note) pair of the note sentence holding an emrQA answer span.

    emrQA gives a character offset into the context; sentences are located in the
    context in order, and the one covering ``answer_start`` is the evidence.
    """
    if not getattr(rec, "answerable", False) or rec.answer_start < 0 or not ex.answer_ids:
        return set()
    pos = 0
    for sid, text in zip(ex.note_ids, ex.note_texts):
        found = rec.context.find(text.strip()[:40], pos)
        if found < 0:
            continue
        end = found + len(text.strip())
        if found <= rec.answer_start < end:
            return {(ex.answer_ids[0], sid)}
        pos = found + 1
    # Offsets lost (the splitter normalised the text): the first sentence quoting the answer.
    for sid, text in zip(ex.note_ids, ex.note_texts):
        if rec.answer_text and rec.answer_text in text:
            return {(ex.answer_ids[0], sid)}
    return set()


def domain_examples(cfg) -> tuple[list[PromptExample], list[Path | str]]:
    """emrQA-MedSQuAD examples (one answer sentence; evidence pair when locatable)."""
    from data.emrqa import emrqa_to_prompt_example, load_emrqa

    if not cfg.data:
        raise InputError("--data is required for the domain stage (a .jsonl/.json/.parquet file or a hub id)")
    records = load_emrqa(cfg.data, n=cfg.n_examples or None, seed=cfg.seed, unanswerable=cfg.unanswerable)
    if not records:
        raise InputError("no usable records", cfg.data)
    examples = []
    for rec in records:
        ex = emrqa_to_prompt_example(rec)
        if cfg.joint and not ex.pairs:
            ex.pairs = emrqa_evidence_pairs(rec, ex)
        examples.append(ex)
    return examples, [cfg.data]


def task_cases(cfg) -> list[Case]:
    from data.archehr import load_cases

    if not cfg.xml or not cfg.key:
        raise InputError("--xml and --key are required for the task stage")
    cases = load_cases(cfg.xml, cfg.key)
    usable = [c for c in cases if c.answer_sentences]
    if not usable:
        raise InputError("no case has answer sentences to train on", cfg.key)
    return usable


def task_examples(cases: Sequence[Case], joint: bool) -> tuple[list[PromptExample], list[list[float] | None]]:
    examples = []
    for case in cases:
        ex = example_from_case(case, with_answer=True)
        if not joint:
            ex.pairs = set()
        examples.append(ex)
    relevance = [relevance_targets(c) if joint else None for c in cases]
    return examples, relevance


def file_sha256(path: str | Path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None  # a hub id: no local file to hash
    digest = hashlib.sha256()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- batching -------------------------------------------------------------------------


class EpochBatches:
    """Deterministic batches of item indices per epoch: shuffled with ``seed + epoch``,
    optionally grouped by length (sorted within windows of 50 batches, then the
    batches shuffled) to cut padding. ``start`` skips batches already trained on."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                 group_by_length: bool = False):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.epoch = 0
        self.start = 0

    def batches(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            window = self.batch_size * 50
            order = [i for w in range(0, len(order), window)
                     for i in sorted(order[w:w + window], key=lambda j: -self.lengths[j])]
        out = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.group_by_length and self.shuffle:
            rng.shuffle(out)
        return out

    # Deliberately not named ``set_epoch``: accelerate calls that with its own iteration
    # counter (0 after a resume), which would silently restart the data order.
    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def num_batches(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        yield from self.batches(self.epoch)[self.start:]

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start)


class TokenBudgetBatches(EpochBatches):
    """``EpochBatches`` whose batches are filled to a token budget (see training.batching)."""

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int, shuffle: bool = True):
        super().__init__(lengths, 1, seed, shuffle, group_by_length=True)
        self.max_tokens = max_tokens
        self._count = len(self.batches(0))

    def batches(self, epoch: int) -> list[list[int]]:
        from .batching import token_budget_batches

        return token_budget_batches(self.lengths, self.max_tokens, seed=self.seed, epoch=epoch, shuffle=self.shuffle)

    def num_batches(self) -> int:
        return self._count


def collate(items: Sequence[TrainItem], pad_id: int) -> dict:
    """Right-padded tensors plus stacked spans/targets (see module docstring)."""
    width = max(len(it) for it in items)
    b = len(items)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    note_spans, answer_spans, note_counts, answer_counts = [], [], [], []
    pair_targets, has_pairs, rel_targets, rel_mask = [], [], [], []
    for row, it in enumerate(items):
        enc = it.encoded
        n = len(enc)
        input_ids[row, :n] = torch.tensor(enc.input_ids)
        labels[row, :n] = torch.tensor(enc.labels)
        attention[row, :n] = 1
        note_spans += [(row, s, e) for s, e in enc.note_spans]
        answer_spans += [(row, s, e) for s, e in enc.answer_spans]
        note_counts.append(len(enc.note_spans))
        answer_counts.append(len(enc.answer_spans))
        cited = bool(enc.pairs) and bool(enc.answer_spans)
        has_pairs.append(cited)
        if cited:
            pair_targets += [t for row_t in enc.pair_targets() for t in row_t]
        rel = it.relevance if it.relevance is not None and len(it.relevance) == len(enc.note_spans) else None
        rel_targets += rel if rel is not None else [0.0] * len(enc.note_spans)
        rel_mask += [rel is not None] * len(enc.note_spans)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "note_spans": torch.tensor(note_spans, dtype=torch.long).reshape(-1, 3),
        "answer_spans": torch.tensor(answer_spans, dtype=torch.long).reshape(-1, 3),
        "note_counts": torch.tensor(note_counts, dtype=torch.long),
        "answer_counts": torch.tensor(answer_counts, dtype=torch.long),
        "pair_targets": torch.tensor(pair_targets, dtype=torch.float32),
        "has_pairs": torch.tensor(has_pairs, dtype=torch.bool),
        "relevance_targets": torch.tensor(rel_targets, dtype=torch.float32),
        "relevance_mask": torch.tensor(rel_mask, dtype=torch.bool),
    }


class ItemDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[TrainItem]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> TrainItem:
        return self.items[i]
