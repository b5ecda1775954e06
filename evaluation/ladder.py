"""The baseline ladder: one table per subtask, every system scored once on pooled held-out predictions.

:func:`ladder_markdown` renders the JSON record that :mod:`evaluation.cv` builds; both
carry the same notice (held-out cases, data provenance), so neither can be quoted
without it.
"""

from __future__ import annotations

from .bootstrap import ALIGNMENT_KEYS

ST3_COLUMNS = ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "sari", "bertscore")
ST3_NAMES = {
    "bleu": "BLEU",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "rougeLsum": "ROUGE-Lsum",
    "sari": "SARI",
    "bertscore": "BERTScore F1",
}
ST4_NAMES = {
    "micro_precision": "micro P",
    "micro_recall": "micro R",
    "micro_f1": "micro F1",
    "macro_precision": "macro P",
    "macro_recall": "macro R",
    "macro_f1": "macro F1",
}


def _cell(value: float | None, ci: list | tuple | None) -> str:
    if value is None:
        return "n/c"
    return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def ladder_markdown(ladder: dict) -> str:
    """The ladder as Markdown (no note text: ids and numbers only)."""
    lines = _header_lines(ladder)
    lines += _subtask4_lines(ladder["subtask4"])
    if ladder.get("subtask3", []):
        lines += _subtask3_lines(ladder["subtask3"])
    if ladder.get("subtask2"):
        lines += _subtask2_lines(ladder["subtask2"])
    lines += _fold_lines(ladder["folds"])
    return "\n".join(lines)


def _header_lines(ladder: dict) -> list[str]:
    lines = [f"# {ladder['title']}", ""]
    lines += [f"> {line}" for line in ladder["notice"]] + [""]
    level = int(round(100 * ladder["level"]))
    lines += [
        f"{ladder['n_cases']} cases, {ladder['n_folds']} fold(s) (seed {ladder['seed']}); "
        f"[{level}% bootstrap CI over cases, {ladder['n_resamples']} resamples, percentile]. "
        "All scores x100.",
        "",
    ]
    return lines


def _subtask4_lines(st4: list[dict]) -> list[str]:
    lines = ["## Subtask 4: evidence alignment (official pair scores)", ""]
    paired = all("micro_f1_minus_ensemble" in r for r in st4)
    rows = []
    for r in st4:
        row = [f"`{r['system']}` {r['label']}"] + [_cell(r["scores"][k], r["ci"][k]) for k in ALIGNMENT_KEYS]
        if paired:
            d = r["micro_f1_minus_ensemble"]
            row.append(
                "-" if r["system"] == "ensemble" else f"{d['value']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]"
            )
        rows.append(row)
    header = ["system"] + [ST4_NAMES[k] for k in ALIGNMENT_KEYS] + (["micro F1 − ensemble (paired)"] if paired else [])
    return lines + _table(header, rows) + [""]


def _subtask3_lines(st3: list[dict]) -> list[str]:
    lines = [
        "## Subtask 3: answer generation (vs clinician_answer_without_citations; SARI source = patient narrative)",
        "",
    ]
    rows = [
        [f"`{r['system']}` {r['label']}"] + [_cell(r["scores"].get(k), r["ci"].get(k)) for k in ST3_COLUMNS]
        for r in st3
    ]
    lines += _table(["system"] + [ST3_NAMES[k] for k in ST3_COLUMNS], rows)
    reasons = {k: v for r in st3 for k, v in r.get("not_computed", {}).items() if k in ST3_COLUMNS}
    lines += [""] + [f"n/c = not computed: {k}: {v}" for k, v in reasons.items()]
    for r in st3:
        if r.get("extractive_fallback_cases"):
            lines.append(
                f"`{r['system']}`: {len(r['extractive_fallback_cases'])} case(s) had an empty generated "
                "answer and were given the extractive answer (what infer.py submits)"
            )
    lines.append("")
    return lines


def _subtask2_lines(st2: dict) -> list[str]:
    lines = ["## Subtask 2: evidence identification (official scores)", ""]
    if not st2.get("available"):
        return lines + [f"not available: {st2.get('reason', '')}", ""]
    keys = [
        f"{view}_{avg}_{m}"
        for view in ("strict", "lenient")
        for avg in ("micro", "macro")
        for m in ("precision", "recall", "f1")
    ]
    rows = [[f"`{r['system']}` {r['label']}"] + [_cell(r["scores"][k], r["ci"][k]) for k in keys] for r in st2["rows"]]
    header = [
        k.replace("_precision", " P").replace("_recall", " R").replace("_f1", " F1").replace("_", " ") for k in keys
    ]
    lines += _table(["system"] + header, rows)
    lines += [
        "",
        "strict: predictions against the essential sentences; lenient: supplementary sentences "
        "are removed from the prediction first, then scored against the essential sentences "
        "(the organizers' definition). overall_score = strict micro F1.",
    ]
    if st2.get("head_missing"):
        lines.append(f"`head`: {st2['head_missing']}")
    lines.append("")
    return lines


def _fold_lines(folds: list[dict]) -> list[str]:
    lines = ["## What each fold chose (on its training cases only)", ""]
    rows = []
    untuned: set[str] = set()
    for fold in folds:
        for system, t in fold["thresholds"].items():
            if t.get("threshold") is None:
                untuned.add(system)
                continue
            value = f"{t['threshold']:g} ({t.get('mode')})"
            weights = (t.get("params") or {}).get("weights")
            if weights:
                value += " weights " + ", ".join(f"{k} {v:g}" for k, v in weights.items())
            rows.append(
                [
                    str(fold["index"]),
                    f"`{system}`",
                    value,
                    str(len(t.get("chosen_on", []))),
                    ", ".join(fold["test_ids"]),
                ]
            )
    lines += _table(["fold", "system", "setting", "# training cases it was chosen on", "held-out cases"], rows)
    if untuned:
        lines += ["", "Nothing tuned: " + ", ".join(f"`{s}`" for s in sorted(untuned)) + "."]
    lines.append("")
    return lines
