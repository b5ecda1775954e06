"""Read the official ArchEHR-QA XML and key files (2025 and 2026 layouts).

The XML carries the cases (narrative, questions, numbered note sentences and, in the
2026 test release, the clinician answer sentences); the key carries relevance labels,
the clinician answer and, from 2026, its sentences with citations (a key without citations
or without relevance labels is accepted: such cases train only what their labels allow). Both are parsed
strictly: anything the official scorer would silently mis-read (a comma-separated
``citations`` string scored character by character, an id that does not exist) is
either normalised or rejected with an :class:`InputError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence
from xml.etree.ElementTree import Element, ElementTree, ParseError, SubElement

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from plumbing.errors import InputError, check_input_file, parse_json, read_text_file
from .records import RELEVANCE_LABELS, AnswerSentence, Case, NoteSentence, QuestionPhrase


@dataclass
class KeyCase:
    """One case of the key file, normalised (ids as strings, citations as tuples)."""

    case_id: str
    relevance: dict[str, str] = field(default_factory=dict)
    answer_sentences: list[AnswerSentence] = field(default_factory=list)
    clinician_answer_without_citations: str | None = None

    @property
    def note_ids(self) -> set[str]:
        return set(self.relevance)

    def gold_pairs(self) -> set[tuple[str, str]]:
        return {(a.sentence_id, e) for a in self.answer_sentences for e in a.citations}


def _text(el: Element | None) -> str:
    return "".join(el.itertext()).strip() if el is not None else ""


def _optional_int(value: str | None, path: Path, case_id: str, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{what} is not an integer: {value!r}", path, case_id) from None


def _parse_xml(path: Path) -> Element:
    check_input_file(path)
    try:
        return SafeET.parse(str(path), forbid_dtd=True).getroot()
    except DefusedXmlException as err:
        raise InputError(f"refused unsafe XML ({type(err).__name__})", path) from None
    except ParseError as err:
        raise InputError(f"malformed XML ({err})", path) from None


def _read_sentences(parent: Element | None, path: Path, case_id: str, what: str) -> list[Element]:
    if parent is None:
        return []
    seen: set[str] = set()
    out = []
    for el in parent.findall("sentence"):
        sid = el.get("id")
        if sid is None or sid.strip() == "":
            raise InputError(f"a {what} sentence has no id", path, case_id)
        if sid in seen:
            raise InputError(f"duplicate {what} sentence id {sid!r}", path, case_id)
        seen.add(sid)
        out.append(el)
    return out


def parse_case_element(el: Element, path: Path) -> Case:
    case_id = el.get("id")
    if case_id is None or case_id.strip() == "":
        raise InputError("a <case> has no id attribute", path)
    sentences_el = el.find("note_excerpt_sentences")
    if sentences_el is None:
        raise InputError("missing <note_excerpt_sentences>", path, case_id)
    note_sentences = [
        NoteSentence(
            sentence_id=s.get("id"),  # type: ignore[arg-type]  # _read_sentences checked every id
            text=_text(s),
            paragraph_id=s.get("paragraph_id"),
            start_char_index=_optional_int(s.get("start_char_index"), path, case_id, "start_char_index"),
        )
        for s in _read_sentences(sentences_el, path, case_id, "note")
    ]
    if not note_sentences:
        raise InputError("no note sentences", path, case_id)
    phrases: list[QuestionPhrase] = []
    question_el = el.find("patient_question")
    if question_el is not None:
        for p in question_el.findall("phrase"):
            phrases.append(
                QuestionPhrase(
                    phrase_id=p.get("id", str(len(phrases))),
                    text=_text(p),
                    start_char_index=_optional_int(p.get("start_char_index"), path, case_id, "start_char_index"),
                )
            )
    answers = [
        AnswerSentence(sentence_id=s.get("id"), text=_text(s))  # type: ignore[arg-type]  # ids checked as above
        for s in _read_sentences(el.find("answer_sentences"), path, case_id, "answer")
    ]
    specialty = _text(el.find("clinical_specialty")) or None
    return Case(
        case_id=case_id,
        patient_narrative=_text(el.find("patient_narrative")),
        clinician_question=_text(el.find("clinician_question")),
        note_sentences=note_sentences,
        patient_question=phrases,
        clinical_specialty=specialty,
        note_excerpt=_text(el.find("note_excerpt")),
        answer_sentences=answers,
    )


def load_xml(xml_path: str | Path) -> list[Case]:
    """Parse an official XML file into cases (no key information)."""
    path = Path(xml_path)
    root = _parse_xml(path)
    case_els = root.findall("case") if root.tag != "case" else [root]
    if not case_els:
        raise InputError("no <case> elements", path)
    cases: list[Case] = []
    seen: set[str] = set()
    for el in case_els:
        case = parse_case_element(el, path)
        if case.case_id in seen:
            raise InputError("duplicate case id", path, case.case_id)
        seen.add(case.case_id)
        cases.append(case)
    return cases


def _expect(cond: bool, problem: str, path: Path, case_id: str | None) -> None:
    if not cond:
        raise InputError(problem, path, case_id)


def normalise_citations(value: object, path: Path, case_id: str, answer_id: str) -> tuple[str, ...]:
    """Citations as a tuple of id strings; accepts a list or a comma-separated string."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
        return tuple(v for v in items if v)
    if isinstance(value, list):
        for v in value:
            _expect(isinstance(v, str), f"answer {answer_id}: citation {v!r} is not a string id", path, case_id)
        return tuple(v.strip() for v in value if v.strip())
    raise InputError(f"answer {answer_id}: citations must be a list or a string", path, case_id)


def _load_json(path: Path) -> object:
    text = read_text_file(path)
    return parse_json(text, path)


def load_key(key_path: str | Path) -> dict[str, KeyCase]:
    """Parse a key file into normalised :class:`KeyCase` records, by case id."""
    path = Path(key_path)
    data = _load_json(path)
    _expect(isinstance(data, list), "key must be a JSON list of cases", path, None)
    _expect(bool(data), "key holds no cases (an empty list)", path, None)
    assert isinstance(data, list)  # for the type checker: _expect raised otherwise
    out: dict[str, KeyCase] = {}
    for item in data:
        _expect(isinstance(item, dict), "each key entry must be an object", path, None)
        case_id = item.get("case_id")
        _expect(isinstance(case_id, str) and case_id != "", "case_id must be a non-empty string", path, repr(case_id))
        _expect(case_id not in out, "duplicate case id in key", path, case_id)
        relevance: dict[str, str] = {}
        answers = item.get("answers", [])
        _expect(isinstance(answers, list), "'answers' must be a list", path, case_id)
        # A key may list the note sentences without relevance labels (a set annotated with answers only):
        # accepted when no entry has a label; the case then has no relevance labels.
        if all(isinstance(a, dict) and "relevance" not in a for a in answers):
            answers = []
        for a in answers:
            _expect(isinstance(a, dict), "each 'answers' entry must be an object", path, case_id)
            sid, label = a.get("sentence_id"), a.get("relevance")
            _expect(isinstance(sid, str), f"sentence_id {sid!r} is not a string", path, case_id)
            _expect(
                isinstance(label, str) and label in RELEVANCE_LABELS,
                f"sentence {sid}: unknown relevance {label!r} (official labels: {', '.join(RELEVANCE_LABELS)})",
                path,
                case_id,
            )
            _expect(sid not in relevance, f"duplicate sentence_id {sid!r} in answers", path, case_id)
            relevance[sid] = label
        sentences = []
        seen_answer_ids: set[str] = set()
        raw_sentences = item.get("clinician_answer_sentences", [])
        _expect(isinstance(raw_sentences, list), "'clinician_answer_sentences' must be a list", path, case_id)
        for s in raw_sentences:
            _expect(isinstance(s, dict), "each answer sentence must be an object", path, case_id)
            aid = s.get("id")
            _expect(isinstance(aid, str) and aid != "", f"answer sentence id {aid!r} is not a string", path, case_id)
            _expect(aid not in seen_answer_ids, f"duplicate answer sentence id {aid!r}", path, case_id)
            seen_answer_ids.add(aid)
            text = s.get("text", "")
            _expect(isinstance(text, str), f"answer {aid}: text must be a string", path, case_id)
            citations = normalise_citations(s.get("citations", []), path, case_id, aid)
            if relevance:
                for c in citations:
                    _expect(c in relevance, f"answer {aid} cites unknown sentence {c!r}", path, case_id)
            sentences.append(AnswerSentence(sentence_id=aid, text=text.strip(), citations=citations))
        answer_text = item.get("clinician_answer_without_citations")
        _expect(
            answer_text is None or isinstance(answer_text, str),
            "clinician_answer_without_citations must be a string",
            path,
            case_id,
        )
        out[case_id] = KeyCase(case_id, relevance, sentences, answer_text)
    return out


def load_cases(xml_path: str | Path, key_path: str | Path | None = None) -> list[Case]:
    """Cases from the XML, enriched with the key when given.

    Answer sentences come from the XML ``<answer_sentences>`` block when present, else
    from the key's ``clinician_answer_sentences``; citations always come from the key.
    Cases in the XML but not in the key are kept (test data); a key case the XML lacks,
    or a key id the XML case does not have, is an error.
    """
    cases = load_xml(xml_path)
    if key_path is None:
        return cases
    kpath = Path(key_path)
    key = load_key(kpath)
    by_id = {c.case_id: c for c in cases}
    missing = [cid for cid in key if cid not in by_id]
    if missing:
        raise InputError(f"key case missing from the XML {Path(xml_path).name}", kpath, missing[0])
    merged = []
    for case in cases:
        k = key.get(case.case_id)
        if k is None:
            merged.append(case)
            continue
        note_ids = set(case.note_ids)
        for sid in k.relevance:
            _expect(sid in note_ids, f"relevance for unknown sentence {sid!r}", kpath, case.case_id)
        for a in k.answer_sentences:
            for c in a.citations:
                _expect(c in note_ids, f"answer {a.sentence_id} cites unknown sentence {c!r}", kpath, case.case_id)
        if case.answer_sentences:
            key_by_id = {a.sentence_id: a for a in k.answer_sentences}
            extra = sorted(set(key_by_id) - set(case.answer_ids))
            if extra:
                raise InputError(f"key answer sentence {extra[0]!r} is not in the XML", kpath, case.case_id)
            answers = [
                replace(a, citations=key_by_id[a.sentence_id].citations) if a.sentence_id in key_by_id else a
                for a in case.answer_sentences
            ]
        else:
            answers = list(k.answer_sentences)
        merged.append(
            replace(
                case,
                answer_sentences=answers,
                relevance=dict(k.relevance),
                clinician_answer_without_citations=k.clinician_answer_without_citations,
                has_key=True,
            )
        )
    return merged


def _set(el: Element, name: str, value: object) -> None:
    if value is not None:
        el.set(name, str(value))


def xml_bytes(root: Element) -> bytes:
    """``root`` serialised so that :func:`load_xml` reads back exactly the text it holds.

    ElementTree escapes CR, LF and TAB inside attributes but writes a CR in text as it is,
    and every XML parser turns a raw CR (or CR LF) into LF: a note holding ``&#13;`` would
    come back changed. After serialisation a raw CR can only be text, so it becomes ``&#13;``.
    """
    import io

    buffer = io.BytesIO()
    ElementTree(root).write(buffer, encoding="utf-8", xml_declaration=True)
    return buffer.getvalue().replace(b"\r", b"&#13;")


def write_cases(cases: Sequence[Case], xml_path: str | Path, key_path: str | Path) -> None:
    """Write cases as an official 2026-layout XML file and key JSON (what :func:`load_cases` reads)."""
    xml_path, key_path = Path(xml_path), Path(key_path)
    root = Element("annotations")
    for case in cases:
        el = SubElement(root, "case", id=case.case_id)
        if case.clinical_specialty is not None:
            SubElement(el, "clinical_specialty").text = case.clinical_specialty
        SubElement(el, "patient_narrative").text = case.patient_narrative
        pq = SubElement(el, "patient_question")
        for p in case.patient_question:
            phrase = SubElement(pq, "phrase", id=p.phrase_id)
            _set(phrase, "start_char_index", p.start_char_index)
            phrase.text = p.text
        SubElement(el, "clinician_question").text = case.clinician_question
        SubElement(el, "note_excerpt").text = case.note_excerpt
        sentences = SubElement(el, "note_excerpt_sentences")
        for s in case.note_sentences:
            sent = SubElement(sentences, "sentence", id=s.sentence_id)
            _set(sent, "paragraph_id", s.paragraph_id)
            _set(sent, "start_char_index", s.start_char_index)
            sent.text = s.text
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    xml_path.write_bytes(xml_bytes(root))
    key = [
        {
            "case_id": c.case_id,
            "answers": [{"sentence_id": sid, "relevance": label} for sid, label in c.relevance.items()],
            "clinician_answer_without_citations": c.clinician_answer_without_citations,
            "clinician_answer_sentences": [
                {"id": a.sentence_id, "text": a.text, "citations": list(a.citations)} for a in c.answer_sentences
            ],
        }
        for c in cases
    ]
    key_path.write_text(json.dumps(key, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
