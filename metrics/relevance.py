"""Subtask 2 (evidence identification) scores, computed as the organizers' scorer does.

A prediction is a set of note sentence ids per case (duplicates collapse). Two views:

- strict: the prediction against the essential sentences;
- lenient: supplementary sentences are first removed from the prediction (predicting
  them costs nothing), then the rest is scored against the essential sentences.

Per case: empty prediction and empty gold score P = R = F1 = 1; otherwise an empty
prediction or an empty gold scores 0. Macro averages the per-case P, R and F1. Micro
pools true positives, predicted and gold counts over cases (all pooled counts zero: 1).
All values x100; ``overall_score`` is the strict micro F1. Every predicted id must be a
sentence the key labels for that case, and the case sets must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from data.records import Case

from .alignment import _f1
from .case_sets import check_same_case_sets

SCORE_KEYS = (
    "strict_macro_precision",
    "strict_macro_recall",
    "strict_macro_f1",
    "strict_micro_precision",
    "strict_micro_recall",
    "strict_micro_f1",
    "lenient_macro_precision",
    "lenient_macro_recall",
    "lenient_macro_f1",
    "lenient_micro_precision",
    "lenient_micro_recall",
    "lenient_micro_f1",
    "overall_score",
)
VIEWS = ("strict", "lenient")


@dataclass(frozen=True)
class RelevanceGold:
    """One case's relevance labels: the essential ids, the supplementary ids and every labelled id."""

    essential: frozenset[str]
    supplementary: frozenset[str]
    sentence_ids: frozenset[str]

    @classmethod
    def from_relevance(cls, relevance: Mapping[str, str]) -> "RelevanceGold":
        return cls(
            frozenset(s for s, lab in relevance.items() if lab == "essential"),
            frozenset(s for s, lab in relevance.items() if lab == "supplementary"),
            frozenset(relevance),
        )


def gold_from_relevance(relevance: Mapping[str, Mapping[str, str]]) -> dict[str, RelevanceGold]:
    """``case_id -> RelevanceGold`` from ``case_id -> {sentence_id: label}`` (a key's or cases' ``relevance``)."""
    return {cid: RelevanceGold.from_relevance(rel) for cid, rel in relevance.items()}


def gold_from_cases(cases: Iterable[Case]) -> dict[str, RelevanceGold]:
    return gold_from_relevance({c.case_id: c.relevance for c in cases})


def case_counts(predicted: Iterable[str], gold: RelevanceGold) -> dict[str, tuple[int, int, int]]:
    """``view -> (true positives, predicted, gold)`` of one case."""
    pred = set(predicted)
    lenient = pred - gold.supplementary
    return {
        "strict": (len(pred & gold.essential), len(pred), len(gold.essential)),
        "lenient": (len(lenient & gold.essential), len(lenient), len(gold.essential)),
    }


def prf(tp: int | float, n_pred: int | float, n_gold: int | float) -> tuple[float, float, float]:
    """P, R, F1 of one count triple; nothing predicted and nothing to find is a perfect 1."""
    if n_pred == 0 and n_gold == 0:
        return 1.0, 1.0, 1.0
    if n_pred == 0 or n_gold == 0:
        return 0.0, 0.0, 0.0
    p, r = tp / n_pred, tp / n_gold
    return p, r, _f1(p, r)


def check_relevance_ids(predicted: Mapping[str, Iterable[str]], gold: Mapping[str, RelevanceGold]) -> None:
    """Raise ``ValueError`` naming the first case set difference or unknown sentence id."""
    check_same_case_sets(predicted, gold)
    for cid, ids in predicted.items():
        unknown = sorted(set(ids) - gold[cid].sentence_ids)
        if unknown:
            raise ValueError(f"case {cid}: unknown sentence id {unknown[0]!r}")


def score_relevance(predicted: Mapping[str, Iterable[str]], gold: Mapping[str, RelevanceGold]) -> dict[str, float]:
    """The thirteen official Subtask 2 scores (x100)."""
    check_relevance_ids(predicted, gold)
    if not gold:
        raise ValueError("no cases to score")
    scores: dict[str, float] = {}
    per_case = [case_counts(predicted[cid], g) for cid, g in gold.items()]
    for view in VIEWS:
        counts = [c[view] for c in per_case]
        per = [prf(*c) for c in counts]
        micro = prf(*(sum(c[i] for c in counts) for i in range(3)))
        for j, name in enumerate(("precision", "recall", "f1")):
            scores[f"{view}_macro_{name}"] = 100 * sum(p[j] for p in per) / len(per)
            scores[f"{view}_micro_{name}"] = 100 * micro[j]
    scores["overall_score"] = scores["strict_micro_f1"]
    return {k: scores[k] for k in SCORE_KEYS}
