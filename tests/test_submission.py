"""Official submission formats: round trips, zip layout, 75 words, validator rejections."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from data.archehr import load_cases
from plumbing.errors import InputError
from data.submission import (
    count_words,
    read_submission,
    subtask3_entries,
    subtask4_entries,
    truncate_words,
    validate_subtask3,
    validate_subtask4,
    write_submission,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def cases():
    return load_cases(EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json")


def gold_links(cases):
    return {c.case_id: {a.sentence_id: list(a.citations) for a in c.answer_sentences} for c in cases}


def st3_answers(cases):
    return {c.case_id: c.clinician_answer_without_citations for c in cases}


def test_entry_builders_exact_format():
    assert subtask3_entries({"121": "Text.", "5": "More."}) == [
        {"case_id": "121", "prediction": "Text."},
        {"case_id": "5", "prediction": "More."},
    ]
    assert subtask4_entries({"121": {"1": ["3", "7"], "2": []}}) == [
        {
            "case_id": "121",
            "prediction": [{"answer_id": "1", "evidence_id": ["3", "7"]}, {"answer_id": "2", "evidence_id": []}],
        }
    ]


@pytest.mark.parametrize("subtask", [3, 4])
def test_round_trip_json_and_zip(tmp_path, cases, subtask):
    entries = subtask3_entries(st3_answers(cases)) if subtask == 3 else subtask4_entries(gold_links(cases))
    json_path, zip_path = write_submission(entries, tmp_path / "out", subtask, cases)
    assert json_path == tmp_path / "out" / f"subtask{subtask}" / "submission.json"
    assert zip_path == tmp_path / "out" / f"subtask{subtask}.zip"
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == ["submission.json"]  # at the root, nothing else
        assert json.loads(zf.read("submission.json")) == entries
    assert json.loads(json_path.read_text()) == entries
    for path in (json_path, zip_path):
        back = read_submission(path, subtask)
        assert back == entries
        (validate_subtask3 if subtask == 3 else validate_subtask4)(back, cases, path)
    # No temp files left behind.
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == sorted(
        ["submission.json", f"subtask{subtask}", f"subtask{subtask}.zip"]
    )


def test_nothing_written_when_invalid(tmp_path, cases):
    entries = subtask4_entries(gold_links(cases))
    entries[0]["prediction"][0]["evidence_id"] = ["999"]
    out = tmp_path / "out"
    with pytest.raises(InputError, match="unknown evidence id '999'"):
        write_submission(entries, out, 4, cases)
    assert not out.exists()
    # An existing good submission is not damaged by a later failed write.
    good = subtask3_entries(st3_answers(cases))
    json_path, _ = write_submission(good, out, 3, cases)
    before = json_path.read_bytes()
    bad = [dict(e, prediction="") for e in good]
    with pytest.raises(InputError):
        write_submission(bad, out, 3, cases)
    assert json_path.read_bytes() == before


def test_count_and_truncate_words():
    assert count_words("  one two\nthree\tfour ") == 4
    short = "A short answer."
    assert truncate_words(short) is short
    sentences = " ".join(["One two three four five."] * 20)  # 100 words
    cut = truncate_words(sentences)
    assert count_words(cut) == 75 and cut.endswith(".")
    cut = truncate_words(" ".join(["one two three four five six seven eight."] * 10), 20)
    assert cut == " ".join(["one two three four five six seven eight."] * 2)  # 16 words, sentence boundary
    no_stop = " ".join(f"w{i}" for i in range(100))
    assert truncate_words(no_stop) == " ".join(f"w{i}" for i in range(75))
    assert truncate_words("x" * 10, 1) == "x" * 10


def test_validate_subtask3_rejections(cases):
    good = subtask3_entries(st3_answers(cases))
    validate_subtask3(good, cases)

    def reject(entries, match):
        with pytest.raises(InputError, match=match):
            validate_subtask3(entries, cases, "sub.json")

    reject(good[:2], r"sub\.json: case 103: case missing")
    reject(good + [{"case_id": "555", "prediction": "x"}], "case 555: case is not among the cases")
    reject(good + [good[0]], "case 101: case listed twice")
    reject([dict(good[0], prediction="  ")] + good[1:], "case 101: prediction is empty")
    reject([dict(good[0], prediction="word " * 76)] + good[1:], "76 words")
    reject([dict(good[0], prediction="It is in the note |3|.")] + good[1:], r"citation marker '\|3\|'")
    reject([dict(good[0], prediction="See [3, 7a] here.")] + good[1:], "citation marker")
    reject([dict(good[0], case_id=101)] + good[1:], "case_id must be a non-empty string")
    reject([dict(good[0], prediction=["x"])] + good[1:], "prediction must be a string")
    reject({"case_id": "101"}, "JSON list")


def test_validate_subtask4_rejections(cases):
    links = gold_links(cases)
    validate_subtask4(subtask4_entries(links), cases)
    empty = {cid: {aid: [] for aid in per} for cid, per in links.items()}
    validate_subtask4(subtask4_entries(empty), cases)  # [] is allowed everywhere

    def reject(mutate, match):
        entries = subtask4_entries(links)
        mutate(entries)
        with pytest.raises(InputError, match=match):
            validate_subtask4(entries, cases, "sub.json")

    reject(lambda e: e[0]["prediction"].pop(), "case 101: answer sentence '5' is not listed")
    reject(lambda e: e[0]["prediction"].append({"answer_id": "1", "evidence_id": []}), "answer_id '1' listed twice")
    reject(lambda e: e[0]["prediction"].append({"answer_id": "9", "evidence_id": []}), "unknown answer_id '9'")
    reject(lambda e: e[0]["prediction"][0]["evidence_id"].append("2"), "duplicate evidence ids")
    reject(lambda e: e[1]["prediction"][0]["evidence_id"].append(3), "evidence id 3 is not a string id")
    reject(lambda e: e[0]["prediction"][0].update(evidence_id="3"), "evidence_id must be a list")
    reject(lambda e: e.pop(), "case 103: case missing")
    reject(lambda e: e[2].update(prediction={}), "prediction must be a list")


def test_read_submission_errors(tmp_path):
    bad_zip = tmp_path / "s.zip"
    with zipfile.ZipFile(bad_zip, "w") as zf:
        zf.writestr("nested/submission.json", "[]")
    with pytest.raises(InputError, match="no submission.json at its root"):
        read_submission(bad_zip, 4)
    not_zip = tmp_path / "t.zip"
    not_zip.write_text("plain text")
    with pytest.raises(InputError, match="not a valid zip"):
        read_submission(not_zip, 4)
    wrong = tmp_path / "w.json"
    wrong.write_text(json.dumps([{"case_id": "1", "prediction": "text"}]))
    with pytest.raises(InputError, match="prediction must be a list"):
        read_submission(wrong, 4)
    assert read_submission(wrong, 3) == [{"case_id": "1", "prediction": "text"}]
    broken = tmp_path / "b.json"
    broken.write_text("[{")
    with pytest.raises(InputError, match="invalid JSON"):
        read_submission(broken, 3)
