"""Subtask 4 scores, computed as the official scorer does.

Per case, the unit is the set of (answer_id, evidence_id) pairs (duplicates collapse).
Micro precision/recall/F1 pool the pairs of all cases; macro averages the per-case
precision, recall and F1. A case with no predicted pairs has precision 0, one with no
gold pairs recall 0, and F1 is 0 whenever precision + recall is 0. All values x100;
``overall_score`` is the micro F1.
"""

from __future__ import annotations

from typing import Any

from data.submission import check_entry_types

from .case_sets import check_same_case_sets

SCORE_KEYS = (
    "micro_precision",
    "micro_recall",
    "micro_f1",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "overall_score",
)

Pairs = set[tuple[str, str]]


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def pairs_from_submission(entries: list[dict[str, Any]]) -> dict[str, Pairs]:
    """``case_id -> {(answer_id, evidence_id)}`` from Subtask 4 entries (types checked)."""
    check_entry_types(entries, 4)
    out: dict[str, Pairs] = {}
    for entry in entries:
        pairs = out.setdefault(entry["case_id"], set())
        for item in entry["prediction"]:
            pairs.update((item["answer_id"], e) for e in item["evidence_id"])
    return out


def score_alignment(predicted: dict[str, Pairs], gold: dict[str, Pairs]) -> dict[str, float]:
    """The seven official Subtask 4 scores; the two case sets must be equal."""
    check_same_case_sets(predicted, gold)
    if not gold:
        raise ValueError("no cases to score")
    tp_all = pred_all = gold_all = 0
    precisions, recalls, f1s = [], [], []
    for case_id in gold:
        pred, ref = set(predicted[case_id]), set(gold[case_id])
        tp = len(pred & ref)
        tp_all += tp
        pred_all += len(pred)
        gold_all += len(ref)
        p = tp / len(pred) if pred else 0.0
        r = tp / len(ref) if ref else 0.0
        precisions.append(p)
        recalls.append(r)
        f1s.append(_f1(p, r))
    micro_p = tp_all / pred_all if pred_all else 0.0
    micro_r = tp_all / gold_all if gold_all else 0.0
    n = len(gold)
    scores = {
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "micro_f1": _f1(micro_p, micro_r),
        "macro_precision": sum(precisions) / n,
        "macro_recall": sum(recalls) / n,
        "macro_f1": sum(f1s) / n,
    }
    scores = {k: v * 100 for k, v in scores.items()}
    scores["overall_score"] = scores["micro_f1"]
    return scores


def per_case_alignment(predicted: dict[str, Pairs], gold: dict[str, Pairs]) -> dict[str, dict[str, float]]:
    """Per case: precision, recall, F1 (x100, the macro scores' terms) and the pair counts."""
    out: dict[str, dict[str, float]] = {}
    for case_id in gold:
        pred, ref = set(predicted.get(case_id, ())), set(gold[case_id])
        tp = len(pred & ref)
        p = tp / len(pred) if pred else 0.0
        r = tp / len(ref) if ref else 0.0
        out[case_id] = {
            "precision": 100 * p,
            "recall": 100 * r,
            "f1": 100 * _f1(p, r),
            "tp": tp,
            "n_predicted": len(pred),
            "n_gold": len(ref),
        }
    return out
