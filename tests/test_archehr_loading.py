"""Reading the official files: every shared fixture, both layouts, odd ids and citations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.archehr import load_cases, load_key, load_xml
from data.emrqa import ABSTAIN_ANSWER, EmrqaRecord, emrqa_to_prompt_example, load_emrqa
from plumbing.errors import InputError
from data.sentences import split_sentences

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _xml_key_pairs(folder: Path) -> list[tuple[Path, Path | None]]:
    pairs = []
    for xml in sorted(folder.rglob("*.xml")):
        key = xml.with_name(xml.stem + "_key.json")
        pairs.append((xml, key if key.is_file() else None))
    return pairs


def test_every_shared_fixture_parses(shared_fixtures):
    xml_pairs = _xml_key_pairs(shared_fixtures)
    jsonls = sorted(shared_fixtures.rglob("*.jsonl"))
    assert xml_pairs and jsonls
    for xml, key in xml_pairs:
        cases = load_cases(xml, key)
        assert cases, xml
        for case in cases:
            assert case.note_sentences and all(isinstance(i, str) for i in case.note_ids)
    for path in jsonls:
        records = load_emrqa(path)
        assert records and all(isinstance(r, EmrqaRecord) for r in records)
    for path in sorted(shared_fixtures.rglob("*_key.json")):
        assert load_key(path)


def test_shared_set_a_counts(shared_fixtures):
    cases = load_cases(shared_fixtures / "setA" / "archehr-qa.xml", shared_fixtures / "setA" / "archehr-qa_key.json")
    assert len(cases) == 12
    assert sum(len(c.note_sentences) for c in cases) == 200
    assert sum(len(c.answer_sentences) for c in cases) == 58
    assert sum(len(c.gold_pairs()) for c in cases) == 79
    assert all(c.has_key and c.clinical_specialty for c in cases)
    # Relevance covers every note sentence and every citation is a note sentence.
    for c in cases:
        assert set(c.relevance) == set(c.note_ids)
        assert {e for _, e in c.gold_pairs()} <= set(c.note_ids)


def test_shared_emrqa_sample(shared_fixtures):
    records = load_emrqa(shared_fixtures / "emrqa_sample.jsonl")
    assert len(records) == 48
    unanswerable = [r for r in records if not r.answerable]
    assert len(unanswerable) == 6
    assert all(r.answer_text == ABSTAIN_ANSWER and r.answer_start == -1 for r in unanswerable)
    for r in records:
        if r.answerable:
            assert r.context[r.answer_start : r.answer_start + len(r.answer_text)] == r.answer_text
    assert len(load_emrqa(shared_fixtures / "emrqa_sample.jsonl", unanswerable="skip")) == 42


def test_bundled_examples():
    cases = load_cases(EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json")
    assert [c.case_id for c in cases] == ["101", "102", "103"]
    for c in cases:
        assert c.has_key and c.clinical_specialty and c.answer_sentences
        assert c.clinician_answer_without_citations
        for s in c.note_sentences:  # offsets point into the note excerpt
            assert c.note_excerpt[s.start_char_index : s.start_char_index + len(s.text)] == s.text
    assert cases[2].answer_sentences[0].citations == ()  # "Yes." cites nothing
    records = load_emrqa(EXAMPLES / "emrqa_sample.jsonl")
    assert len(records) == 12 and sum(not r.answerable for r in records) == 2


XML_2025 = """<?xml version='1.0' encoding='UTF-8'?>
<annotations>
  <case id="7">
    <patient_narrative>Invented: why did they stop my pill?</patient_narrative>
    <patient_question><phrase id="0" start_char_index="10">why did they stop my pill?</phrase></patient_question>
    <clinician_question>Why was the medication held?</clinician_question>
    <note_excerpt>invented</note_excerpt>
    <note_excerpt_sentences>
      <sentence id="3" paragraph_id="1">Kidney function fell.</sentence>
      <sentence id="10" paragraph_id="1">The pill was held.</sentence>
      <sentence id="7a" paragraph_id="2">It restarts at follow-up.</sentence>
    </note_excerpt_sentences>
  </case>
  <case id="8">
    <patient_narrative>Invented test case without key.</patient_narrative>
    <clinician_question>Unused.</clinician_question>
    <note_excerpt_sentences><sentence id="1">Only sentence.</sentence></note_excerpt_sentences>
  </case>
</annotations>
"""

KEY_2025 = [
    {
        "case_id": "7",
        "answers": [
            {"sentence_id": "3", "relevance": "essential"},
            {"sentence_id": "10", "relevance": "essential"},
            {"sentence_id": "7a", "relevance": "supplementary"},
        ],
        "clinician_answer_without_citations": "Your kidneys were strained. The pill was paused. Nothing else.",
        "clinician_answer_sentences": [
            {"id": "1", "text": "Your kidneys were strained.", "citations": "3"},
            {"id": "2", "text": "The pill was paused.", "citations": "10, 7a"},
            {"id": "3", "text": "Nothing else.", "citations": ""},
        ],
    }
]


def _write_2025(tmp_path: Path) -> tuple[Path, Path]:
    xml = tmp_path / "dev.xml"
    key = tmp_path / "dev_key.json"
    xml.write_text(XML_2025)
    key.write_text(json.dumps(KEY_2025))
    return xml, key


def test_2025_layout_string_citations_and_odd_ids(tmp_path):
    xml, key = _write_2025(tmp_path)
    cases = load_cases(xml, key)
    c7, c8 = cases
    assert c7.clinical_specialty is None
    assert c7.note_ids == ["3", "10", "7a"]  # file order, strings, not contiguous
    # No <answer_sentences> in the XML: answer sentences come from the key.
    assert c7.answer_ids == ["1", "2", "3"]
    # "10, 7a" is split on commas, never read character by character; "" cites nothing.
    assert [a.citations for a in c7.answer_sentences] == [("3",), ("10", "7a"), ()]
    assert c7.gold_pairs() == {("1", "3"), ("2", "10"), ("2", "7a")}
    assert c7.relevance == {"3": "essential", "10": "essential", "7a": "supplementary"}
    # A case in the XML but not in the key (test data) is kept, without key fields.
    assert c8.case_id == "8" and not c8.has_key and c8.answer_sentences == [] and c8.relevance == {}
    assert [c.case_id for c in load_xml(xml)] == ["7", "8"]


def test_key_citing_a_sentence_the_xml_lacks(tmp_path):
    xml, _ = _write_2025(tmp_path)
    key = json.loads(json.dumps(KEY_2025))
    key[0]["answers"].append({"sentence_id": "99", "relevance": "essential"})
    path = tmp_path / "k.json"
    path.write_text(json.dumps(key))
    with pytest.raises(InputError, match="unknown sentence '99'"):
        load_cases(xml, path)


def test_emrqa_sampling_is_deterministic_and_rules_are_checked():
    path = EXAMPLES / "emrqa_sample.jsonl"
    a = load_emrqa(path, n=5, seed=1)
    assert [r.id for r in a] == [r.id for r in load_emrqa(path, n=5, seed=1)]
    assert len(a) == 5 and len({r.id for r in a}) == 5
    assert {r.id for r in load_emrqa(path, n=5, seed=2)} != {r.id for r in a}
    assert len(load_emrqa(path, n=100)) == 12
    skipped = load_emrqa(path, n=10, seed=0, unanswerable="skip")
    assert len(skipped) == 10 and all(r.answerable for r in skipped)
    with pytest.raises(ValueError):
        load_emrqa(path, unanswerable="keep")


def test_emrqa_json_layouts_and_malformed_records(tmp_path):
    rec = {
        "id": "q1",
        "title": "t",
        "context": "A b. C d.",
        "question": "What?",
        "answers": {"text": ["C d"], "answer_start": [5]},
    }
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"data": [rec]}))
    nested = tmp_path / "nested.json"
    nested.write_text(
        json.dumps(
            {
                "data": [
                    {
                        "title": "t",
                        "paragraphs": [
                            {
                                "context": rec["context"],
                                "qas": [
                                    {"id": "q1", "question": "What?", "answers": [{"text": "C d", "answer_start": 5}]}
                                ],
                            }
                        ],
                    }
                ]
            }
        )
    )
    assert load_emrqa(flat) == load_emrqa(nested) == [EmrqaRecord("q1", "t", "A b. C d.", "What?", "C d", 5, True)]
    bad = dict(rec, answers={"text": ["x"], "answer_start": []})
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps(dict(bad, id="q2")) + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl: record q2"):
        load_emrqa(path)
    with pytest.raises(InputError, match="file not found"):
        load_emrqa(tmp_path / "missing.parquet")


def test_emrqa_prompt_example_numbers_sentences():
    rec = load_emrqa(EXAMPLES / "emrqa_sample.jsonl")[0]
    ex = emrqa_to_prompt_example(rec)
    assert ex.note_ids == [str(i) for i in range(1, len(ex.note_texts) + 1)]
    assert ex.note_texts == split_sentences(rec.context) and len(ex.note_texts) == 5
    assert ex.answer_texts == [rec.answer_text] and ex.pairs == set()
    assert ex.question == rec.question


def test_split_sentences_rule():
    text = 'Seen by Dr. Lee today. K was 3.2 (low). Given KCl, e.g. 40 mEq! Why? "Fine." Next\nline two'
    assert split_sentences(text) == [
        "Seen by Dr. Lee today.",
        "K was 3.2 (low).",
        "Given KCl, e.g. 40 mEq!",
        "Why?",
        '"Fine."',
        "Next",
        "line two",
    ]
    assert split_sentences("") == [] and split_sentences("no stop") == ["no stop"]


def test_emrqa_parquet_matches_jsonl(tmp_path):
    pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (EXAMPLES / "emrqa_sample.jsonl").read_text().splitlines()]
    path = tmp_path / "sample.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_emrqa(path, n=6, seed=4) == load_emrqa(EXAMPLES / "emrqa_sample.jsonl", n=6, seed=4)
