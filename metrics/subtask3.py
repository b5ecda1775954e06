"""Score a Subtask 3 submission file against the key, as the organizers' scorer does.

Predictions over 75 words are cut to their first 75 whitespace words (the official
scorer's truncation). A prediction or reference with no 13a tokens is refused with one
line naming the case: the official BLEU divides by zero on it.
"""

from __future__ import annotations

from pathlib import Path

from data.archehr import load_cases
from plumbing.errors import InputError
from data.records import Case
from data.submission import MAX_WORDS, count_words, has_13a_tokens

from .case_sets import read_scored_submission
from .generation import GenerationScores, score_generation


def official_truncation(text: str) -> str:
    """The first 75 whitespace words when longer (what the official scorer scores)."""
    return " ".join(text.split()[:MAX_WORDS]) if count_words(text) > MAX_WORDS else text


def reference_answer(case: Case) -> str:
    """The clinician answer without citations (or its sentences joined when absent)."""
    return case.clinician_answer_without_citations or " ".join(a.text for a in case.answer_sentences)


def score_subtask3(
    submission: str | Path, key: str | Path, xml: str | Path, bertscore_model: str | None = None
) -> tuple[GenerationScores, int]:
    """Subtask 3 metrics and the number of predictions truncated to 75 words."""
    sub_path = Path(submission)
    cases = [c for c in load_cases(xml, key) if c.has_key]
    entries = read_scored_submission(sub_path, 3, [c.case_id for c in cases], key)
    by_id = {c.case_id: c for c in cases}
    predictions, references, sources = {}, {}, {}
    truncated = 0
    for entry in entries:
        case = by_id[entry["case_id"]]
        text = official_truncation(entry["prediction"])
        truncated += text != entry["prediction"]
        if not has_13a_tokens(text):
            raise InputError(
                "prediction has no tokens after 13a tokenization (the official BLEU cannot score it)",
                sub_path,
                case.case_id,
            )
        reference = reference_answer(case)
        if not has_13a_tokens(reference):
            raise InputError("key case has no clinician answer to compare with", key, case.case_id)
        predictions[case.case_id] = text
        references[case.case_id] = reference
        sources[case.case_id] = case.patient_narrative
    return score_generation(predictions, references, sources, bertscore_model), truncated
