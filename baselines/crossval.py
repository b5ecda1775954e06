"""Case-grouped cross-validation: tune on some cases, predict the held-out ones, pool.

Folds group whole cases (never split a case's sentences across folds), so a tuned
aligner is always judged on cases it never saw. Held-out predictions of all folds
are pooled and scored once, as the official scorer would score one submission.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from data.records import Case

Pairs = set[tuple[str, str]]
# fit_predict(train_cases, test_cases) -> {case_id: predicted (answer_id, evidence_id) pairs}
FitPredict = Callable[[list[Case], list[Case]], dict[str, Pairs]]


def case_folds(case_ids: Sequence[str], n_folds: int = 4, seed: int = 0) -> list[list[str]]:
    """Split case ids into ``n_folds`` groups of near-equal size (shuffled with ``seed``)."""
    ids = list(case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique")
    if not 2 <= n_folds <= len(ids):
        raise ValueError(f"need 2 <= n_folds <= number of cases ({len(ids)}), got {n_folds}")
    random.Random(seed).shuffle(ids)
    return [ids[k::n_folds] for k in range(n_folds)]


def crossval_predict(
    cases: Sequence[Case], fit_predict: FitPredict, n_folds: int = 4, seed: int = 0
) -> dict[str, Pairs]:
    """Pooled held-out predictions: each case predicted by a model tuned on the other folds only."""
    by_id = {c.case_id: c for c in cases}
    predictions: dict[str, Pairs] = {}
    for held_out in case_folds(list(by_id), n_folds, seed):
        held = set(held_out)
        train = [c for c in cases if c.case_id not in held]
        test = [by_id[cid] for cid in held_out]
        fold_pred = fit_predict(train, test)
        leaked = set(fold_pred) - held
        if leaked:
            raise ValueError(f"fit_predict returned predictions for cases outside the held-out fold: {sorted(leaked)}")
        predictions.update({cid: set(fold_pred.get(cid, set())) for cid in held_out})
    return predictions
