"""What the report shows of one case: a plain record built from the case and a system's predictions.

Everything the page needs is decided here (which note sentences are predicted or gold
relevant, which links are correct, missed or wrong, the per-case scores), so that the
HTML writer only lays it out. Per-case scores are the official per-case terms
(:mod:`metrics.alignment`, :mod:`metrics.relevance`, :mod:`metrics.rouge`, :mod:`metrics.bleu`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from data.records import Case
from metrics.alignment import per_case_alignment
from metrics.bleu import case_bleu
from metrics.relevance import RelevanceGold, case_counts, prf
from metrics.rouge import case_rouge
from metrics.subtask3 import official_truncation, reference_answer


@dataclass
class CasePrediction:
    """One system's predictions for one case; any part may be missing (subtask not run)."""

    answer: str | None = None  # Subtask 3: the generated (or extractive) answer
    relevant_ids: Sequence[str] | None = None  # Subtask 2: note ids predicted relevant
    relevance_scores: Sequence[float] | None = None  # Subtask 2: a score per note sentence (shading), note order
    links: Mapping[str, Sequence[str]] | None = None  # Subtask 4: answer id -> cited note ids


@dataclass
class NoteView:
    anchor: str  # the HTML id (safe: built from positions, never from the data's ids)
    sentence_id: str
    text: str
    paragraph_id: str | None
    predicted: bool | None  # Subtask 2 prediction (None: not predicted)
    score: float | None  # the relevance score behind it (None: not available)
    gold: str | None  # "essential" | "supplementary" | "not-relevant" (None: no key)

    @property
    def outcome(self) -> str | None:
        """Subtask 2 against the strict gold (essential): "tp" | "fp" | "fn" | "tn"; None without both."""
        if self.predicted is None or self.gold is None:
            return None
        essential = self.gold == "essential"
        return {(True, True): "tp", (True, False): "fp", (False, True): "fn", (False, False): "tn"}[
            (self.predicted, essential)
        ]


@dataclass
class Citation:
    anchor: str  # the note sentence's HTML id
    sentence_id: str
    # "predicted" (no key) | "correct" | "wrong" (predicted, not gold) | "missed" (gold, not predicted)
    # | "gold" (the key's, when Subtask 4 was not predicted)
    outcome: str


@dataclass
class AnswerView:
    anchor: str
    sentence_id: str
    text: str
    citations: list[Citation]


@dataclass
class CaseView:
    anchor: str
    case_id: str
    specialty: str | None
    patient_question: str
    clinician_question: str
    narrative: str
    notes: list[NoteView]
    answer: str | None
    reference_answer: str | None  # the clinician's (with a key)
    answer_sentences: list[AnswerView]
    has_key: bool
    links_predicted: bool
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # subtask label -> name -> value


def _notes(case: Case, anchor: str, pred: CasePrediction) -> list[NoteView]:
    relevant = None if pred.relevant_ids is None else set(pred.relevant_ids)
    scores = list(pred.relevance_scores) if pred.relevance_scores is not None else None
    if scores is not None and len(scores) != len(case.note_sentences):
        raise ValueError(
            f"case {case.case_id}: {len(scores)} relevance scores for {len(case.note_sentences)} note sentences"
        )
    return [
        NoteView(
            f"{anchor}-n{j}",
            s.sentence_id,
            s.text,
            s.paragraph_id,
            None if relevant is None else s.sentence_id in relevant,
            None if scores is None else float(scores[j]),
            case.relevance.get(s.sentence_id) if case.relevance else None,
        )
        for j, s in enumerate(case.note_sentences)
    ]


def _answer_sentences(
    case: Case, anchor: str, links: Mapping[str, Sequence[str]] | None, note_anchor: dict[str, str]
) -> list[AnswerView]:
    keyed = case.has_citations()
    order = {nid: j for j, nid in enumerate(case.note_ids)}
    out = []
    for i, a in enumerate(case.answer_sentences):
        predicted = set((links or {}).get(a.sentence_id, ()))
        gold = set(a.citations) if keyed else set()
        if links is None:
            outcome = {n: "gold" for n in gold}
        elif keyed:
            outcome = {n: ("correct" if n in gold else "wrong") for n in predicted}
            outcome.update({n: "missed" for n in gold - predicted})
        else:
            outcome = {n: "predicted" for n in predicted}
        cites = [
            Citation(note_anchor[n], n, outcome[n])
            for n in sorted(outcome, key=lambda n: order.get(n, 1 << 30))
            if n in note_anchor
        ]
        out.append(AnswerView(f"{anchor}-a{i}", a.sentence_id, a.text, cites))
    return out


def _scores(case: Case, pred: CasePrediction) -> dict[str, dict[str, float]]:
    """The official per-case terms of each subtask that was predicted and has gold."""
    out: dict[str, dict[str, float]] = {}
    if pred.relevant_ids is not None and case.relevance:
        gold = RelevanceGold.from_relevance(case.relevance)
        for view, counts in case_counts(pred.relevant_ids, gold).items():
            p, r, f = prf(*counts)
            out[f"Subtask 2 ({view})"] = {"P": 100 * p, "R": 100 * r, "F1": 100 * f}
    if pred.answer is not None and case.has_key:
        reference = reference_answer(case)
        if reference.strip():
            answer = official_truncation(pred.answer)
            out["Subtask 3"] = {
                "BLEU": case_bleu(answer, reference),
                "ROUGE-L": case_rouge(answer, reference)["rougeL"],
            }
    if pred.links is not None and case.has_citations():
        pairs = {(a, n) for a, ns in pred.links.items() for n in ns}
        s = per_case_alignment({case.case_id: pairs}, {case.case_id: case.gold_pairs()})[case.case_id]
        out["Subtask 4"] = {
            "P": s["precision"],
            "R": s["recall"],
            "F1": s["f1"],
            "correct": s["tp"],
            "predicted": s["n_predicted"],
            "gold": s["n_gold"],
        }
    return out


def case_view(case: Case, pred: CasePrediction, index: int) -> CaseView:
    """The report's record of ``case`` (the ``index``-th on the page) under ``pred``."""
    anchor = f"c{index}"
    notes = _notes(case, anchor, pred)
    note_anchor = {n.sentence_id: n.anchor for n in notes}
    reference = reference_answer(case) if case.has_key else None
    return CaseView(
        anchor,
        case.case_id,
        case.clinical_specialty,
        " ".join(p.text for p in case.patient_question),
        case.clinician_question,
        case.patient_narrative,
        notes,
        pred.answer,
        reference or None,
        _answer_sentences(case, anchor, pred.links, note_anchor),
        case.has_key,
        pred.links is not None,
        _scores(case, pred),
    )


def case_views(cases: Sequence[Case], predictions: Mapping[str, CasePrediction]) -> list[CaseView]:
    """One view per case, in order; a case without predictions is shown with its text (and gold) only."""
    return [case_view(c, predictions.get(c.case_id, CasePrediction()), i) for i, c in enumerate(cases)]
