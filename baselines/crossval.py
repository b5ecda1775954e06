"""Case-grouped folds for cross-validation: tune on some cases, predict the held-out ones.

Folds group whole cases (never split a case's sentences across folds), so a tuned
aligner is always judged on cases it never saw (:mod:`baselines.fit` scores each case with a
cross-encoder trained on the other folds; :mod:`evaluation.folds` runs ``score.py cv``).
"""

from __future__ import annotations

import random
from typing import Sequence


def case_folds(case_ids: Sequence[str], n_folds: int = 4, seed: int = 0) -> list[list[str]]:
    """Split case ids into ``n_folds`` groups of near-equal size (shuffled with ``seed``)."""
    ids = list(case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique")
    if not 2 <= n_folds <= len(ids):
        raise ValueError(f"need 2 <= n_folds <= number of cases ({len(ids)}), got {n_folds}")
    random.Random(seed).shuffle(ids)
    return [ids[k::n_folds] for k in range(n_folds)]
