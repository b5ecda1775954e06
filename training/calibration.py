"""Alignment threshold: the probability that maximises micro pair F1 on the training cases."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from model.export_folder import DEFAULT_THRESHOLD
GRID = tuple(round(x, 2) for x in np.arange(0.05, 0.951, 0.05))


def pair_f1(probabilities: Sequence[np.ndarray], targets: Sequence[np.ndarray], threshold: float) -> float:
    """Micro F1 over all (answer, note) pairs of all examples, predicting p >= threshold."""
    tp = pred = gold = 0
    for p, t in zip(probabilities, targets):
        hit = p >= threshold
        gold_mask = t > 0.5
        tp += int((hit & gold_mask).sum())
        pred += int(hit.sum())
        gold += int(gold_mask.sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / pred, tp / gold
    return 2 * precision * recall / (precision + recall)


def calibrate_threshold(
    probabilities: Sequence[np.ndarray], targets: Sequence[np.ndarray], grid: Sequence[float] = GRID
) -> tuple[float, float]:
    """(best threshold, its F1); ties go to the threshold nearest 0.5; no gold pairs -> 0.5."""
    if not any(int((t > 0.5).sum()) for t in targets):
        return DEFAULT_THRESHOLD, 0.0
    scored = [(pair_f1(probabilities, targets, th), -abs(th - 0.5), th) for th in grid]
    f1, _, th = max(scored)
    return float(th), float(f1)
