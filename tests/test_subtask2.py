"""Subtask 2 (evidence identification): official scores, submission format, score.py."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from data.archehr import load_cases, load_key
from plumbing.errors import InputError
from data.submission import read_submission, subtask2_entries, validate_subtask2, write_submission
from metrics.relevance import SCORE_KEYS, RelevanceGold, gold_from_relevance, score_relevance

ROOT = Path(__file__).resolve().parents[1]
XML = ROOT / "examples" / "archehr-qa.xml"
KEY = ROOT / "examples" / "archehr-qa_key.json"


def _gold(**cases: dict[str, str]) -> dict[str, RelevanceGold]:
    return gold_from_relevance(cases)


def test_strict_and_lenient_by_hand():
    # gold: essential {1, 2}, supplementary {3}; predict {1, 3, 4}
    gold = _gold(a={"1": "essential", "2": "essential", "3": "supplementary", "4": "not-relevant"})
    s = score_relevance({"a": {"1", "3", "4"}}, gold)
    # strict: tp 1, pred 3, gold 2 -> P 1/3, R 1/2, F1 0.4
    assert s["strict_micro_precision"] == pytest.approx(100 / 3)
    assert s["strict_micro_recall"] == pytest.approx(50)
    assert s["strict_micro_f1"] == pytest.approx(40)
    # lenient: 3 dropped from the prediction -> {1, 4}: P 1/2, R 1/2, F1 1/2
    assert s["lenient_micro_precision"] == pytest.approx(50)
    assert s["lenient_micro_recall"] == pytest.approx(50)
    assert s["lenient_micro_f1"] == pytest.approx(50)
    assert s["overall_score"] == s["strict_micro_f1"]
    assert list(s) == list(SCORE_KEYS)


def test_macro_and_micro_differ_and_empty_empty_is_one():
    gold = _gold(
        a={"1": "essential", "2": "not-relevant"},
        b={"1": "supplementary", "2": "not-relevant"},  # nothing essential
        c={"1": "essential", "2": "essential"},
    )
    s = score_relevance({"a": {"1"}, "b": set(), "c": {"1", "2"}}, gold)
    # per case strict F1: a 1, b (empty/empty) 1, c 1 -> macro 100; micro tp 3 / pred 3 / gold 3
    assert s["strict_macro_f1"] == pytest.approx(100)
    assert s["strict_micro_f1"] == pytest.approx(100)
    s = score_relevance({"a": {"2"}, "b": {"1"}, "c": {"1"}}, gold)
    # strict per case: a P0 R0, b gold empty -> 0, c P1 R.5 F1 2/3
    assert s["strict_macro_precision"] == pytest.approx(100 / 3)
    assert s["strict_macro_recall"] == pytest.approx(50 / 3)
    assert s["strict_macro_f1"] == pytest.approx(100 * (2 / 3) / 3)
    # micro: tp 1, pred 3, gold 3
    assert s["strict_micro_f1"] == pytest.approx(100 / 3)
    # lenient: b's supplementary "1" dropped -> empty/empty = 1 for b
    assert s["lenient_macro_f1"] == pytest.approx(100 * (0 + 1 + 2 / 3) / 3)
    assert s["lenient_micro_precision"] == pytest.approx(50)  # tp 1 / pred 2
    # all pooled counts zero: 1.0 as well
    assert score_relevance({"b": set()}, {"b": gold["b"]})["strict_micro_f1"] == 100.0


def test_unknown_id_and_case_set_are_errors():
    gold = _gold(a={"1": "essential"})
    with pytest.raises(ValueError, match="unknown sentence id '9'"):
        score_relevance({"a": {"9"}}, gold)
    with pytest.raises(ValueError, match="case sets differ"):
        score_relevance({"a": set(), "b": set()}, gold)
    with pytest.raises(ValueError, match="case sets differ"):
        score_relevance({}, gold)


def _reference(predicted: dict[str, list[str]], key: list[dict]) -> dict[str, float]:
    """A plain re-statement of the official definition, independent of metrics.relevance."""
    out = {}
    for view in ("strict", "lenient"):
        ps, rs, fs = [], [], []
        TP = NP = NG = 0
        for case in key:
            ess = {a["sentence_id"] for a in case["answers"] if a["relevance"] == "essential"}
            sup = {a["sentence_id"] for a in case["answers"] if a["relevance"] == "supplementary"}
            pred = set(predicted[case["case_id"]])
            if view == "lenient":
                pred = {p for p in pred if p not in sup}
            tp = len(pred & ess)
            TP, NP, NG = TP + tp, NP + len(pred), NG + len(ess)
            if not pred and not ess:
                p = r = f = 1.0
            elif not pred or not ess:
                p = r = f = 0.0
            else:
                p, r = tp / len(pred), tp / len(ess)
                f = 2 * p * r / (p + r) if p + r else 0.0
            ps.append(p)
            rs.append(r)
            fs.append(f)
        if NP == 0 and NG == 0:
            mp = mr = mf = 1.0
        else:
            mp = TP / NP if NP else 0.0
            mr = TP / NG if NG else 0.0
            mf = 2 * mp * mr / (mp + mr) if mp + mr else 0.0
        n = len(key)
        out.update(
            {
                f"{view}_macro_precision": 100 * sum(ps) / n,
                f"{view}_macro_recall": 100 * sum(rs) / n,
                f"{view}_macro_f1": 100 * sum(fs) / n,
                f"{view}_micro_precision": 100 * mp,
                f"{view}_micro_recall": 100 * mr,
                f"{view}_micro_f1": 100 * mf,
            }
        )
    out["overall_score"] = out["strict_micro_f1"]
    return out


def test_random_submissions_match_an_independent_implementation(tmp_path):
    rng = random.Random(0)
    labels = ["essential", "supplementary", "not-relevant"]
    for trial in range(30):
        key = []
        for i in range(rng.randint(1, 8)):
            n = rng.randint(1, 12)
            key.append(
                {
                    "case_id": str(i),
                    "answers": [{"sentence_id": str(j), "relevance": rng.choice(labels)} for j in range(1, n + 1)],
                }
            )
        predicted = {
            c["case_id"]: rng.sample([a["sentence_id"] for a in c["answers"]], rng.randint(0, len(c["answers"])))
            for c in key
        }
        ours = score_relevance(
            {k: set(v) for k, v in predicted.items()},
            gold_from_relevance({c["case_id"]: {a["sentence_id"]: a["relevance"] for a in c["answers"]} for c in key}),
        )
        ref = _reference(predicted, key)
        assert set(ours) == set(ref)
        for k in ref:
            assert abs(ours[k] - ref[k]) <= 1e-9, (trial, k)
        if trial < 3:  # and through score.py, from files
            from metrics.subtask2 import score_subtask2

            kp, sp = tmp_path / f"key{trial}.json", tmp_path / f"sub{trial}.json"
            kp.write_text(json.dumps(key))
            sp.write_text(json.dumps(subtask2_entries(predicted)))
            cli = score_subtask2(sp, kp)
            assert all(abs(cli[k] - ref[k]) <= 1e-9 for k in ref)


def test_submission_round_trip_and_validation(tmp_path):
    cases = load_cases(XML, KEY)
    evidence = {c.case_id: [s for s, lab in c.relevance.items() if lab == "essential"] for c in cases}
    json_path, zip_path = write_submission(subtask2_entries(evidence), tmp_path, 2, cases)
    assert json_path == tmp_path / "subtask2" / "submission.json"
    assert read_submission(zip_path, 2) == json.loads(json_path.read_text())
    bad = subtask2_entries({**evidence, cases[0].case_id: ["nope"]})
    with pytest.raises(InputError, match="unknown sentence id 'nope'"):
        validate_subtask2(bad, cases)
    with pytest.raises(InputError, match="missing"):
        validate_subtask2(subtask2_entries(evidence)[1:], cases)
    with pytest.raises(InputError, match="sentence id"):
        validate_subtask2([{"case_id": cases[0].case_id, "prediction": [3]}], cases)


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "score.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_score_cli_subtask2(tmp_path):
    key = load_key(KEY)
    evidence = {cid: [s for s, lab in k.relevance.items() if lab == "essential"] for cid, k in key.items()}
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps(subtask2_entries(evidence)))
    out = tmp_path / "scores.json"
    proc = _run("--subtask", 2, "--submission", sub, "--key", KEY, "--json", out)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(out.read_text())
    assert list(scores) == list(SCORE_KEYS) and all(v == 100.0 for v in scores.values())

    first = next(iter(evidence))
    sub.write_text(json.dumps(subtask2_entries({**evidence, first: ["999"]})))
    proc = _run("--subtask", 2, "--submission", sub, "--key", KEY)
    assert proc.returncode == 2 and "999" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    sub.write_text(json.dumps(subtask2_entries(dict(list(evidence.items())[1:]))))
    proc = _run("--subtask", 2, "--submission", sub, "--key", KEY, "--json", tmp_path / "none.json")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none.json").exists()


def test_ladder_counts_reproduce_official_scores():
    import numpy as np

    from data.records import Case, NoteSentence
    from evaluation.relevance import relevance_counts, relevance_from_counts

    rng = random.Random(3)
    labels = ["essential", "supplementary", "not-relevant"]
    cases, predicted = [], {}
    for i in range(12):
        n = rng.randint(1, 7)
        notes = [NoteSentence(str(j), "x") for j in range(1, n + 1)]
        rel = {s.sentence_id: rng.choice(labels) for s in notes}
        cases.append(
            Case(case_id=str(i), patient_narrative="", clinician_question="", note_sentences=notes, relevance=rel)
        )
        predicted[str(i)] = rng.sample(list(rel), rng.randint(0, n))
    official = score_relevance(
        {k: set(v) for k, v in predicted.items()}, gold_from_relevance({c.case_id: c.relevance for c in cases})
    )
    counts = relevance_counts(predicted, cases)
    every_case_once = np.arange(len(cases))[None, :]
    from_counts = relevance_from_counts({v: c[every_case_once] for v, c in counts.items()})
    for k, v in from_counts.items():
        assert abs(float(v[0]) - official[k]) <= 1e-9, k


def test_baseline_predictions_and_threshold_fit():
    from baselines import relevance as rb
    from inference.relevance import predict_relevance

    cases = load_cases(XML, KEY)
    logs = []
    evidence, record = predict_relevance(cases, None, None, False, logs.append)
    assert "RETRIEVAL BASELINE" in logs[0] and record["threshold"] == rb.DEFAULT_THRESHOLD
    for c in cases:
        scores = rb.relevance_scores(c)
        assert 0.0 <= scores.min() and scores.max() <= 1.0  # per-case normalised components, averaged
        assert evidence[c.case_id] == [s for s, x in zip(c.note_ids, scores) if x >= 0.5]
    threshold, f1 = rb.fit_threshold(cases)
    # the chosen threshold is the best on these cases: no grid point scores higher
    official = score_relevance(
        {c.case_id: set(rb.predict_relevant(c, rb.relevance_scores(c), threshold)) for c in cases},
        gold_from_relevance({c.case_id: c.relevance for c in cases}),
    )
    assert official["strict_micro_f1"] == pytest.approx(100 * f1)
    for t in (0.1, 0.3, 0.7, 0.9):
        other = score_relevance(
            {c.case_id: set(rb.predict_relevant(c, rb.relevance_scores(c), t)) for c in cases},
            gold_from_relevance({c.case_id: c.relevance for c in cases}),
        )
        assert other["strict_micro_f1"] <= official["strict_micro_f1"] + 1e-9
