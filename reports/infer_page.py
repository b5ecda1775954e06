"""The report of an ``infer.py`` run: built from the validated submission entries and ``run.json``'s record."""

from __future__ import annotations

from typing import Mapping, Sequence

from data.records import Case

from .cases import CasePrediction, case_views
from .page import ReportPage

SCORE_GROUPS = {"subtask2": "Subtask 2", "subtask3": "Subtask 3", "subtask4": "Subtask 4"}


def predictions_from_entries(
    entries: Mapping[int, Sequence[dict]], relevance_scores: Mapping[str, Sequence[float]] | None = None
) -> dict[str, CasePrediction]:
    """``case_id -> CasePrediction`` from official-format entries per subtask (2, 3, 4; any may be absent)
    and the Subtask 2 scores behind the entries, where kept."""
    out: dict[str, CasePrediction] = {}
    for case_id, scores in (relevance_scores or {}).items():
        out.setdefault(case_id, CasePrediction()).relevance_scores = list(scores)
    for entry in entries.get(3, ()):
        out.setdefault(entry["case_id"], CasePrediction()).answer = entry["prediction"]
    for entry in entries.get(2, ()):
        out.setdefault(entry["case_id"], CasePrediction()).relevant_ids = list(entry["prediction"])
    for entry in entries.get(4, ()):
        out.setdefault(entry["case_id"], CasePrediction()).links = {
            item["answer_id"]: list(item["evidence_id"]) for item in entry["prediction"]
        }
    return out


def _facts(run: Mapping) -> list[tuple[str, str]]:
    facts = [
        ("engine", str(run.get("engine"))),
        ("cases XML", str(run.get("xml"))),
        ("key", str(run.get("key") or "none (no gold shown)")),
    ]
    if run.get("export") or run.get("checkpoint"):
        facts.append(("export", str(run.get("export") or run.get("checkpoint"))))
    facts.append(("subtasks", ", ".join(str(s) for s in run.get("subtasks", ()))))
    s2, s4 = run.get("subtask2") or {}, run.get("subtask4") or {}
    if s2.get("threshold") is not None:
        facts.append(("Subtask 2", f"{s2.get('method')}; threshold {s2['threshold']:g} ({s2.get('threshold_source')})"))
    if s2.get("not_written"):
        facts.append(("Subtask 2", f"not written: {s2['not_written']}"))
    if s4.get("aligner"):
        threshold = s4.get("threshold")
        facts.append(
            (
                "Subtask 4",
                f"aligner {s4['aligner']}"
                + (f", threshold {threshold:g} ({s4.get('mode')})" if isinstance(threshold, (int, float)) else ""),
            )
        )
    if s4.get("skipped_cases"):
        facts.append(("Subtask 4 skipped", ", ".join(s4["skipped_cases"]) + " (no answer sentences)"))
    return facts


def _overall_scores(scores: Mapping | None) -> dict[str, dict[str, float]]:
    out = {}
    for key, label in SCORE_GROUPS.items():
        values = (scores or {}).get(key) or {}
        if key == "subtask3":
            values = values.get("scores", values)
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            out[label] = numbers
    return out


def inference_page(
    cases: Sequence[Case],
    entries: Mapping[int, Sequence[dict]],
    run: Mapping,
    scores: Mapping | None = None,
    relevance_scores: Mapping[str, Sequence[float]] | None = None,
) -> ReportPage:
    """The page of one inference run: overall scores (with a key), then every case."""
    notices = [f"Engine: {run.get('engine_note') or run.get('engine')}."]
    if scores and scores.get("evaluated_on"):
        trained = len(scores.get("training_cases_scored", []))
        notices.append(
            f"{scores['evaluated_on']}: the export trained on {trained} of the scored cases "
            "(--allow-train-cases); every score here overstates new cases."
        )
    if any(c.has_key for c in cases):
        notices.append("Gold from the key is shown beside every prediction, with each case's official per-case scores.")
    return ReportPage(
        title="archehr inference report",
        notices=notices,
        facts=_facts(run),
        scores=_overall_scores(scores),
        cases_note=None,
        cases=case_views(cases, predictions_from_entries(entries, relevance_scores)),
    )
