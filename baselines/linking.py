"""Turn a [n_answer, n_note] score matrix into links: one rule for every scorer."""

from __future__ import annotations

from typing import Literal

import numpy as np

Mode = Literal["absolute", "relative"]
MODES = ("absolute", "relative")


def link_pairs(
    scores: np.ndarray,
    threshold: float,
    mode: Mode = "absolute",
    max_per_answer: int | None = None,
    top1_fallback: bool = False,
) -> list[list[int]]:
    """Linked note-sentence column indices for each answer row, in note order.

    ``absolute``: link where score >= threshold. ``relative``: link where score >=
    threshold x the row's best score (rows whose best score is <= 0 link nothing, since
    a fraction of a non-positive best says nothing). ``max_per_answer`` keeps only the
    highest-scoring links of a row (ties go to the earlier note sentence).
    ``top1_fallback`` links a row's best note sentence when nothing passed, unless the
    row is constant (no sentence is preferred, so a pick would be arbitrary).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if max_per_answer is not None and max_per_answer < 1:
        raise ValueError("max_per_answer must be >= 1 or None")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [n_answer, n_note], got shape {scores.shape}")
    scores = np.where(np.isnan(scores), -np.inf, scores)
    links: list[list[int]] = []
    for row in scores:
        if row.size == 0:
            links.append([])
            continue
        best = row.max()
        if mode == "absolute":
            passed = np.flatnonzero(row >= threshold)
        elif best > 0:
            passed = np.flatnonzero(row >= threshold * best)
        else:
            passed = np.array([], dtype=int)
        if passed.size == 0 and top1_fallback and best > row.min():
            passed = np.array([int(np.argmax(row))])
        if max_per_answer is not None and passed.size > max_per_answer:
            # Stable sort on -score keeps the earlier sentence among equal scores.
            order = np.argsort(-row[passed], kind="stable")[:max_per_answer]
            passed = passed[order]
        links.append(sorted(int(i) for i in passed))
    return links


def links_to_pairs(
    case_answer_ids: list[str], case_note_ids: list[str], links: list[list[int]]
) -> set[tuple[str, str]]:
    """(answer_id, note_id) pairs from per-answer column indices."""
    return {(case_answer_ids[i], case_note_ids[j]) for i, cols in enumerate(links) for j in cols}
