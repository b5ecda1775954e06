"""Training examples for both stages: read, turned into prompts, tokenised once.

Everything is tokenised once up front (:class:`TrainItem`); :mod:`training.batching`
orders the items into batches and collates them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from plumbing.errors import InputError
from data.prompts import EncodedExample, PromptExample, encode_examples, example_from_case
from data.records import Case, relevance_targets

from .config import FILE_SEPARATOR


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
    tokenizer,
    examples: Sequence[PromptExample],
    max_length: int,
    relevance: Sequence[list[float] | None] | None = None,
    essential: Sequence[list[float] | None] | None = None,
) -> tuple[list[TrainItem], int]:
    """Tokenise examples; those longer than ``max_length`` are dropped (returns the count dropped)."""
    items, dropped = [], 0
    # 1,024 examples a tokenizer call: one batch encodes on several threads, and the offsets
    # held at once stay small on a corpus of many thousand records.
    chunk = 1024
    encoded = [
        enc for a in range(0, len(examples), chunk) for enc in encode_examples(tokenizer, examples[a : a + chunk])
    ]
    for i, enc in enumerate(encoded):
        if len(enc) > max_length:
            dropped += 1
            continue
        items.append(
            TrainItem(
                enc, relevance[i] if relevance is not None else None, essential[i] if essential is not None else None
            )
        )
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


def split_files(value: str) -> list[str]:
    """The task files held in one config string (repeated --xml/--key, [[task.data]]): NUL-separated
    (runs saved with newlines between them are converted by ``training.config.load_run_config``)."""
    return [v for v in value.split(FILE_SEPARATOR) if v] if value else []


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
    return [
        str(Path(Path(x).parent.name) / Path(x).stem) if stems.count(Path(x).stem) > 1 else Path(x).stem
        for x, _ in pairs
    ]


def _with_reference_sentences(case: Case) -> Case:
    """A key with only ``clinician_answer_without_citations``: its sentences become the answer (no citations)."""
    from dataclasses import replace

    from data.records import AnswerSentence
    from data.sentences import split_sentences

    if case.answer_sentences or not (case.clinician_answer_without_citations or "").strip():
        return case
    sentences = [
        AnswerSentence(str(i), t)
        for i, t in enumerate(split_sentences(case.clinician_answer_without_citations), start=1)
    ]
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
                raise InputError(
                    f"case id also in {seen[c.case_id]} (case ids must be unique across task files)", key, c.case_id
                )
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
