"""Thresholds on scores: the pooled micro F1 over (row, column) pairs and the threshold that
maximises it on training cases. The one source of this rule: the export calibrates the head's
pair and relevance thresholds with it, the retrieval baselines tune theirs, cross-validation
calibrates each fold's. (The official metrics in ``metrics/`` keep the organizers' edge cases.)
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .export_folder import DEFAULT_THRESHOLD

GRID = tuple(round(x, 2) for x in np.arange(0.05, 0.951, 0.05))


def pooled_micro_f1(predicted: Iterable[np.ndarray], gold: Iterable[np.ndarray]) -> float:
    """Micro F1 (0..1) of boolean masks pooled across examples; 0 when nothing is right."""
    tp = n_pred = n_gold = 0
    for p, g in zip(predicted, gold):
        tp += int(np.sum(p & g))
        n_pred += int(p.sum())
        n_gold += int(g.sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / n_pred, tp / n_gold
    return 2 * precision * recall / (precision + recall)


def pair_f1(probabilities: Sequence[np.ndarray], targets: Sequence[np.ndarray], threshold: float) -> float:
    """Micro F1 over all (answer, note) pairs of all examples, predicting p >= threshold."""
    return pooled_micro_f1((np.asarray(p) >= threshold for p in probabilities), (np.asarray(t) > 0.5 for t in targets))


def calibrate_threshold(
    probabilities: Sequence[np.ndarray], targets: Sequence[np.ndarray], grid: Sequence[float] = GRID
) -> tuple[float, float]:
    """(best threshold, its F1); ties go to the threshold nearest 0.5; no gold pairs -> 0.5."""
    if not any(int((t > 0.5).sum()) for t in targets):
        return DEFAULT_THRESHOLD, 0.0
    scored = [(pair_f1(probabilities, targets, th), -abs(th - 0.5), th) for th in grid]
    f1, _, th = max(scored)
    return float(th), float(f1)
