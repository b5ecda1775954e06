"""One test per kind of malformed input: exit 2, one stderr line naming the file, no output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "fixtures" / "bad"
XML = ROOT / "examples" / "archehr-qa.xml"
KEY = ROOT / "examples" / "archehr-qa_key.json"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[int, Path]:
    """Valid Subtask 3 and 4 submissions for the bundled examples."""
    folder = tmp_path_factory.mktemp("good")
    key = json.loads(KEY.read_text())
    s3 = [{"case_id": c["case_id"], "prediction": c["clinician_answer_without_citations"]} for c in key]
    s4 = [
        {
            "case_id": c["case_id"],
            "prediction": [
                {"answer_id": a["id"], "evidence_id": a["citations"]} for a in c["clinician_answer_sentences"]
            ],
        }
        for c in key
    ]
    (folder / "s3.json").write_text(json.dumps(s3))
    (folder / "s4.json").write_text(json.dumps(s4))
    return {3: folder / "s3.json", 4: folder / "s4.json"}


def assert_refused(
    tmp_path: Path,
    bad_file: Path,
    subtask: int,
    submission: Path,
    key: Path = KEY,
    xml: Path | None = None,
    problem: str = "",
) -> str:
    out = tmp_path / "scores.json"
    args = ["--subtask", str(subtask), "--submission", str(submission), "--key", str(key), "--json", str(out)]
    if xml is not None:
        args += ["--xml", str(xml)]
    proc = subprocess.run([sys.executable, "score.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(bad_file) in lines[0]
    assert problem in lines[0]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # not even a temp file
    return lines[0]


def test_truncated_xml(tmp_path, good):
    bad = BAD / "truncated.xml"
    assert_refused(tmp_path, bad, 3, good[3], xml=bad, problem="malformed XML")


def test_sentence_without_id(tmp_path, good):
    bad = BAD / "sentence_without_id.xml"
    assert_refused(tmp_path, bad, 3, good[3], xml=bad, problem="case 1: a note sentence has no id")


def test_duplicate_sentence_ids(tmp_path, good):
    bad = BAD / "duplicate_ids.xml"
    assert_refused(tmp_path, bad, 3, good[3], xml=bad, problem="case 1: duplicate note sentence id '1'")


def test_key_case_missing_from_xml(tmp_path, good):
    bad = BAD / "key_case_not_in_xml.json"
    assert_refused(tmp_path, bad, 3, good[3], key=bad, xml=XML, problem="case 999: key case missing from the XML")


def test_answer_citing_unknown_sentence(tmp_path, good):
    bad = BAD / "key_unknown_citation.json"
    assert_refused(tmp_path, bad, 4, good[4], key=bad, problem="case 101: answer 1 cites unknown sentence '42'")


def test_empty_submission_file(tmp_path):
    bad = BAD / "empty.json"
    assert_refused(tmp_path, bad, 4, bad, problem="file is empty")


def test_empty_xml_file(tmp_path, good):
    bad = BAD / "empty.xml"
    assert_refused(tmp_path, bad, 3, good[3], xml=bad, problem="file is empty")


def test_wrong_json_types_in_submission(tmp_path):
    bad = BAD / "submission_wrong_types.json"
    assert_refused(tmp_path, bad, 4, bad, problem="case_id must be a non-empty string")


def test_submission_not_a_list(tmp_path):
    bad = BAD / "submission_not_a_list.json"
    assert_refused(tmp_path, bad, 3, bad, xml=XML, problem="must be a JSON list")


def test_wrong_json_types_in_key(tmp_path, good):
    bad = tmp_path.parent / f"{tmp_path.name}_key.json"
    bad.write_text(json.dumps([{"case_id": "101", "answers": {"1": "essential"}}]))
    assert_refused(tmp_path, bad, 4, good[4], key=bad, problem="'answers' must be a list")


def test_billion_laughs_refused(tmp_path, good):
    bad = BAD / "billion_laughs.xml"
    assert_refused(tmp_path, bad, 3, good[3], xml=bad, problem="refused unsafe XML")


def test_unknown_evidence_id_in_submission(tmp_path):
    bad = BAD / "submission_unknown_evidence.json"
    assert_refused(tmp_path, bad, 4, bad, problem="case 101: answer 1: unknown evidence id '77'")


def test_case_set_mismatch(tmp_path):
    bad = BAD / "submission_missing_case.json"
    assert_refused(tmp_path, bad, 4, bad, problem="1 of the key's 3 cases missing from the submission (103)")


def test_missing_file(tmp_path, good):
    bad = BAD / "does_not_exist.json"
    assert_refused(tmp_path, bad, 4, good[4], key=bad, problem="file not found")


def test_key_not_utf8(tmp_path, good):
    bad = tmp_path.parent / f"{tmp_path.name}_latin1.json"
    bad.write_bytes(b'[{"case_id": "\xff"}]')
    assert_refused(tmp_path, bad, 4, good[4], key=bad, problem="not UTF-8")
