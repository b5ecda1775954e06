"""Score a Subtask 4 submission file against the key, as the organizers' scorer does.

Answer ids come from the key's ``clinician_answer_sentences``, evidence ids from its
``answers``; the submission's case set must equal the key's.
"""

from __future__ import annotations

from pathlib import Path

from data.archehr import load_key
from plumbing.errors import InputError

from .alignment import Pairs, per_case_alignment, score_alignment
from .case_sets import read_scored_submission


def subtask4_pairs(submission: str | Path, key: str | Path) -> tuple[dict[str, Pairs], dict[str, Pairs]]:
    """Predicted and gold ``(answer_id, evidence_id)`` pairs per case, ids checked against the key."""
    sub_path = Path(submission)
    key_cases = load_key(key)
    entries = read_scored_submission(sub_path, 4, list(key_cases), key)
    predicted: dict[str, Pairs] = {}
    for entry in entries:
        kc = key_cases[entry["case_id"]]
        if not kc.answer_sentences:
            raise InputError("key case has no clinician_answer_sentences to align", key, kc.case_id)
        answer_ids = {a.sentence_id for a in kc.answer_sentences}
        pairs = predicted.setdefault(kc.case_id, set())
        for item in entry["prediction"]:
            aid = item["answer_id"]
            if aid not in answer_ids:
                raise InputError(f"unknown answer_id {aid!r}", sub_path, kc.case_id)
            for e in item["evidence_id"]:
                if e not in kc.relevance:
                    raise InputError(f"answer {aid}: unknown evidence id {e!r}", sub_path, kc.case_id)
                pairs.add((aid, e))
    gold = {cid: kc.gold_pairs() for cid, kc in key_cases.items()}
    return predicted, gold


def score_subtask4(submission: str | Path, key: str | Path) -> dict[str, float]:
    """The seven official Subtask 4 scores of a submission against a key."""
    return score_alignment(*subtask4_pairs(submission, key))


def score_subtask4_per_case(submission: str | Path, key: str | Path) -> dict[str, dict[str, float]]:
    """Per-case precision / recall / F1 (x100) and pair counts."""
    return per_case_alignment(*subtask4_pairs(submission, key))
