"""Subtask 2 predictions: which note sentences are evidence for the question.

With an export: the head's relevance probability per note sentence
(:func:`inference.predictions.model_outputs`, the one place it is computed), at or above the
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

from .predictions import model_outputs

Log = Callable[[str], None]


def has_relevance_threshold(manifest: ExportManifest) -> bool:
    return manifest.relevance_threshold is not None


def export_relevance_threshold(manifest: ExportManifest, override: float | None) -> tuple[float, str]:
    """(threshold, where it came from); an export without a relevance threshold needs ``override``."""
    if override is not None:
        return float(override), "--relevance-threshold"
    record = manifest.relevance
    if record is None or record.threshold is None:
        raise InputError(
            "the export has no calibrated relevance threshold (no relevance labels in its training "
            "data, or head_relevance = false): pass --relevance-threshold or --subtasks 3,4"
        )
    return float(record.threshold), f"manifest ({record.calibrated_on or 'unknown'})"


def threshold_relevance(cases: list[Case], scores: dict[str, np.ndarray], threshold: float) -> dict[str, list[str]]:
    """``case_id -> note ids`` scoring at least ``threshold``, in note order."""
    return {c.case_id: question_baseline.predict_relevant(c, scores[c.case_id], threshold) for c in cases}


def predict_relevance(
    cases: list[Case],
    export,
    override: float | None,
    progress: bool,
    log: Log,
    scores: dict[str, np.ndarray] | None = None,
    scores_out: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, list[str]], dict]:
    """Subtask 2 predictions for every case and the run record saying how they were made. With an
    export, ``scores`` are its relevance probabilities where the caller already has them (the
    pipeline's one model pass); else they are asked for here. The scores behind the predictions
    (``case_id -> [n_note]``) go into ``scores_out`` where given (report.html shades by them)."""
    if export is None:
        threshold = question_baseline.DEFAULT_THRESHOLD if override is None else float(override)
        scores = {
            c.case_id: question_baseline.relevance_scores(c)
            for c in tqdm(cases, desc="subtask 2 (baseline)", unit="case", disable=not progress)
        }
        record = {
            "method": "retrieval baseline: " + question_baseline.LABEL,
            "threshold": threshold,
            "threshold_source": "--relevance-threshold" if override is not None else "untuned default",
        }
        log(f"Subtask 2: RETRIEVAL BASELINE ({question_baseline.LABEL}, threshold {threshold:g}); not the model")
    else:
        threshold, source = export_relevance_threshold(export.manifest, override)
        if scores is None or any(c.case_id not in scores for c in cases):
            scores = model_outputs(export, cases, relevance=True, progress=progress).relevance
        record = {"method": "head relevance probability", "threshold": threshold, "threshold_source": source}
        log(f"Subtask 2: head relevance probabilities, threshold {threshold:.3f} ({source})")
    evidence = threshold_relevance(cases, scores, threshold)
    if scores_out is not None:
        scores_out.update(scores)
    record["n_cases_without_evidence"] = sum(1 for ids in evidence.values() if not ids)
    return evidence, record
