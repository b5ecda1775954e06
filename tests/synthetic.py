"""A generated alignment task on which word overlap is misleading.

Every case pairs answer sentences written in lay words ("your kidneys") with note
sentences written in codes ("Zeltrax stable."). The lay word <-> code lexicon is fixed
and consistent across cases, but the two sides share no surface form, so a model has
to learn the association. Each answer sentence also gets a *distractor* note sentence
that repeats almost all of its words with a different lay term: a word-overlap
aligner picks the distractor every time, while the true support shares few words.

Cases are written as an ArchEHR-QA XML + key pair (2026 layout) so that training and
evaluation go through the same loaders as real data. Used by the tests and handy as
a quick sanity check of the joint training path.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from data.archehr import write_cases
from data.records import AnswerSentence, Case, NoteSentence, QuestionPhrase

LEXICON = (
    ("kidneys", "Zeltrax"),
    ("heart", "Quoravin"),
    ("lungs", "Vimbexol"),
    ("blood sugar", "Drossinal"),
    ("liver", "Palquenox"),
    ("bones", "Terbicide"),
    ("skin", "Oxmilorin"),
    ("stomach", "Crandolin"),
)

ANSWER_TEMPLATES = (
    "The doctors checked your {lay} and were reassured.",
    "Your {lay} were watched daily and looked fine.",
    "The team found nothing worrying with your {lay}.",
)
SUPPORT_TEMPLATES = ("{code} stable.", "{code} within limits.", "{code} unremarkable on review.")
FILLER_TEMPLATES = ("{code} pending.", "{code} not assessed.")


def _sentence_case(text: str) -> str:
    return text[0].upper() + text[1:]


def make_case(case_id: str, rng: random.Random, n_answers: int = 3, n_fillers: int = 2) -> Case:
    """One case: ``n_answers`` cited answer sentences, their supports, distractors and fillers."""
    concepts = rng.sample(range(len(LEXICON)), n_answers + n_fillers)
    cited, fillers = concepts[:n_answers], concepts[n_answers:]
    notes: list[tuple[str, str, int | None]] = []  # (kind, text, answer index)
    answers_text = []
    for j, c in enumerate(cited):
        lay, code = LEXICON[c]
        template = rng.choice(ANSWER_TEMPLATES)
        answers_text.append(template.format(lay=lay))
        notes.append(("support", rng.choice(SUPPORT_TEMPLATES).format(code=code), j))
        # Distractor: the answer's own words around a different concept's lay term.
        other = rng.choice([k for k in range(len(LEXICON)) if k != c])
        notes.append(("distractor", _sentence_case(template.format(lay=LEXICON[other][0])), None))
    for c in fillers:
        notes.append(("filler", rng.choice(FILLER_TEMPLATES).format(code=LEXICON[c][1]), None))
    rng.shuffle(notes)
    note_sentences = [NoteSentence(str(i + 1), text, paragraph_id="1") for i, (_, text, _) in enumerate(notes)]
    answers = []
    for j, text in enumerate(answers_text):
        support = [str(i + 1) for i, (kind, _, idx) in enumerate(notes) if kind == "support" and idx == j]
        answers.append(AnswerSentence(str(j + 1), text, tuple(support)))
    relevance = {
        ns.sentence_id: ("essential" if kind == "support" else "not-relevant")
        for ns, (kind, _, _) in zip(note_sentences, notes)
    }
    question = "Were my test results during the stay okay?"
    return Case(
        case_id=case_id,
        patient_narrative=question,
        clinician_question="Were the monitored results reassuring?",
        note_sentences=note_sentences,
        patient_question=[QuestionPhrase("0", question, 0)],
        clinical_specialty="Synthetic",
        note_excerpt=" ".join(ns.text for ns in note_sentences),
        answer_sentences=answers,
        relevance=relevance,
        clinician_answer_without_citations=" ".join(answers_text),
        has_key=True,
    )


def make_cases(n: int, seed: int, id_prefix: str = "s") -> list[Case]:
    rng = random.Random(seed)
    return [make_case(f"{id_prefix}{seed}-{i}", rng) for i in range(n)]


def write_archehr(cases: list[Case], xml_path: str | Path, key_path: str | Path) -> None:
    """Write cases as an ArchEHR-QA 2026-layout XML file and key JSON."""
    write_cases(cases, xml_path, key_path)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def word_overlap_top1(case: Case) -> set[tuple[str, str]]:
    """Baseline: link each answer sentence to the note sentence sharing the most words (Jaccard)."""
    pairs = set()
    for a in case.answer_sentences:
        aw = _words(a.text)
        best = max(case.note_sentences, key=lambda s: len(aw & _words(s.text)) / max(1, len(aw | _words(s.text))))
        pairs.add((a.sentence_id, best.sentence_id))
    return pairs
