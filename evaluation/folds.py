"""Case-grouped folds, the train/held-out guard, and per-fold data files.

A fold is a set of held-out case ids; its training cases are all the others. The
training stage reads its data from files (``training.data.task_cases`` loads an XML
and a key), so each fold's training cases are written as an official-layout XML +
key pair in the fold's folder: transparent (a user can open exactly what the fold
trained on) and checked by reading the files back with the project's loader.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from baselines.crossval import case_folds
from data.archehr import load_cases, write_cases
from plumbing.errors import InputError
from data.records import AnswerSentence, Case
from metrics.training_cases import TrainingCaseLeak


@dataclass(frozen=True)
class Fold:
    index: int
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]

    @property
    def evaluates_on_training_cases(self) -> bool:
        return bool(set(self.train_ids) & set(self.test_ids))


def plan_folds(
    case_ids: Sequence[str],
    n_folds: int,
    seed: int = 0,
    *,
    eval_on_train: bool = False,
    allow_train_cases: bool = False,
) -> list[Fold]:
    """Case-grouped folds; every case is held out exactly once.

    ``n_folds == len(case_ids)`` is leave-one-case-out. ``n_folds == 1`` or
    ``eval_on_train`` trains on every case and scores the same cases, which is refused
    unless ``allow_train_cases``.
    """
    ids = list(case_ids)
    if len(set(ids)) != len(ids):
        raise InputError("case ids must be unique")
    if len(ids) < 1:
        raise InputError("no keyed cases with answer sentences to evaluate")
    if n_folds < 1:
        raise InputError(f"--folds must be >= 1, got {n_folds}")
    if n_folds > len(ids):
        raise InputError(
            f"--folds {n_folds} is more than the {len(ids)} keyed cases (leave-one-case-out is --folds {len(ids)})"
        )
    if n_folds == 1 or eval_on_train:
        if not allow_train_cases:
            why = "--folds 1" if n_folds == 1 else "--eval-on-train"
            raise TrainingCaseLeak(
                f"{why} would score systems on the cases they trained on; refused "
                "(pass --allow-train-cases to get optimistic, labelled numbers)"
            )
        return [Fold(0, tuple(ids), tuple(ids))]
    if len(ids) < 2:
        raise InputError("cross-validation needs at least two keyed cases")
    folds = [
        Fold(k, tuple(c for c in ids if c not in set(held)), tuple(held))
        for k, held in enumerate(case_folds(ids, n_folds, seed))
    ]
    check_folds(folds, ids)
    return folds


def check_folds(folds: Sequence[Fold], case_ids: Sequence[str], allow_train_cases: bool = False) -> None:
    """Every case held out exactly once; held-out cases never among that fold's training cases."""
    held = [c for f in folds for c in f.test_ids]
    if sorted(held) != sorted(case_ids):
        raise AssertionError("folds must hold out every case exactly once")
    for f in folds:
        shared = set(f.train_ids) & set(f.test_ids)
        if shared and not allow_train_cases:
            raise AssertionError(f"fold {f.index}: held-out case(s) {sorted(shared)[:3]} are training cases")


def assert_chosen_on_training_cases(chosen_on: Sequence[str], fold: Fold, what: str) -> None:
    """A threshold (or any tuned setting) must come from this fold's training cases only."""
    outside = sorted(set(chosen_on) - set(fold.train_ids))
    if outside:
        raise AssertionError(
            f"fold {fold.index}: {what} was chosen on case(s) {outside[:3]}, which are not this fold's training cases"
        )


def blind(case: Case) -> Case:
    """The case as a test release shows it: answer sentences without citations, no key.

    Held-out cases are passed to predictors in this form, so that no prediction can
    depend on the held-out gold even by accident.
    """
    return replace(
        case,
        answer_sentences=[AnswerSentence(a.sentence_id, a.text) for a in case.answer_sentences],
        relevance={},
        clinician_answer_without_citations=None,
        has_key=False,
    )


def write_case_files(cases: Sequence[Case], xml_path: Path, key_path: Path) -> None:
    """Write keyed cases as an official-layout XML + key, then check they read back identically."""
    write_cases(cases, xml_path, key_path)
    if load_cases(xml_path, key_path) != list(cases):
        raise AssertionError(f"fold files {xml_path.name}/{key_path.name} do not read back as the cases written")
