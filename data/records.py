"""Typed records for ArchEHR-QA cases. Ids are always strings, never assumed contiguous."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

RELEVANCE_LABELS = ("essential", "supplementary", "not-relevant")
RELEVANT_LABELS = ("essential", "supplementary")
ESSENTIAL_LABELS = ("essential",)  # Subtask 2's strict gold: what its threshold is calibrated on


@dataclass(frozen=True)
class QuestionPhrase:
    phrase_id: str
    text: str
    start_char_index: int | None = None


@dataclass(frozen=True)
class NoteSentence:
    sentence_id: str
    text: str
    paragraph_id: str | None = None
    start_char_index: int | None = None


@dataclass(frozen=True)
class AnswerSentence:
    sentence_id: str
    text: str
    # Gold evidence ids from the key; empty when unsupported or when no key was given.
    citations: tuple[str, ...] = ()


@dataclass
class Case:
    case_id: str
    patient_narrative: str
    clinician_question: str
    note_sentences: list[NoteSentence]
    patient_question: list[QuestionPhrase] = field(default_factory=list)
    clinical_specialty: str | None = None
    note_excerpt: str = ""
    answer_sentences: list[AnswerSentence] = field(default_factory=list)
    # sentence_id -> "essential" | "supplementary" | "not-relevant"; empty without a key.
    relevance: dict[str, str] = field(default_factory=dict)
    clinician_answer_without_citations: str | None = None
    has_key: bool = False

    @property
    def note_ids(self) -> list[str]:
        return [s.sentence_id for s in self.note_sentences]

    @property
    def answer_ids(self) -> list[str]:
        return [s.sentence_id for s in self.answer_sentences]

    @property
    def question_text(self) -> str:
        """The patient's question phrases joined, falling back to the whole narrative."""
        text = " ".join(p.text for p in self.patient_question).strip()
        return text or self.patient_narrative

    def gold_pairs(self) -> set[tuple[str, str]]:
        """Gold (answer_id, evidence_id) pairs, the unit the Subtask 4 scorer counts."""
        return {(a.sentence_id, e) for a in self.answer_sentences for e in a.citations}

    def has_citations(self) -> bool:
        return any(a.citations for a in self.answer_sentences)


def relevance_targets(case: Case, labels: Sequence[str] = RELEVANT_LABELS) -> list[float] | None:
    """1 per note sentence labelled with one of ``labels``, else 0 (None when the case has no labels)."""
    if not case.relevance:
        return None
    return [1.0 if case.relevance.get(sid) in labels else 0.0 for sid in case.note_ids]
