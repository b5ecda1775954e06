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


SHOWN_IDS = 5


def _first_ids(ids: list[str]) -> str:
    shown = ", ".join(ids[:SHOWN_IDS])
    return f"({shown}, ...)" if len(ids) > SHOWN_IDS else f"({shown})"


def case_set_difference(submitted: list[str], expected: list[str]) -> str | None:
    """How the submitted case ids differ from the key's, in words (None when they are the same set):
    how many of the key's cases are missing, how many submitted ones it lacks, the first few of each."""
    expected_set, submitted_set = set(expected), set(submitted)
    missing = [c for c in expected if c not in submitted_set]
    extra = [c for c in submitted if c not in expected_set]
    if not missing and not extra:
        return None
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} of the key's {len(expected)} cases missing from the submission {_first_ids(missing)}"
        )
    if extra:
        noun = "case" if len(extra) == 1 else "cases"
        parts.append(f"{len(extra)} submitted {noun} not in the key {_first_ids(extra)}")
    return "; ".join(parts)


def same_cases(submitted: list[str], expected: list[str], path: Path, key: str | Path | None = None) -> None:
    """The submission covers exactly the expected cases (the official scorers' rule); otherwise one
    line with the counts and first ids of both differences (a test-set submission against the dev
    key is the usual cause, so the line says so before anything else is checked)."""
    difference = case_set_difference(submitted, expected)
    if difference:
        against = f"the key {key}" if key is not None else "the key"
        raise InputError(f"case ids differ from {against}: {difference}; is this the key for these cases?", path)


def check_same_case_sets(predicted: Iterable[str], gold: Iterable[str]) -> None:
    """``ValueError`` naming the first few extra and missing cases when the two sets differ."""
    predicted, gold = set(predicted), set(gold)
    if predicted != gold:
        extra, missing = sorted(predicted - gold), sorted(gold - predicted)
        raise ValueError(f"case sets differ: extra {extra[:5]}, missing {missing[:5]}")


def read_scored_submission(
    path: Path, subtask: int, expected: list[str], key: str | Path | None = None
) -> list[dict[str, Any]]:
    """A submission's entries, each case once and exactly the ``expected`` (``key``'s) cases."""
    entries = read_submission(path, subtask)
    same_cases(unique_case_ids(entries, path), expected, path, key)
    return entries
