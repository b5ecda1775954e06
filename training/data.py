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
from data.records import ESSENTIAL_LABELS, RELEVANT_LABELS, Case, relevance_targets  # noqa: F401  (one source)


@dataclass
class TrainItem:
    encoded: EncodedExample
    # One 0/1 target per note sentence (span order), or None when unlabelled.
    relevance: list[float] | None = None
    # 1 for the essential note sentences (what the Subtask 2 threshold is calibrated on).
    essential: list[float] | None = None

    def __len__(self) -> int:
        return len(self.encoded)


def encode_items(
    tokenizer, examples: Sequence[PromptExample], max_length: int, relevance: Sequence[list[float] | None] | None = None,
    essential: Sequence[list[float] | None] | None = None,
) -> tuple[list[TrainItem], int]:
    """Tokenise examples; those longer than ``max_length`` are dropped (returns the count dropped)."""
    items, dropped = [], 0
    for i, ex in enumerate(examples):
        enc = encode_example(tokenizer, ex)
        if len(enc) > max_length:
            dropped += 1
            continue
        items.append(TrainItem(enc, relevance[i] if relevance is not None else None,
                               essential[i] if essential is not None else None))
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


FILE_SEPARATOR = "\n"  # several task files in one config string (repeated --xml/--key, [[task.data]])


def split_files(value: str) -> list[str]:
    return [v for v in value.split(FILE_SEPARATOR) if v.strip()] if value else []


@dataclass
class TaskFile:
    """One annotated XML/key pair of the task stage and what it contributes."""

    name: str
    xml: str
    key: str
    cases: list[Case]

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def summary(self) -> str:
        n = len(self.cases)
        cited = sum(1 for c in self.cases if c.gold_pairs())
        labelled = sum(1 for c in self.cases if c.relevance)
        if not cited and not labelled:
            return f"{self.name}: {n} cases, answers only"
        return f"{self.name}: {n} cases, {cited} with citations, {labelled} with relevance"


def task_file_pairs(cfg) -> list[tuple[str, str]]:
    """The (xml, key) pairs of the task stage, in order."""
    xmls, keys = split_files(cfg.xml), split_files(cfg.key)
    if not xmls or not keys:
        raise InputError("--xml and --key are required for the task stage")
    if len(xmls) != len(keys):
        raise InputError(f"{len(xmls)} --xml file(s) but {len(keys)} --key file(s): give them in pairs, in order")
    return list(zip(xmls, keys))


def _file_names(pairs: Sequence[tuple[str, str]]) -> list[str]:
    stems = [Path(x).stem for x, _ in pairs]
    if len(set(stems)) == len(stems):
        return stems
    return [str(Path(Path(x).parent.name) / Path(x).stem) if stems.count(Path(x).stem) > 1 else Path(x).stem
            for x, _ in pairs]


def _with_reference_sentences(case: Case) -> Case:
    """A key with only ``clinician_answer_without_citations``: its sentences become the answer (no citations)."""
    from dataclasses import replace

    from data.records import AnswerSentence
    from data.sentences import split_sentences

    if case.answer_sentences or not (case.clinician_answer_without_citations or "").strip():
        return case
    sentences = [AnswerSentence(str(i), t) for i, t in
                 enumerate(split_sentences(case.clinician_answer_without_citations), start=1)]
    return replace(case, answer_sentences=sentences)


def load_task_files(cfg) -> list[TaskFile]:
    """Every XML/key pair's keyed cases; a case id in two files is an error naming both."""
    from data.archehr import load_cases

    pairs = task_file_pairs(cfg)
    files: list[TaskFile] = []
    seen: dict[str, str] = {}
    for name, (xml, key) in zip(_file_names(pairs), pairs):
        cases = [_with_reference_sentences(c) for c in load_cases(xml, key)]
        for c in cases:
            if c.case_id in seen:
                raise InputError(f"case id also in {seen[c.case_id]} (case ids must be unique across task files)",
                                 key, c.case_id)
            seen[c.case_id] = key
        files.append(TaskFile(name, xml, key, [c for c in cases if c.answer_sentences]))
    return files


def task_sources(cfg) -> list[str]:
    return [f for pair in task_file_pairs(cfg) for f in pair]


def task_cases(cfg, log=None) -> list[Case]:
    """The task stage's training cases from every XML/key pair, after saying what each file contributes."""
    import sys

    files = load_task_files(cfg)
    line = "task data: " + "; ".join(f.summary() for f in files)
    (log or (lambda m: print(m, file=sys.stderr)))(line)
    usable = [c for f in files for c in f.cases]
    if not usable:
        raise InputError("no case has answer sentences to train on", split_files(cfg.key)[0])
    return usable


def task_file_records(cfg) -> list[dict]:
    """For the manifest: every task file's path, sha256 and the case ids it contributed."""
    out = []
    for f in load_task_files(cfg):
        for path in (f.xml, f.key):
            out.append({"path": str(path), "sha256": file_sha256(path), "name": f.name, "case_ids": f.case_ids})
    return out


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
