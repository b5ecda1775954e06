"""Score a Subtask 2 submission file against the key, as the organizers' scorer does.

Sentence ids come from the key's ``answers`` (relevance of every note sentence); the
submission's case set must equal the key's.
"""

from __future__ import annotations

from pathlib import Path

from data.archehr import load_key
from plumbing.errors import InputError

from .case_sets import read_scored_submission
from .relevance import gold_from_relevance, score_relevance


def score_subtask2(submission: str | Path, key: str | Path) -> dict[str, float]:
    """The thirteen official Subtask 2 scores of a submission against a key."""
    sub_path = Path(submission)
    key_cases = load_key(key)
    entries = read_scored_submission(sub_path, 2, list(key_cases), key)
    for kc in key_cases.values():
        if not kc.relevance:
            raise InputError("key case has no relevance labels ('answers') to score against", key, kc.case_id)
    predicted = {}
    for entry in entries:
        kc = key_cases[entry["case_id"]]
        unknown = [s for s in entry["prediction"] if s not in kc.relevance]
        if unknown:
            raise InputError(f"unknown sentence id {unknown[0]!r}", sub_path, kc.case_id)
        predicted[kc.case_id] = set(entry["prediction"])
    return score_relevance(predicted, gold_from_relevance({cid: kc.relevance for cid, kc in key_cases.items()}))
