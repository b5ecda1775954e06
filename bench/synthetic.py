"""Synthetic workloads of realistic size for the benchmark (content is random; shapes are not).

Training rows mimic emrQA-style prompts: real lengths drawn uniformly from
15%-70% of the sequence length (300-1400 tokens at 2048), an answer of 40-120
tokens at the end, note sentences of 15-60 tokens tiling the prompt.
"""

from __future__ import annotations

import random

from data.prompts import IGNORE_INDEX, EncodedExample
from data.records import AnswerSentence, Case, NoteSentence

WORDS = (
    "patient admitted with chest pain troponin elevated started heparin aspirin stent placed "
    "discharged home follow up cardiology blood pressure metoprolol lisinopril daily mg ct scan "
    "showed no acute findings labs notable for anemia transfused two units hemoglobin stable"
).split()


def training_examples(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[EncodedExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(int(0.15 * seq_len), int(0.70 * seq_len))
        answer_len = min(rng.randint(40, 120), length // 3)
        prompt_len = length - answer_len
        ids = [rng.randrange(1000, vocab - 1000) for _ in range(length)]
        note_spans = _tile(rng, 40, prompt_len, 15, 60)
        answer_spans = _tile(rng, prompt_len, length - 2, 10, 30)
        note_ids = [str(k + 1) for k in range(len(note_spans))]
        answer_ids = [str(k + 1) for k in range(len(answer_spans))]
        pairs = {(a, rng.choice(note_ids)) for a in answer_ids}
        out.append(
            EncodedExample(
                example_id=f"syn-{i}",
                input_ids=ids,
                labels=[IGNORE_INDEX] * prompt_len + ids[prompt_len:],
                prompt_length=prompt_len,
                note_ids=note_ids,
                note_spans=note_spans,
                answer_ids=answer_ids,
                answer_spans=answer_spans,
                pairs=pairs,
            )
        )
    return out


def _tile(rng: random.Random, start: int, end: int, lo: int, hi: int) -> list[tuple[int, int]]:
    spans, pos = [], start
    while pos + lo <= end:
        stop = min(end, pos + rng.randint(lo, hi))
        spans.append((pos, stop))
        pos = stop
    return spans or [(start, max(start + 1, end))]


def _sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def inference_cases(n: int, seed: int = 0) -> list[Case]:
    """Cases of realistic size: 15-40 note sentences, 3-6 answer sentences."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        notes = [NoteSentence(str(k + 1), _sentence(rng, rng.randint(8, 30))) for k in range(rng.randint(15, 40))]
        answers = [AnswerSentence(str(k + 1), _sentence(rng, rng.randint(10, 22))) for k in range(rng.randint(3, 6))]
        cases.append(
            Case(
                case_id=str(i + 1),
                patient_narrative=_sentence(rng, 60),
                clinician_question=_sentence(rng, 12),
                note_sentences=notes,
                answer_sentences=answers,
            )
        )
    return cases


def keyed_cases(n: int, seed: int = 0) -> list[Case]:
    """:func:`inference_cases` with what a key adds (citations, relevance, the clinician's
    answer) and a patient question: training and evaluation input of realistic size."""
    from data.records import QuestionPhrase

    rng = random.Random(seed + 7919)
    out = []
    for case in inference_cases(n, seed=seed):
        note_ids = [s.sentence_id for s in case.note_sentences]
        answers = [
            AnswerSentence(a.sentence_id, a.text, tuple(sorted(rng.sample(note_ids, rng.randint(1, 3)), key=int)))
            for a in case.answer_sentences
        ]
        cited = {e for a in answers for e in a.citations}
        case.answer_sentences = answers
        case.relevance = {sid: ("essential" if sid in cited else "not-relevant") for sid in note_ids}
        case.clinician_answer_without_citations = " ".join(a.text for a in answers)
        case.patient_question = [QuestionPhrase("0", case.clinician_question, 0)]
        case.note_excerpt = " ".join(s.text for s in case.note_sentences)
        case.has_key = True
        out.append(case)
    return out


def write_keyed_cases(cases: list[Case], xml_path, key_path, answers_in_xml: bool = False) -> None:
    """The official XML + key pair; ``answers_in_xml`` also puts each case's answer
    sentences in the XML (``<answer_sentences>``), so Subtask 4 runs without ``--key``."""
    from xml.etree.ElementTree import SubElement

    from defusedxml.ElementTree import parse

    from data.archehr import write_cases

    write_cases(cases, xml_path, key_path)
    if not answers_in_xml:
        return
    tree = parse(str(xml_path))
    by_id = {c.case_id: c for c in cases}
    for el in tree.getroot().findall("case"):
        block = SubElement(el, "answer_sentences")
        for a in by_id[el.get("id")].answer_sentences:
            SubElement(block, "sentence", id=a.sentence_id).text = a.text
    tree.write(str(xml_path), encoding="utf-8", xml_declaration=True)
