"""Subtask 2 predictions: which note sentences are evidence for the question.

With an export: the head's relevance probability per note sentence, at or above the
threshold calibrated at export on the training cases (the manifest's ``relevance`` record) or the
user's ``--relevance-threshold``. Without one: the question-retrieval baseline
(:mod:`baselines.relevance`), at its untuned default threshold.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from baselines import relevance as question_baseline
from plumbing.errors import InputError
from data.records import Case
from model.manifest import ExportManifest

Log = Callable[[str], None]


def has_relevance_threshold(manifest: ExportManifest) -> bool:
    return manifest.relevance_threshold is not None


def export_relevance_threshold(manifest: ExportManifest, override: float | None) -> tuple[float, str]:
    """(threshold, where it came from); an export without a relevance threshold needs ``override``."""
    if override is not None:
        return float(override), "--relevance-threshold"
    record = manifest.relevance
    if record is None or record.threshold is None:
        raise InputError("the export has no calibrated relevance threshold (no relevance labels in its training "
                         "data, or head_relevance = false): pass --relevance-threshold or --subtasks 3,4")
    return float(record.threshold), f"manifest ({record.calibrated_on or 'unknown'})"


NO_RELEVANCE_OUTPUT = ("the export's head has no relevance output (head_relevance = false): "
                       "use --subtasks 3,4")


def export_probabilities(export, cases: list[Case], progress: bool = True) -> dict[str, np.ndarray]:
    """``case_id -> [n_note]`` relevance probabilities from the export's head: all cases
    at once where the export can (``score_relevance_all``, the fast engine: read off its
    Subtask 4 forwards, else in token-budget groups), else one forward per case."""
    from data.prompts import encode_example, example_from_case
    from model.head_scoring import relevance_probabilities

    if hasattr(export, "score_relevance_all") and not hasattr(export, "score_relevance"):
        probs = export.score_relevance_all(cases)
        if probs is None:
            raise InputError(NO_RELEVANCE_OUTPUT)
        return {case.case_id: np.asarray(p, dtype=np.float64) for case, p in zip(cases, probs)}
    out: dict[str, np.ndarray] = {}
    for case in tqdm(cases, desc="subtask 2 (head)", unit="case", disable=not progress):
        if hasattr(export, "score_relevance"):  # an export object that scores relevance itself
            out[case.case_id] = np.asarray(export.score_relevance(case), dtype=np.float64)
            continue
        enc = encode_example(export.tokenizer, example_from_case(case, with_answer=False))
        probs = relevance_probabilities(export.model, export.head, [enc])
        if probs is None:
            raise InputError(NO_RELEVANCE_OUTPUT)
        out[case.case_id] = np.asarray(probs[0], dtype=np.float64)
    return out


def threshold_relevance(cases: list[Case], scores: dict[str, np.ndarray], threshold: float) -> dict[str, list[str]]:
    """``case_id -> note ids`` scoring at least ``threshold``, in note order."""
    return {c.case_id: question_baseline.predict_relevant(c, scores[c.case_id], threshold) for c in cases}


def predict_relevance(cases: list[Case], export, override: float | None, progress: bool,
                     log: Log, scores_out: dict[str, np.ndarray] | None = None) -> tuple[dict[str, list[str]], dict]:
    """Subtask 2 predictions for every case and the run record saying how they were made; the scores
    behind them (``case_id -> [n_note]``) go into ``scores_out`` where given (report.html shades by them)."""
    if export is None:
        threshold = question_baseline.DEFAULT_THRESHOLD if override is None else float(override)
        scores = {c.case_id: question_baseline.relevance_scores(c)
                  for c in tqdm(cases, desc="subtask 2 (baseline)", unit="case", disable=not progress)}
        record = {"method": "retrieval baseline: " + question_baseline.LABEL, "threshold": threshold,
                  "threshold_source": "--relevance-threshold" if override is not None else "untuned default"}
        log(f"Subtask 2: RETRIEVAL BASELINE ({question_baseline.LABEL}, threshold {threshold:g}); not the model")
    else:
        threshold, source = export_relevance_threshold(export.manifest, override)
        scores = export_probabilities(export, cases, progress)
        record = {"method": "head relevance probability", "threshold": threshold, "threshold_source": source}
        log(f"Subtask 2: head relevance probabilities, threshold {threshold:.3f} ({source})")
    evidence = threshold_relevance(cases, scores, threshold)
    if scores_out is not None:
        scores_out.update(scores)
    record["n_cases_without_evidence"] = sum(1 for ids in evidence.values() if not ids)
    return evidence, record
