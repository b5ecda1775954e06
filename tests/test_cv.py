"""score.py cv: case-grouped folds, thresholds from training folds only, the ladder end to end.

The end-to-end runs use the bundled invented examples (3 cases: leave-one-case-out)
with the tiny preset and one optimizer step per fold, so they test the plumbing and
the train/held-out discipline, not model quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import score
from data.archehr import load_cases
from evaluation.bootstrap import (
    alignment_from_counts,
    bootstrap_alignment,
    bootstrap_difference,
    pair_counts,
    resample_indices,
)
from evaluation.folds import (
    Fold,
    assert_chosen_on_training_cases,
    blind,
    check_folds,
    plan_folds,
    write_case_files,
)
from metrics.alignment import score_alignment
from metrics.training_cases import TRAINING_CASES_LABEL, TrainingCaseLeak

ROOT = Path(__file__).resolve().parents[1]
XML = ROOT / "examples" / "archehr-qa.xml"
KEY = ROOT / "examples" / "archehr-qa_key.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# One optimizer step of one micro-batch per fold, a few generated tokens: plumbing, not quality.
FAST = [
    "--preset",
    "tiny",
    "--set",
    "max_steps=1",
    "--set",
    "grad_accum=1",
    "--set",
    "gradient_checkpointing=false",
    "--set",
    "log_every=1",
    "--max-new-tokens",
    "4",
    "--resamples",
    "200",
    "--no-progress",
]


def cv_args(out: Path, *extra: str, xml: Path = XML, key: Path = KEY, folds: int = 3) -> list[str]:
    return ["cv", "--xml", str(xml), "--key", str(key), "--folds", str(folds), "--out", str(out), *FAST, *extra]


def run_cv_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = score.main(args)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def cases():
    return load_cases(XML, KEY)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One full ladder (all systems, head included) on the examples, leave-one-case-out."""
    out = tmp_path_factory.mktemp("cv") / "run"
    import io
    from contextlib import redirect_stderr, redirect_stdout

    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = score.main(cv_args(out))
    return out, code, stdout.getvalue() + stderr.getvalue()


# --- folds -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_cases,n_folds", [(12, 3), (12, 4), (12, 12), (7, 3), (3, 3)])
def test_folds_partition_cases(n_cases, n_folds):
    ids = [f"c{i}" for i in range(n_cases)]
    folds = plan_folds(ids, n_folds, seed=5)
    assert len(folds) == n_folds
    held = [c for f in folds for c in f.test_ids]
    assert sorted(held) == sorted(ids)  # every case held out exactly once
    for f in folds:
        assert not set(f.train_ids) & set(f.test_ids)
        assert sorted(f.train_ids + f.test_ids) == sorted(ids)
        assert f.test_ids and not f.evaluates_on_training_cases
    if n_folds == n_cases:  # leave-one-case-out
        assert all(len(f.test_ids) == 1 for f in folds)
    assert max(len(f.test_ids) for f in folds) - min(len(f.test_ids) for f in folds) <= 1


def test_fold_requests_on_training_cases_are_refused():
    ids = ["a", "b", "c"]
    with pytest.raises(TrainingCaseLeak, match="--folds 1"):
        plan_folds(ids, 1)
    with pytest.raises(TrainingCaseLeak, match="--eval-on-train"):
        plan_folds(ids, 3, eval_on_train=True)
    allowed = plan_folds(ids, 1, allow_train_cases=True)
    assert allowed == [Fold(0, ("a", "b", "c"), ("a", "b", "c"))] and allowed[0].evaluates_on_training_cases
    with pytest.raises(Exception, match="more than the 3"):
        plan_folds(ids, 4)


def test_guards_catch_leaks():
    fold = Fold(0, ("a", "b"), ("c",))
    assert_chosen_on_training_cases(["a", "b"], fold, "x")
    assert_chosen_on_training_cases([], fold, "x")
    with pytest.raises(AssertionError, match="not this fold's training cases"):
        assert_chosen_on_training_cases(["a", "c"], fold, "x")
    with pytest.raises(AssertionError, match="held-out"):
        check_folds([Fold(0, ("a", "b", "c"), ("c",)), Fold(1, ("c",), ("a", "b"))], ["a", "b", "c"])
    with pytest.raises(AssertionError, match="exactly once"):
        check_folds([Fold(0, ("b",), ("a",))], ["a", "b"])


def test_fold_files_read_back_identically(tmp_path, cases):
    write_case_files(cases[:2], tmp_path / "train.xml", tmp_path / "train_key.json")
    assert load_cases(tmp_path / "train.xml", tmp_path / "train_key.json") == cases[:2]


def test_blind_drops_every_gold_field(cases):
    b = blind(cases[0])
    assert not b.gold_pairs() and not b.relevance and not b.has_key
    assert b.clinician_answer_without_citations is None
    assert b.answer_ids == cases[0].answer_ids and b.note_ids == cases[0].note_ids


# --- bootstrap -------------------------------------------------------------------------


def test_counts_reproduce_the_official_scores_and_intervals_bracket_them():
    rng = np.random.default_rng(0)
    gold, pred = {}, {}
    for c in range(15):
        universe = [(str(a), str(n)) for a in range(4) for n in range(8)]
        gold[str(c)] = {p for p in universe if rng.random() < 0.15}
        pred[str(c)] = {p for p in universe if rng.random() < 0.2}
    gold["0"] = set()  # recall 0 for that case, as the official scorer says
    pred["1"] = set()
    ids = list(gold)
    counts = pair_counts(pred, gold, ids)
    official = score_alignment(pred, gold)
    ours = alignment_from_counts(counts)
    for k, v in ours.items():
        assert float(v) == pytest.approx(official[k], abs=1e-9), k
    ci = bootstrap_alignment(counts, resample_indices(len(ids), 500, seed=1))
    for k, (lo, hi) in ci.items():
        assert lo <= official[k] <= hi and lo < hi, k
    # Seeded: the same resamples give the same interval.
    assert ci == bootstrap_alignment(counts, resample_indices(len(ids), 500, seed=1))
    idx = resample_indices(len(ids), 500, seed=1)
    assert bootstrap_difference(counts, counts, idx) == (0.0, 0.0)
    nothing = pair_counts({c: set() for c in ids}, gold, ids)
    lo, hi = bootstrap_difference(counts, nothing, idx)
    samples = alignment_from_counts(counts[idx])["micro_f1"]  # minus zero: the system's own distribution
    assert (lo, hi) == pytest.approx(tuple(np.percentile(samples, [2.5, 97.5]))) and lo > 0


# --- the command end to end ------------------------------------------------------------


def test_cv_writes_the_ladder_report_and_plots(full_run, cases):
    out, code, console = full_run
    assert code == 0, console
    ladder = json.loads((out / "ladder.json").read_text())
    assert ladder["evaluated_on"] == "held-out cases" and ladder["n_folds"] == 3
    systems = [r["system"] for r in ladder["subtask4"]]
    assert systems == ["none", "bm25-top1", "bm25", "tfidf", "minilm", "ensemble", "head"]
    for row in ladder["subtask4"]:
        for k, v in row["scores"].items():
            lo, hi = row["ci"][k]
            assert lo - 1e-6 <= v <= hi + 1e-6, (row["system"], k)
    ens = ladder["subtask4"][5]["micro_f1_minus_ensemble"]
    assert ens == {"value": 0.0, "ci": [0.0, 0.0]}
    for row in ladder["subtask4"]:
        d = row["micro_f1_minus_ensemble"]
        assert d["ci"][0] - 1e-6 <= d["value"] <= d["ci"][1] + 1e-6
    none = ladder["subtask4"][0]["scores"]
    assert none["micro_precision"] == 0 and none["micro_recall"] == 0
    st3 = {r["system"]: r for r in ladder["subtask3"]}
    assert set(st3) == {"extractive", "model"}
    for row in st3.values():
        assert row["scores"]["sari"] is not None
        lo, hi = row["ci"]["rouge1"]
        assert lo - 1e-6 <= row["scores"]["rouge1"] <= hi + 1e-6
    st2 = ladder["subtask2"]
    assert st2["available"]
    assert [r["system"] for r in st2["rows"]] == ["question-retrieval", "head"]
    for row in st2["rows"]:
        for k in ("strict_micro_f1", "lenient_micro_f1", "strict_macro_f1", "overall_score"):
            lo, hi = row["ci"][k]
            assert lo - 1e-6 <= row["scores"][k] <= hi + 1e-6, (row["system"], k)
        sub = out / "submissions" / row["system"] / "subtask2" / "submission.json"
        assert sorted(e["case_id"] for e in json.loads(sub.read_text())) == sorted(c.case_id for c in cases)

    md = (out / "ladder.md").read_text()
    assert "HELD-OUT" in md and "INVENTED" in md and "| `head`" in md and "[" in md
    assert "fresh adapter" in md.lower() or "FRESH adapter" in md
    errors = (out / "errors.md").read_text()
    for case in cases:
        assert f"## Case {case.case_id} (held out in fold" in errors
        for a in case.answer_sentences:
            assert f"### Answer sentence {a.sentence_id} " in errors
    assert "missed" in errors or "correct" in errors
    for name in ("pr_curve.png", "f1_vs_threshold.png", "loss_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
    # One submission per system, holding every case once.
    sub = json.loads((out / "submissions" / "head" / "subtask4" / "submission.json").read_text())
    assert sorted(e["case_id"] for e in sub) == sorted(c.case_id for c in cases)


def test_cv_report_html_holds_the_ladder_plots_and_each_held_out_case(full_run, cases):
    from html_dom import Dom, check_links, check_page_is_self_contained

    out, code, console = full_run
    assert code == 0, console
    assert json.loads((out / "cv.json").read_text())["files"]["report"] == str(out / "report.html")
    page = (out / "report.html").read_text(encoding="utf-8")
    dom = Dom(page)
    check_page_is_self_contained(dom)
    # The ladder with its intervals (from ladder.md, its one source) and the notice.
    tables = " ".join(e.content for e in dom.find("table"))
    ladder = json.loads((out / "ladder.json").read_text())
    for row in ladder["subtask4"]:
        lo, hi = row["ci"]["micro_f1"]
        assert f"{row['scores']['micro_f1']:.1f} [{lo:.1f}, {hi:.1f}]" in tables, row["system"]
    assert "HELD-OUT" in page and "INVENTED" in page
    # The three plots, embedded byte for byte.
    import base64

    images = [base64.b64decode(e.attrs["src"].split(",", 1)[1]) for e in dom.find("img")]
    assert images == [(out / n).read_bytes() for n in ("pr_curve.png", "f1_vs_threshold.png", "loss_curves.png")]
    # Each held-out case: the head's pooled links, marked against the key.
    assert [s.attrs["data-case-id"] for s in dom.find("section", "case")] == [c.case_id for c in cases]
    head = {
        e["case_id"]: {p["answer_id"]: set(p["evidence_id"]) for p in e["prediction"]}
        for e in json.loads((out / "submissions" / "head" / "subtask4" / "submission.json").read_text())
    }
    links = check_links(dom)
    for case in cases:
        for a in case.answer_sentences:
            seen = links[case.case_id][a.sentence_id]
            assert seen["correct"] | seen["wrong"] == head[case.case_id][a.sentence_id]
            assert seen["correct"] | seen["missed"] == set(a.citations)
    assert dom.find(cls="pred-yes") or dom.find(cls="pred-no")
    assert all("--r:" in n.attrs.get("style", "") for n in dom.find("div", "note"))  # head relevance shades


def test_console_never_shows_note_text(full_run, cases):
    _, code, console = full_run
    assert code == 0
    assert "HELD-OUT" in console and "INVENTED" in console
    for case in cases:
        for s in case.note_sentences:
            assert s.text.strip() not in console


def test_every_threshold_comes_from_the_fold_training_cases(full_run, cases):
    out, code, _ = full_run
    assert code == 0
    all_ids = sorted(c.case_id for c in cases)
    held = []
    for k in range(3):
        fold = json.loads((out / "folds" / str(k) / "fold.json").read_text())
        test_ids, train_ids = set(fold["test_ids"]), set(fold["train_ids"])
        held += fold["test_ids"]
        assert not test_ids & train_ids and sorted(test_ids | train_ids) == all_ids
        tuned = {name: t for name, t in fold["thresholds"].items() if t["threshold"] is not None}
        # Every tuned system (head, its relevance threshold, the ensemble, the single scorers) says where
        # its threshold came from, and that is exactly the training cases.
        assert {"bm25", "tfidf", "minilm", "ensemble", "head", "head-relevance"} <= set(tuned)
        for name, t in tuned.items():
            assert set(t["chosen_on"]) == train_ids, (k, name)
        assert fold["head"]["calibration"]["calibrated_on"] == "training cases"
        # The run trained on exactly the fold's training cases.
        trained = load_cases(out / "folds" / str(k) / "train.xml", out / "folds" / str(k) / "train_key.json")
        assert {c.case_id for c in trained} == train_ids
        manifest = json.loads((Path(fold["head"]["export_dir"]) / "manifest.json").read_text())
        assert [Path(d["path"]).name for d in manifest["stages"][-1]["data"]] == ["train.xml", "train_key.json"]
    assert sorted(held) == all_ids


def test_changing_held_out_gold_changes_no_threshold(full_run, cases, tmp_path, capsys):
    """Rewrite the gold of one case: the fold that holds it out chooses exactly the same thresholds
    and predicts it exactly the same; only its score moves."""
    out, code, _ = full_run
    assert code == 0
    fold0 = json.loads((out / "folds" / "0" / "fold.json").read_text())
    target = fold0["test_ids"][0]
    key = json.loads(KEY.read_text())
    for entry in key:
        if entry["case_id"] == target:
            note_ids = [a["sentence_id"] for a in entry["answers"]]
            for s in entry["clinician_answer_sentences"]:
                s["citations"] = [n for n in note_ids if n not in s["citations"]][:1]  # wrong on purpose
            entry["answers"] = [
                {"sentence_id": n, "relevance": "essential" if i % 2 else "not-relevant"}
                for i, n in enumerate(note_ids)
            ]
    changed_key = tmp_path / "changed_key.json"
    changed_key.write_text(json.dumps(key))
    out2 = tmp_path / "run2"
    code2, _, err = run_cv_cli(cv_args(out2, key=changed_key), capsys)
    assert code2 == 0, err
    again = json.loads((out2 / "folds" / "0" / "fold.json").read_text())
    assert again["test_ids"] == fold0["test_ids"]
    assert again["thresholds"] == fold0["thresholds"]
    for system in ("ensemble", "head", "bm25"):
        before = json.loads((out / "submissions" / system / "subtask4" / "submission.json").read_text())
        after = json.loads((out2 / "submissions" / system / "subtask4" / "submission.json").read_text())
        pick = lambda entries: next(e for e in entries if e["case_id"] == target)  # noqa: E731
        assert pick(before) == pick(after), system
    l1 = json.loads((out / "ladder.json").read_text())["subtask4"]
    l2 = json.loads((out2 / "ladder.json").read_text())["subtask4"]
    assert l1[5]["scores"] != l2[5]["scores"]  # the ensemble is scored against the new gold


@pytest.mark.parametrize("extra", [["--folds", "1"], ["--eval-on-train"]])
def test_scoring_on_training_cases_is_refused(tmp_path, capsys, extra):
    out = tmp_path / "refused"
    args = cv_args(out, "--systems", "none", "bm25")
    if extra[0] == "--folds":
        args[args.index("--folds") + 1] = extra[1]
    else:
        args += extra
    code, stdout, err = run_cv_cli(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--allow-train-cases" in err
    assert not out.exists()


def test_allowed_training_cases_are_labelled_everywhere(tmp_path, capsys):
    out = tmp_path / "optimistic"
    code, stdout, err = run_cv_cli(
        cv_args(out, "--systems", "none", "bm25", "ensemble", "--allow-train-cases", folds=1), capsys
    )
    assert code == 0, err
    assert TRAINING_CASES_LABEL in stdout
    for name in ("ladder.md", "errors.md", "ladder.json", "cv.json"):
        assert TRAINING_CASES_LABEL in (out / name).read_text(encoding="utf-8"), name
    assert "HELD-OUT" not in (out / "ladder.md").read_text(encoding="utf-8")


def test_bad_requests_exit_2_before_writing(tmp_path, capsys):
    out = tmp_path / "bad"
    for args in (
        cv_args(out, folds=4),  # more folds than the 3 cases
        cv_args(out, "--set", "xml=other.xml"),
        cv_args(out, "--set", "no_such_key=1"),
        cv_args(out, "--init", str(tmp_path / "no_such_run")),
        cv_args(out, xml=tmp_path / "missing.xml"),
    ):
        code, _, err = run_cv_cli(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_leave_one_case_out_on_the_shared_fixtures(shared_fixtures, tmp_path, capsys):
    """The acceptance run, fuller: 12 cases, leave-one-case-out, a few steps per fold."""
    xml, key = shared_fixtures / "setA" / "archehr-qa.xml", shared_fixtures / "setA" / "archehr-qa_key.json"
    out = tmp_path / "loco"
    args = cv_args(out, xml=xml, key=key, folds=12)
    args[args.index("max_steps=1")] = "max_steps=4"
    code, stdout, err = run_cv_cli(args, capsys)
    assert code == 0, err
    ladder = json.loads((out / "ladder.json").read_text())
    assert ladder["n_folds"] == 12 and all(len(f["test_ids"]) == 1 for f in ladder["folds"])


def test_cv_summary_on_stdout_progress_on_stderr(tmp_path, capsys):
    code, stdout, err = run_cv_cli(cv_args(tmp_path / "cv", "--systems", "none", "bm25"), capsys)
    assert code == 0, err
    assert "keyed cases, 3 fold(s)" in err and "keyed cases" not in stdout  # progress
    assert "micro F1 [CI]" in stdout and "micro F1 [CI]" not in err  # the results
