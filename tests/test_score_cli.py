"""score.py end to end on the bundled examples (subprocess, as a user runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import score
from data.archehr import load_cases
from data.submission import subtask2_entries, subtask3_entries, subtask4_entries, write_submission
from metrics.alignment import SCORE_KEYS

ROOT = Path(__file__).resolve().parents[1]
XML = ROOT / "examples" / "archehr-qa.xml"
KEY = ROOT / "examples" / "archehr-qa_key.json"


def run_score(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "score.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def cases():
    return load_cases(XML, KEY)


def test_subtask4_perfect_zip(tmp_path, cases):
    links = {c.case_id: {a.sentence_id: list(a.citations) for a in c.answer_sentences} for c in cases}
    _, zip_path = write_submission(subtask4_entries(links), tmp_path, 4, cases)
    out = tmp_path / "scores.json"
    proc = run_score("--subtask", 4, "--submission", zip_path, "--key", KEY, "--json", out)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(out.read_text())
    per_case = scores.pop("per_case")  # the official scores.json keys, then our per-case values
    assert list(scores) == list(SCORE_KEYS)
    assert all(v == 100.0 for v in scores.values())
    assert set(per_case) == {c.case_id for c in cases} and all(v["f1"] == 100.0 for v in per_case.values())
    assert "micro_f1" in proc.stdout and "100.0000" in proc.stdout


def test_subtask4_hand_computed(tmp_path):
    # Gold (examples key): 101 has 7 pairs, 102 has 4, 103 has 4.
    sub = [
        {"case_id": "101", "prediction": [{"answer_id": "1", "evidence_id": ["2", "3"]}]},  # 2 tp of 2
        {"case_id": "102", "prediction": [{"answer_id": "1", "evidence_id": []}]},  # nothing
        {
            "case_id": "103",
            "prediction": [  # 1 tp of 3 (duplicate pair collapses)
                {"answer_id": "2", "evidence_id": ["3", "4"]},
                {"answer_id": "1", "evidence_id": ["1"]},
                {"answer_id": "2", "evidence_id": ["3"]},
            ],
        },
    ]
    path = tmp_path / "sub.json"
    path.write_text(json.dumps(sub))
    out = tmp_path / "scores.json"
    proc = run_score("--subtask", 4, "--submission", path, "--key", KEY, "--json", out)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(out.read_text())
    per_case = s.pop("per_case")
    assert per_case["102"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "n_predicted": 0, "n_gold": 4}
    assert per_case["101"]["precision"] == pytest.approx(100.0) and per_case["103"]["tp"] == 1
    p101, r101, p103, r103 = 1.0, 2 / 7, 1 / 3, 1 / 4
    f101, f103 = 2 * p101 * r101 / (p101 + r101), 2 * p103 * r103 / (p103 + r103)
    expected = {
        "micro_precision": 100 * 3 / 5,
        "micro_recall": 100 * 3 / 15,
        "micro_f1": 100 * 2 * 0.6 * 0.2 / 0.8,
        "macro_precision": 100 * (p101 + p103) / 3,
        "macro_recall": 100 * (r101 + r103) / 3,
        "macro_f1": 100 * (f101 + f103) / 3,
    }
    expected["overall_score"] = expected["micro_f1"]
    for k, v in expected.items():
        assert s[k] == pytest.approx(v, abs=1e-9), k
    # The in-process API gives the same numbers.
    assert score.score_subtask4(path, KEY) == s


def test_subtask3_report(tmp_path, cases):
    answers = {c.case_id: c.clinician_answer_without_citations for c in cases}
    json_path, _ = write_submission(subtask3_entries(answers), tmp_path, 3, cases)
    out = tmp_path / "scores3.json"
    proc = run_score("--subtask", 3, "--submission", json_path, "--key", KEY, "--xml", XML, "--json", out)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(out.read_text())
    assert s["bleu"] == pytest.approx(100.0) and s["rougeL"] == pytest.approx(100.0)
    assert s["alignscore"] is None and s["medcon"] is None
    assert "alignscore" in s["not_computed"] and "overall_score" not in s
    # The official overall needs all six metrics; with three computed it is named for what it is.
    assert s["overall_mean_of_computed"] == pytest.approx((s["bleu"] + s["rougeLsum"] + s["sari"]) / 3)
    assert "not computed" in proc.stdout and "mean of 3 of 6 metrics" in proc.stdout
    assert set(s["per_case"]) == {c.case_id for c in cases}
    assert all(v["bleu"] == pytest.approx(100.0) for v in s["per_case"].values())


def test_subtask3_truncates_long_predictions_like_the_official_scorer(tmp_path, cases):
    long = {c.case_id: "word " * 80 for c in cases}
    path = tmp_path / "long.json"
    path.write_text(json.dumps(subtask3_entries(long)))
    result, truncated = score.score_subtask3(path, KEY, XML)
    assert truncated == 3
    proc = run_score("--subtask", 3, "--submission", path, "--key", KEY, "--xml", XML)
    assert proc.returncode == 0 and "3 prediction(s) over 75 words were truncated" in proc.stderr
    assert "truncated" not in proc.stdout  # stdout holds only the scores


def test_main_is_callable_and_parser_is_reusable(tmp_path, cases, capsys):
    links = {c.case_id: {a.sentence_id: [] for a in c.answer_sentences} for c in cases}
    path = tmp_path / "empty_links.json"
    path.write_text(json.dumps(subtask4_entries(links)))
    assert score.main(["--subtask", "4", "--submission", str(path), "--key", str(KEY)]) == 0
    assert "micro_f1" in capsys.readouterr().out
    assert isinstance(score.build_parser(), __import__("argparse").ArgumentParser)
    with pytest.raises(SystemExit) as err:  # ST3 without --xml is a usage error
        score.main(["--subtask", "3", "--submission", str(path), "--key", str(KEY)])
    assert err.value.code == 2


def test_scores_on_stdout_notes_on_stderr(tmp_path, cases, capsys):
    path = tmp_path / "long.json"
    path.write_text(json.dumps(subtask3_entries({c.case_id: "word " * 80 for c in cases})))
    assert score.main(["--subtask", "3", "--submission", str(path), "--key", str(KEY), "--xml", str(XML)]) == 0
    captured = capsys.readouterr()
    assert "note: 3 prediction(s) over 75 words were truncated, as the official scorer does" in captured.err
    rows = captured.out.strip().splitlines()
    assert [row.split()[0] for row in rows[:3]] == ["bleu", "rouge1", "rouge2"]
    assert rows[-1].startswith("mean_of_computed = ") and "note" not in captured.out


def test_training_cases_notice_on_stderr_labelled_scores_on_stdout(tmp_path, cases, capsys):
    links = {c.case_id: {a.sentence_id: list(a.citations) for a in c.answer_sentences} for c in cases}
    _, zip_path = write_submission(subtask4_entries(links), tmp_path, 4, cases)
    (tmp_path / "run.json").write_text(json.dumps({"training_case_ids": [cases[0].case_id]}))
    argv = ["--subtask", "4", "--submission", str(zip_path), "--key", str(KEY), "--allow-train-cases"]
    assert score.main(argv) == 0
    captured = capsys.readouterr()
    assert "1 scored case(s) are cases this export trained on" in captured.err
    rows = captured.out.strip().splitlines()
    assert [row.split()[0] for row in rows] == list(SCORE_KEYS)
    assert all("TRAINING CASES" in row for row in rows)


def _other_set_submission(folder: Path, subtask: int, ids: list[str]) -> Path:
    """A submission for cases the key does not hold (a test-set run scored against the dev key)."""
    entries = {
        2: subtask2_entries({c: ["1"] for c in ids}),
        3: subtask3_entries({c: "An answer." for c in ids}),
        4: subtask4_entries({c: {"1": ["1"]} for c in ids}),
    }[subtask]
    path = folder / f"subtask{subtask}" / "submission.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize("subtask", [2, 3, 4])
@pytest.mark.parametrize("with_run_record", [True, False])
def test_submission_for_other_cases_says_the_case_sets_differ(tmp_path, cases, capsys, subtask, with_run_record):
    """A test-set submission scored against the dev key: one line with how many cases are missing
    and extra and the first few ids, exit 2; never "training cases" (the export's training cases are
    the key's, but none of them was scored)."""
    ids = [f"t{n}" for n in range(1, 8)]
    submission = _other_set_submission(tmp_path, subtask, ids)
    if with_run_record:  # the export trained on the dev key's cases
        (tmp_path / "run.json").write_text(json.dumps({"training_case_ids": [c.case_id for c in cases]}))
    argv = ["--subtask", str(subtask), "--submission", str(submission), "--key", str(KEY), "--xml", str(XML)]
    with pytest.raises(SystemExit) as err:
        score.main(argv)
    assert err.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert "training" not in line.lower()
    assert "3 of the key's 3 cases missing from the submission (101, 102, 103)" in line
    assert "7 submitted cases not in the key (t1, t2, t3, t4, t5, ...)" in line
    assert str(KEY) in line and str(submission) in line


def test_partly_overlapping_case_sets_count_both_sides(tmp_path, cases, capsys):
    ids = ["102", "x9"]
    submission = _other_set_submission(tmp_path, 4, ids)
    with pytest.raises(SystemExit) as err:
        score.main(["--subtask", "4", "--submission", str(submission), "--key", str(KEY)])
    assert err.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "2 of the key's 3 cases missing from the submission (101, 103)" in line
    assert "1 submitted case not in the key (x9)" in line
