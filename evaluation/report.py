"""Per-case error reports: what each system linked right, missed and linked wrongly.

``errors.md`` (Markdown tables) and the page of ``report.html`` (:func:`cv_report_page`).

This file is the user's own report and may quote note text (it helps to read why a
link was missed); nothing here prints to the console.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from data.records import Case
from reports.cases import CasePrediction, case_views
from reports.page import ReportPage

from .systems import Prediction

MAX_QUOTE = 160


def _quote(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= MAX_QUOTE else text[: MAX_QUOTE - 1] + "…"


def case_errors(case: Case, pred: Prediction) -> dict[str, list[dict]]:
    """Per answer id: correct / missed / wrong links, each with the note id and the system's score."""
    col = {nid: j for j, nid in enumerate(case.note_ids)}
    gold = case.gold_pairs()
    out = {}
    for i, a in enumerate(case.answer_sentences):
        aid = a.sentence_id
        g = {n for (x, n) in gold if x == aid}
        p = {n for (x, n) in pred.pairs if x == aid}

        def rows(ids: set[str]) -> list[dict]:
            ordered = sorted(ids, key=lambda n: col[n])
            return [
                {"note_id": n, "score": float(pred.scores[i, col[n]]) if pred.scores.size else None} for n in ordered
            ]

        out[aid] = {"correct": rows(g & p), "missed": rows(g - p), "wrong": rows(p - g)}
    return out


def error_report_markdown(
    cases: Sequence[Case],
    predictions: Mapping[str, Mapping[str, Prediction]],
    fold_of: Mapping[str, int],
    labels: Mapping[str, str],
    notice: Sequence[str],
) -> str:
    """``predictions``: system -> case_id -> held-out prediction; systems appear in the given order."""
    systems = list(predictions)
    lines = ["# Per-case alignment errors", ""] + [f"> {line}" for line in notice] + [""]
    lines += [
        "Systems: " + "; ".join(f"`{s}` = {labels.get(s, s)}" for s in systems),
        "",
        "Scores are each system's own (head: link probability; ensemble: weighted normalised score).",
        "",
    ]
    header = ["case", "fold", "gold pairs"] + [f"`{s}` TP/FP/FN" for s in systems]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for case in cases:
        gold = case.gold_pairs()
        cells = [case.case_id, str(fold_of[case.case_id]), str(len(gold))]
        for s in systems:
            p = predictions[s][case.case_id].pairs
            cells.append(f"{len(p & gold)}/{len(p - gold)}/{len(gold - p)}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    for case in cases:
        notes = {s.sentence_id: s.text for s in case.note_sentences}
        lines += [f"## Case {case.case_id} (held out in fold {fold_of[case.case_id]})", ""]
        per_system = {s: case_errors(case, predictions[s][case.case_id]) for s in systems}
        for a in case.answer_sentences:
            cited = ", ".join(a.citations) or "none (unsupported)"
            lines += [f"### Answer sentence {a.sentence_id} (gold: {cited})", "", f"> {_quote(a.text)}", ""]
            lines += ["| system | outcome | note id | score | note sentence |", "|---|---|---|---|---|"]
            any_row = False
            for s in systems:
                for outcome in ("correct", "missed", "wrong"):
                    for row in per_system[s][a.sentence_id][outcome]:
                        score = "-" if row["score"] is None else f"{row['score']:.3f}"
                        lines.append(
                            f"| `{s}` | {outcome} | {row['note_id']} | {score} | {_quote(notes[row['note_id']])} |"
                        )
                        any_row = True
            if not any_row:
                lines.append("| - | nothing gold, nothing linked | - | - | - |")
            lines.append("")
    return "\n".join(lines)


def cv_report_page(
    cases: Sequence[Case],
    predictions: Mapping[str, CasePrediction],
    shown: str,
    ladder_md: str,
    images: Sequence[tuple[str, Path]],
) -> ReportPage:
    """``report.html`` of a cross-validation run: the ladder (one source: ``ladder.md``), the plots, then
    every case as the ``shown`` system predicted it held out, marked against the key."""
    return ReportPage(
        # no notices of the page's own: the ladder opens with the run's notice
        title="archehr cross-validation report",
        summary_markdown=ladder_md,
        images=images,
        cases_title="Held-out cases",
        cases_note=shown,
        cases=case_views(cases, predictions),
    )
