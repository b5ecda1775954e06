"""The case-set rules shared by the local scorers: each case once, the key's cases exactly."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from plumbing.errors import InputError
from data.submission import read_submission


def unique_case_ids(entries: list[dict[str, Any]], path: Path) -> list[str]:
    """Case ids in submission order; a case listed twice is an input error."""
    seen: list[str] = []
    for entry in entries:
        if entry["case_id"] in seen:
            raise InputError("case listed twice", path, entry["case_id"])
        seen.append(entry["case_id"])
    return seen


def same_cases(submitted: list[str], expected: list[str], path: Path) -> None:
    """The submission covers exactly the expected cases (the official scorers' rule)."""
    extra = [c for c in submitted if c not in set(expected)]
    if extra:
        raise InputError("case is not in the key", path, extra[0])
    missing = [c for c in expected if c not in set(submitted)]
    if missing:
        raise InputError(f"case of the key missing from the submission ({len(missing)} missing)", path, missing[0])


def check_same_case_sets(predicted: Iterable[str], gold: Iterable[str]) -> None:
    """``ValueError`` naming the first few extra and missing cases when the two sets differ."""
    predicted, gold = set(predicted), set(gold)
    if predicted != gold:
        extra, missing = sorted(predicted - gold), sorted(gold - predicted)
        raise ValueError(f"case sets differ: extra {extra[:5]}, missing {missing[:5]}")


def read_scored_submission(path: Path, subtask: int, expected: list[str]) -> list[dict[str, Any]]:
    """A submission's entries, each case once and exactly the ``expected`` (key's) cases."""
    entries = read_submission(path, subtask)
    same_cases(unique_case_ids(entries, path), expected, path)
    return entries
