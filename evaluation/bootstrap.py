"""Bootstrap confidence intervals over cases.

Cases are resampled with replacement (the unit the data were sampled in: a case's
sentences are not independent). The same seeded resamples are used for every system,
so their intervals are comparable. Intervals are percentile intervals. Subtask 4 uses
per-case counts so that one resample is a few array operations, and the point
estimates equal :func:`metrics.alignment.score_alignment` exactly (tested).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

Pairs = set[tuple[str, str]]
ALIGNMENT_KEYS = ("micro_precision", "micro_recall", "micro_f1", "macro_precision", "macro_recall", "macro_f1")
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


def resample_indices(n_cases: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """[n_resamples, n_cases] case indices drawn with replacement."""
    if n_cases < 1:
        raise ValueError("no cases to resample")
    return np.random.default_rng(seed).integers(0, n_cases, size=(n_resamples, n_cases))


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _safe_div(2 * p * r, p + r)


def count_prf(
    tp: np.ndarray, pred: np.ndarray, gold: np.ndarray, empty_is_perfect: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 (0..1) of (true positive, predicted, gold) count arrays, elementwise; a
    zero denominator scores 0, and nothing predicted with nothing to find scores 1 where
    ``empty_is_perfect`` (the Subtask 2 rule; Subtask 4 scores it 0)."""
    p, r = _safe_div(tp, pred), _safe_div(tp, gold)
    f = _f1(p, r)
    if not empty_is_perfect:
        return p, r, f
    both_empty = (np.asarray(pred) == 0) & (np.asarray(gold) == 0)
    return tuple(np.where(both_empty, 1.0, x) for x in (p, r, f))  # type: ignore[return-value]


def pair_counts(predicted: Mapping[str, Pairs], gold: Mapping[str, Pairs], case_ids: Sequence[str]) -> np.ndarray:
    """[n_cases, 3] (true positives, predicted, gold) pair counts per case."""
    return np.array(
        [[len(set(predicted[c]) & set(gold[c])), len(set(predicted[c])), len(set(gold[c]))] for c in case_ids],
        dtype=np.float64,
    ).reshape(len(case_ids), 3)


def micro_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Micro P/R/F1 (x100) from [..., n_cases, 3] counts, summed over the case axis."""
    p, r, f = count_prf(counts[..., 0].sum(-1), counts[..., 1].sum(-1), counts[..., 2].sum(-1))
    return {"precision": 100 * p, "recall": 100 * r, "f1": 100 * f}


def alignment_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """The six Subtask 4 scores (x100) from [..., n_cases, 3] counts, as the official scorer defines them."""
    micro = micro_from_counts(counts)
    p, r, f = count_prf(counts[..., 0], counts[..., 1], counts[..., 2])
    return {
        "micro_precision": micro["precision"],
        "micro_recall": micro["recall"],
        "micro_f1": micro["f1"],
        "macro_precision": 100 * p.mean(-1),
        "macro_recall": 100 * r.mean(-1),
        "macro_f1": 100 * f.mean(-1),
    }


def percentile_interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(np.asarray(samples, dtype=np.float64), [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_alignment(
    counts: np.ndarray, indices: np.ndarray, level: float = DEFAULT_LEVEL
) -> dict[str, tuple[float, float]]:
    """Percentile interval of each Subtask 4 score over case resamples (``indices`` from :func:`resample_indices`)."""
    samples = alignment_from_counts(counts[indices])
    return {k: percentile_interval(samples[k], level) for k in ALIGNMENT_KEYS}


def bootstrap_difference(
    counts_a: np.ndarray, counts_b: np.ndarray, indices: np.ndarray, key: str = "micro_f1", level: float = DEFAULT_LEVEL
) -> tuple[float, float]:
    """Interval of score(a) - score(b) over the same case resamples (a paired comparison)."""
    a = alignment_from_counts(counts_a[indices])[key]
    b = alignment_from_counts(counts_b[indices])[key]
    return percentile_interval(a - b, level)


def bootstrap_mean(values: Sequence[float], indices: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Interval of a per-case mean (Subtask 3 metrics are means over cases)."""
    arr = np.asarray(values, dtype=np.float64)
    return percentile_interval(arr[indices].mean(-1), level)
