"""Subtask 2 rows of the ladder: official scores and bootstrap intervals over cases.

Point scores come from :func:`metrics.relevance.score_relevance` (the official
definition). Intervals resample per-case (true positive, predicted, gold) counts of
the strict and lenient views, with the same rules (empty prediction and empty gold
score 1 per case; all pooled counts zero score 1), so that a resample of every case
once reproduces the point scores exactly (tested).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from baselines import relevance as question_baseline
from data.records import Case
from metrics.relevance import SCORE_KEYS, VIEWS, case_counts, gold_from_cases, score_relevance

from .bootstrap import count_prf, percentile_interval

BASELINE_SYSTEM = "question-retrieval"
BASELINE_LABEL = question_baseline.LABEL + "; threshold tuned (strict micro F1) on training folds"
HEAD_LABEL = "joint head's relevance probability; threshold calibrated (strict micro F1) on training folds"
INTERVAL_KEYS = tuple(k for k in SCORE_KEYS if k != "overall_score")


def relevance_counts(predicted: Mapping[str, Sequence[str]], cases: Sequence[Case]) -> dict[str, np.ndarray]:
    """``view -> [n_cases, 3]`` counts, in ``cases`` order."""
    gold = gold_from_cases(cases)
    per = [case_counts(predicted[c.case_id], gold[c.case_id]) for c in cases]
    return {v: np.array([p[v] for p in per], dtype=np.float64).reshape(len(cases), 3) for v in VIEWS}


def relevance_from_counts(counts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The twelve interval scores (x100) from ``view -> [..., n_cases, 3]`` counts."""
    out = {}
    for view in VIEWS:
        c = counts[view]
        per = count_prf(c[..., 0], c[..., 1], c[..., 2], empty_is_perfect=True)
        micro = count_prf(c[..., 0].sum(-1), c[..., 1].sum(-1), c[..., 2].sum(-1), empty_is_perfect=True)
        for j, name in enumerate(("precision", "recall", "f1")):
            out[f"{view}_macro_{name}"] = 100 * per[j].mean(-1)
            out[f"{view}_micro_{name}"] = 100 * micro[j]
    return out


def relevance_row(
    system: str,
    label: str,
    predicted: Mapping[str, Sequence[str]],
    cases: Sequence[Case],
    indices: np.ndarray,
    level: float,
) -> dict:
    """One ladder row: official scores of the pooled predictions and their bootstrap intervals."""
    scores = score_relevance({c.case_id: set(predicted[c.case_id]) for c in cases}, gold_from_cases(cases))
    counts = relevance_counts(predicted, cases)
    samples = relevance_from_counts({v: c[indices] for v, c in counts.items()})
    ci = {k: [round(x, 4) for x in percentile_interval(samples[k], level)] for k in INTERVAL_KEYS}
    ci["overall_score"] = ci["strict_micro_f1"]
    return {"system": system, "label": label, "scores": {k: round(float(v), 4) for k, v in scores.items()}, "ci": ci}


def baseline_fold(train: Sequence[Case], held_out: Sequence[Case]) -> tuple[dict[str, list[str]], dict]:
    """The question-retrieval baseline, its threshold tuned on ``train``: held-out predictions and the record."""
    threshold, f1 = question_baseline.fit_threshold(train)
    preds = {
        c.case_id: question_baseline.predict_relevant(c, question_baseline.relevance_scores(c), threshold)
        for c in held_out
    }
    record = {
        "threshold": threshold,
        "mode": "absolute",
        "params": {"for": "strict micro F1", "train_micro_f1": round(100 * f1, 2)},
        "chosen_on": sorted(c.case_id for c in train),
    }
    return preds, record


def head_predictions(
    cases: Sequence[Case], probabilities: Mapping[str, np.ndarray], thresholds: Mapping[str, float]
) -> dict[str, list[str]]:
    return {
        c.case_id: [sid for sid, p in zip(c.note_ids, probabilities[c.case_id]) if p >= thresholds[c.case_id]]
        for c in cases
    }
