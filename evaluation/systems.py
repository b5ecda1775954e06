"""The retrieval rungs of the baseline ladder: fit on training cases, predict held-out ones.

Each system turns a case into a score matrix ``[n_answer, n_note]`` and links. Any
setting a system chooses (a threshold, ensemble weights) is chosen on the training
cases it is given and recorded with their ids (:class:`Fitted`), so the fold loop can
check it never saw a held-out case.

Component scores (BM25, TF-IDF, MiniLM cosine) are computed per case from that case's
own sentences and a fixed pretrained encoder: they learn nothing across cases, so
they are computed once for all cases and reused by every fold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from baselines.aligners import combine_scores
from baselines.ensemble import (
    DEFAULT_COMPONENTS,
    RELATIVE_GRID,
    fit_ensemble,
    gold_matrix,
    links_matrix,
    score_components,
)
from baselines.linking import link_pairs, links_to_pairs
from data.records import Case
from model.calibration import pooled_micro_f1

# (name, what the ladder calls it); the order is the ladder's order.
RETRIEVAL_SYSTEMS: dict[str, str] = {
    "none": "link nothing",
    "bm25-top1": "BM25, every answer sentence to its top-1 note sentence",
    "bm25": "BM25, relative threshold tuned on training folds",
    "tfidf": "TF-IDF cosine, relative threshold tuned on training folds",
    "minilm": "MiniLM bi-encoder cosine, relative threshold tuned on training folds",
    "ensemble": "weighted ensemble (BM25+TF-IDF+MiniLM), weights and rule tuned on training folds",
}
HEAD_SYSTEM = "head"
HEAD_LABEL = "joint alignment head (task stage trained on training folds; threshold calibrated on them)"
ALL_SYSTEMS = (*RETRIEVAL_SYSTEMS, HEAD_SYSTEM)
SINGLE_COMPONENT = ("bm25", "tfidf", "minilm")

ComponentScores = dict[str, dict[str, np.ndarray]]


@dataclass
class Fitted:
    """What one system chose on one fold's training cases."""

    system: str
    params: dict = field(default_factory=dict)
    chosen_on: list[str] = field(default_factory=list)  # case ids used to choose params ([] = nothing tuned)
    threshold: float | None = None
    mode: str | None = None  # how `threshold` applies: "absolute" | "relative"


@dataclass
class Prediction:
    scores: np.ndarray  # [n_answer, n_note]
    pairs: set[tuple[str, str]]


def needed_components(systems: Sequence[str]) -> list[str]:
    names = []
    for s in systems:
        if s in ("bm25-top1", "bm25"):
            names.append("bm25")
        elif s in ("tfidf", "minilm"):
            names.append(s)
        elif s == "ensemble":
            names += list(DEFAULT_COMPONENTS)
    return [n for n in dict.fromkeys(names)]


def compute_component_scores(cases: Sequence[Case], systems: Sequence[str]) -> ComponentScores:
    names = needed_components(systems)
    return score_components(cases, names) if names else {}


def tune_relative_threshold(cases: Sequence[Case], scores: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """(relative threshold, pooled micro F1 0..1) best on ``cases``; ties keep the lower threshold."""
    golds = [gold_matrix(c) for c in cases]
    best = (-1.0, RELATIVE_GRID[0])
    for t in RELATIVE_GRID:
        preds = [links_matrix(link_pairs(scores[c.case_id], t, "relative"), g.shape) for c, g in zip(cases, golds)]
        f1 = pooled_micro_f1(preds, golds)
        if f1 > best[0] + 1e-12:
            best = (f1, t)
    return best[1], best[0]


def fit_system(system: str, train: Sequence[Case], component_scores: ComponentScores) -> Fitted:
    """Choose the system's settings on the training cases (keyed, with answer sentences)."""
    train_ids = [c.case_id for c in train]
    if system in ("none", "bm25-top1"):
        return Fitted(system)
    if system in SINGLE_COMPONENT:
        threshold, f1 = tune_relative_threshold(train, component_scores[system])
        return Fitted(system, {"train_micro_f1": round(100 * f1, 2)}, train_ids, threshold, "relative")
    if system == "ensemble":
        config = fit_ensemble(
            train,
            DEFAULT_COMPONENTS,
            component_scores={n: component_scores[n] for n in DEFAULT_COMPONENTS},
            tuned_on=f"{len(train)} training cases of this fold",
        )
        params = {
            "weights": config.weights,
            "max_per_answer": config.max_per_answer,
            "top1_fallback": config.top1_fallback,
            "train_micro_f1": config.train_micro_f1,
        }
        return Fitted(system, params, train_ids, config.threshold, config.mode)
    raise ValueError(f"unknown retrieval system {system!r}; choose from {list(RETRIEVAL_SYSTEMS)}")


def predict_system(fitted: Fitted, case: Case, component_scores: ComponentScores) -> Prediction:
    """Scores and links for one (blinded) held-out case."""
    aids, nids = case.answer_ids, case.note_ids
    system = fitted.system
    if system == "none":
        scores = np.zeros((len(aids), len(nids)))
        return Prediction(scores, set())
    if system == "bm25-top1":
        scores = component_scores["bm25"][case.case_id]
        # Every answer sentence gets its best note sentence (ties: the earlier one).
        links = [[int(np.argmax(row))] if row.size else [] for row in scores]
        return Prediction(scores, links_to_pairs(aids, nids, links))
    if system in SINGLE_COMPONENT:
        scores = component_scores[system][case.case_id]
        links = link_pairs(scores, fitted.threshold, "relative")
        return Prediction(scores, links_to_pairs(aids, nids, links))
    if system == "ensemble":
        weights = fitted.params["weights"]
        scores = combine_scores({n: component_scores[n][case.case_id] for n in weights}, weights)
        links = link_pairs(
            scores, fitted.threshold, fitted.mode, fitted.params["max_per_answer"], fitted.params["top1_fallback"]
        )
        return Prediction(scores, links_to_pairs(aids, nids, links))
    raise ValueError(f"unknown retrieval system {system!r}")
