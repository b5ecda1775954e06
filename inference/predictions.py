"""What the model says about a set of cases, asked for once: Subtask 3 answers, Subtask 4
pair probabilities and Subtask 2 relevance probabilities.

The pipeline asks :func:`model_outputs` for everything its subtasks need before any of
them is written. The fast engine (:class:`inference.fast.FastEngine`) then runs one forward
per case where it can (the generation prefill carries the answer sentences for the head;
the rest in packed forwards); any other loaded export (the plain path) answers with its
``generate_answers`` / ``score_all`` and :func:`case_relevance`, one forward per case.
"""

from __future__ import annotations

from plumbing.ranges import DEFAULT_NEW_TOKENS
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from plumbing.errors import InputError
from data.records import Case

NO_RELEVANCE_OUTPUT = "the export's head has no relevance output (head_relevance = false): use --subtasks 3,4"


@dataclass
class ModelOutputs:
    """``case_id ->`` raw generated answer, [n_answer, n_note] pair probabilities,
    [n_note] relevance probabilities; each only for what was asked."""

    answers: dict[str, str] = field(default_factory=dict)
    pairs: dict[str, np.ndarray] = field(default_factory=dict)
    relevance: dict[str, np.ndarray] = field(default_factory=dict)


def has_relevance_output(loaded) -> bool:
    return getattr(getattr(loaded, "head", None), "relevance_mlp", None) is not None or hasattr(
        loaded, "score_relevance"
    )


def model_outputs(
    loaded,
    cases: list[Case],
    *,
    answers: bool = False,
    pairs: bool = False,
    relevance: bool = False,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    batch_size: int | None = None,
    progress: bool = True,
) -> ModelOutputs:
    """Everything asked for, for every case (pairs only for cases with answer sentences).
    A head without a relevance output fails here, before any work, when relevance is asked."""
    if relevance and not has_relevance_output(loaded):
        raise InputError(NO_RELEVANCE_OUTPUT)
    if hasattr(loaded, "predict"):
        return loaded.predict(
            cases,
            answers=answers,
            pairs=pairs,
            relevance=relevance,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
    out = ModelOutputs()
    if answers:
        out.answers = _plain_answers(loaded, cases, batch_size or len(cases), max_new_tokens, progress)
    if pairs:
        scored = [c for c in cases if c.answer_sentences]
        if hasattr(loaded, "score_all"):
            out.pairs = dict(zip([c.case_id for c in scored], loaded.score_all(scored)))
        else:
            out.pairs = {c.case_id: loaded.score_pairs(c) for c in scored}
        out.pairs = {k: np.asarray(v, dtype=np.float64) for k, v in out.pairs.items()}
    if relevance:
        out.relevance = {
            c.case_id: case_relevance(loaded, c)
            for c in tqdm(cases, desc="subtask 2 (head)", unit="case", disable=not progress)
        }
    return out


def case_relevance(loaded, case: Case) -> np.ndarray:
    """[n_note] relevance probabilities of one case on the plain path: the head over one
    forward of question + note (no answer). The fast engine computes the same in its passes."""
    if hasattr(loaded, "score_relevance"):  # an object that scores relevance itself (tests' fakes)
        return np.asarray(loaded.score_relevance(case), dtype=np.float64)
    from data.prompts import encode_example, example_from_case
    from model.head_scoring import relevance_probabilities

    enc = encode_example(loaded.tokenizer, example_from_case(case, with_answer=False))
    probs = relevance_probabilities(loaded.model, loaded.head, [enc])
    if probs is None:
        raise InputError(NO_RELEVANCE_OUTPUT)
    return np.asarray(probs[0], dtype=np.float64)


def _plain_answers(loaded, cases: list[Case], batch_size: int, max_new_tokens: int, progress: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    bar = tqdm(total=len(cases), desc="subtask 3 (generate)", unit="case", disable=not progress)
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        raw = loaded.generate_answers(batch, max_new_tokens=max_new_tokens, batch_size=batch_size)
        if len(raw) != len(batch):
            raise RuntimeError(f"generate_answers returned {len(raw)} answers for {len(batch)} cases")
        out.update(zip([c.case_id for c in batch], raw))
        bar.update(len(batch))
    bar.close()
    return out
