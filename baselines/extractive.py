"""Subtask 3 baseline: an extractive answer made of the note sentences closest to the question.

The question (the patient's question phrases plus the clinician's rewrite) is scored
against every note sentence with the same lexical scorers as Subtask 4 (BM25 and
TF-IDF, per-row normalised and averaged). The best sentences are taken greedily while
they fit in the word limit and printed in note order, so the answer reads like the
note. Never empty: if even the best sentence is too long, it is cut to the limit.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from data.answers import clean_generated_answer
from data.records import AnswerSentence, Case
from plumbing.errors import InputError
from data.submission import MAX_WORDS, count_words, has_13a_tokens, strip_citation_markers, truncate_words

from .aligners import BM25Aligner, TfidfAligner, combine_scores


def question_scores(case: Case) -> np.ndarray:
    """One score per note sentence: mean of normalised BM25 and TF-IDF against the question."""
    question = " ".join(t for t in (case.question_text, case.clinician_question) if t.strip())
    probe = replace(case, answer_sentences=[AnswerSentence("question", question)])
    parts = {"bm25": BM25Aligner().score(probe), "tfidf": TfidfAligner().score(probe)}
    return combine_scores(parts, {"bm25": 0.5, "tfidf": 0.5})[0]


def extractive_answer(case: Case, max_words: int = MAX_WORDS) -> str:
    """The highest-scoring note sentences that fit in ``max_words`` words, in note order."""
    # A note may hold "[2]" or "| 3 |" (references, tables); an answer may not. A sentence the
    # official BLEU cannot tokenize (e.g. "<skipped>") is never used.
    texts = [t if has_13a_tokens(t) else "" for t in (strip_citation_markers(s.text) for s in case.note_sentences)]
    if not any(texts):
        raise InputError("no note sentence has text for an extractive answer", case_id=case.case_id)
    scores = question_scores(case)
    # Best first; ties keep note order. A zero-score sentence shares nothing with the
    # question, so it is used only when nothing scores (then the note's first sentence).
    ranked = [int(i) for i in np.argsort(-scores, kind="stable") if texts[i]]
    chosen: list[int] = []
    used = 0
    for i in ranked:
        if chosen and scores[i] <= 0:
            break
        n = count_words(texts[i])
        if used + n <= max_words:
            chosen.append(i)
            used += n
    if not chosen:  # even the best sentence is longer than the limit
        return truncate_words(texts[ranked[0]], max_words)
    return " ".join(texts[i] for i in sorted(chosen))


def answer_or_extractive(case: Case, generated: str | None) -> tuple[str, bool]:
    """The cleaned generated answer, or the extractive answer when nothing usable was generated
    (second value True then, so the caller can say so). The one rule for what is submitted."""
    answer = clean_generated_answer(generated or "")
    if answer:
        return answer, False
    return extractive_answer(case), True


def answers_or_extractive(cases: list[Case], generated: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """:func:`answer_or_extractive` for every case: the submitted answers by case id, and the ids
    of the cases whose generated answer was replaced (in case order, so the run can say so)."""
    answers: dict[str, str] = {}
    fell_back: list[str] = []
    for case in cases:
        answers[case.case_id], replaced = answer_or_extractive(case, generated[case.case_id])
        if replaced:
            fell_back.append(case.case_id)
    return answers, fell_back
