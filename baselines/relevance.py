"""Subtask 2 baseline: note sentences scored against the question, thresholded.

The score is :func:`baselines.extractive.question_scores` (BM25 + TF-IDF of the
patient's question and the clinician's rewrite against every note sentence, each
min-max normalised per case and averaged, so scores lie in [0, 1]). A sentence is predicted relevant
when its score reaches the threshold: :data:`DEFAULT_THRESHOLD` when nothing is tuned,
or the one with the best strict micro F1 on training cases (:func:`fit_threshold`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data.records import ESSENTIAL_LABELS, Case, relevance_targets
from model.calibration import calibrate_threshold

from .extractive import question_scores

DEFAULT_THRESHOLD = 0.5
LABEL = "question vs note sentences (BM25 + TF-IDF, per-case normalised), thresholded"


def relevance_scores(case: Case) -> np.ndarray:
    """One score in [0, 1] per note sentence (note order)."""
    return np.asarray(question_scores(case), dtype=np.float64)


def predict_relevant(case: Case, scores: np.ndarray, threshold: float) -> list[str]:
    """Ids of the note sentences scoring at least ``threshold``, in note order."""
    return [sid for sid, s in zip(case.note_ids, scores) if s >= threshold]


def fit_threshold(cases: Sequence[Case], scores: Sequence[np.ndarray] | None = None) -> tuple[float, float]:
    """(threshold, its pooled strict micro F1) on keyed training ``cases``."""
    scores = [relevance_scores(c) for c in cases] if scores is None else scores
    targets = [np.asarray(relevance_targets(c, ESSENTIAL_LABELS) or [0.0] * len(c.note_ids)) for c in cases]
    return calibrate_threshold(list(scores), targets)
