"""infer.py end to end: the retrieval baseline, a (fake and a real tiny) checkpoint, skips, bad input."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import infer
from model.manifest import ExportManifest
from baselines.extractive import extractive_answer
from data.archehr import load_cases
from data.answers import clean_generated_answer
from data.submission import count_words, validate_subtask2, validate_subtask3, validate_subtask4

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_XML = ROOT / "examples" / "archehr-qa.xml"
EXAMPLE_KEY = ROOT / "examples" / "archehr-qa_key.json"


def run_infer(capsys, *args: str) -> tuple[dict, str]:
    assert infer.main([*map(str, args), "--no-progress"]) == 0
    captured = capsys.readouterr()
    out_dir = Path(args[args.index("--out") + 1])
    return json.loads((out_dir / "run.json").read_text()), captured.err + captured.out  # log first, then results


def check_outputs(out_dir: Path, cases, subtasks=(2, 3, 4)) -> dict[int, list]:
    entries = {}
    for n in subtasks:
        json_path = out_dir / f"subtask{n}" / "submission.json"
        with zipfile.ZipFile(out_dir / f"subtask{n}.zip") as zf:
            assert zf.namelist() == ["submission.json"]
            assert zf.read("submission.json") == json_path.read_bytes()
        entries[n] = json.loads(json_path.read_text())
    if 2 in entries:
        validate_subtask2(entries[2], cases)
    if 3 in entries:
        validate_subtask3(entries[3], cases)
    if 4 in entries:
        validate_subtask4(entries[4], [c for c in cases if c.answer_sentences])
    return entries


def drop_answer_sentences(xml_text: str, case_id: str) -> str:
    """The XML with one case's <answer_sentences> block removed (a 2025-style case)."""
    start = xml_text.index(f'<case id="{case_id}">')
    end = xml_text.index("</case>", start)
    block = re.sub(r"\s*<answer_sentences>.*?</answer_sentences>", "", xml_text[start:end], flags=re.DOTALL)
    return xml_text[:start] + block + xml_text[end:]


# ---------------------------------------------------------------- retrieval baseline


def test_importing_infer_and_its_engine_leaves_scikit_learn_unloaded():
    """scikit-learn (with the scipy and pandas it imports) costs ~1 s; infer.py with an export
    never needs it, so only the retrieval baselines import it, when they run."""
    code = (
        "import sys, infer, inference.pipeline, inference.fast, baselines.aligners, baselines.text\n"
        "print(sorted(m for m in ('sklearn', 'scipy', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_baseline_writes_valid_submissions_and_says_it_is_the_baseline(tmp_path, capsys):
    out = tmp_path / "run"
    run, log = run_infer(capsys, EXAMPLE_XML, "--out", out)
    cases = load_cases(EXAMPLE_XML)
    entries = check_outputs(out, cases)
    assert sorted(p.name for p in out.iterdir()) == [
        "report.html",
        "run.json",
        "subtask2",
        "subtask2.zip",
        "subtask3",
        "subtask3.zip",
        "subtask4",
        "subtask4.zip",
    ]
    assert run["outputs"]["report"] == str(out / "report.html")
    assert run["subtask2"]["method"].startswith("retrieval baseline") and "Subtask 2: RETRIEVAL BASELINE" in log
    assert log.splitlines()[0].startswith("engine: RETRIEVAL BASELINE")
    assert "RETRIEVAL BASELINE outputs" in log and "times:" in log
    assert run["engine"] == "retrieval-baseline" and "not the fine-tuned model" in run["engine_note"]
    assert run["export"] is None and run["export_manifest"] is None
    assert run["subtask4"]["aligner"] == "retrieval-ensemble"
    assert run["subtask4"]["ensemble"]["tuned_on"].startswith("hand-set")
    assert run["skipped_cases_subtask4"] == []
    assert {"subtask3", "subtask4", "total"} <= set(run["timings_s"])
    assert run["versions"]["rank-bm25"] and run["versions"]["python"]
    # Subtask 3 is the extractive baseline; Subtask 4 lists every answer sentence of every case.
    assert [e["prediction"] for e in entries[3]] == [extractive_answer(c) for c in cases]
    for entry, case in zip(entries[4], cases):
        assert [p["answer_id"] for p in entry["prediction"]] == case.answer_ids
    assert any(p["evidence_id"] for e in entries[4] for p in e["prediction"])
    # Note text never reaches the log.
    assert not any(s.text in log for c in cases for s in c.note_sentences)


def test_baseline_with_key_prints_and_records_scores(tmp_path, capsys, shared_fixtures):
    from metrics.subtask4 import score_subtask4

    xml, key = shared_fixtures / "setA" / "archehr-qa.xml", shared_fixtures / "setA" / "archehr-qa_key.json"
    ensemble = tmp_path / "bm25.json"
    ensemble.write_text(
        json.dumps(
            {
                "format": "archehr-retrieval-ensemble/1",
                "weights": {"bm25": 1.0},
                "threshold": 0.5,
                "mode": "relative",
                "max_per_answer": 2,
            }
        )
    )
    out = tmp_path / "run"
    run, log = run_infer(capsys, xml, "--out", out, "--key", key, "--ensemble", ensemble)
    check_outputs(out, load_cases(xml, key))
    assert run["subtask4"]["ensemble"]["weights"] == {"bm25": 1.0} and run["subtask4"]["threshold"] == 0.5
    expected = score_subtask4(out / "subtask4" / "submission.json", key)
    assert run["scores"]["subtask4"]["micro_f1"] == pytest.approx(expected["micro_f1"])
    assert f"micro_f1 {expected['micro_f1']:.2f}" in log
    assert "Subtask 3 scores:" in log and run["scores"]["subtask3"]["rouge1"] is not None


def test_answer_sentences_come_from_the_key(tmp_path, capsys):
    """An XML without <answer_sentences> gets them from --key; without the key, Subtask 4 is skipped."""
    xml = tmp_path / "no_answers.xml"
    text = EXAMPLE_XML.read_text()
    for cid in ("101", "102", "103"):
        text = drop_answer_sentences(text, cid)
    xml.write_text(text)
    run, log = run_infer(capsys, xml, "--out", tmp_path / "keyed", "--key", EXAMPLE_KEY)
    check_outputs(tmp_path / "keyed", load_cases(xml, EXAMPLE_KEY))
    assert run["skipped_cases_subtask4"] == []
    run, log = run_infer(capsys, xml, "--out", tmp_path / "unkeyed")
    assert run["skipped_cases_subtask4"] == ["101", "102", "103"]
    assert not (tmp_path / "unkeyed" / "subtask4").exists() and (tmp_path / "unkeyed" / "subtask3.zip").is_file()
    assert "Subtask 4 submission not written" in log


def test_case_without_answer_sentences_is_skipped_with_a_warning(tmp_path, capsys):
    xml = tmp_path / "mixed.xml"
    xml.write_text(drop_answer_sentences(EXAMPLE_XML.read_text(), "102"))
    out = tmp_path / "run"
    run, log = run_infer(capsys, xml, "--out", out)
    cases = load_cases(xml)
    entries = check_outputs(out, cases)
    assert "warning: case 102 has no answer sentences" in log
    assert "Subtask 4 skipped 1 case(s) without answer sentences: 102" in log
    assert run["skipped_cases_subtask4"] == ["102"] and run["subtask4"]["skipped_cases"] == ["102"]
    assert [e["case_id"] for e in entries[3]] == ["101", "102", "103"]
    assert [e["case_id"] for e in entries[4]] == ["101", "103"]


def test_subtask_3_only(tmp_path, capsys):
    out = tmp_path / "run"
    run, _ = run_infer(capsys, EXAMPLE_XML, "--out", out, "--subtasks", "3")
    check_outputs(out, load_cases(EXAMPLE_XML), subtasks=(3,))
    assert not (out / "subtask4").exists() and not (out / "subtask4.zip").exists()
    assert run["subtasks"] == [3] and "subtask4" not in run


# ---------------------------------------------------------------- bad input


def test_bad_xml_exits_2_with_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotations><case id='1'><note_excerpt_sentences>")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "infer.py", str(bad), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: malformed XML")
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "problem, args, message",
    [
        ("ensemble", ["--ensemble", "{missing}"], "ensemble file not found"),
        ("export", ["--export", "{missing}"], "export folder not found"),
        ("head", ["--aligner", "head"], "--aligner head needs --export"),
        ("key", ["--key", "{missing}"], "file not found"),
        ("not-an-export", ["--export", "{empty}"], "not an export folder (no manifest.json)"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, problem, args, message):
    out = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    args = [a.format(missing=tmp_path / "nowhere", empty=tmp_path / "empty") for a in args]
    with pytest.raises(SystemExit) as err:
        infer.main([str(EXAMPLE_XML), "--out", str(out), *args])
    assert err.value.code == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and message in stderr[0]
    assert not out.exists()


def test_checkpoint_is_a_deprecated_alias_of_export(tmp_path, capsys):
    """--checkpoint still reaches the export loader for one release, with one note on stderr."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        infer.main([str(EXAMPLE_XML), "--out", str(out), "--checkpoint", str(tmp_path / "nowhere")])
    assert err.value.code == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 2 and "--checkpoint is deprecated; use --export" in stderr[0]
    assert "export folder not found" in stderr[1] and not out.exists()
    assert infer.build_parser().parse_args([str(EXAMPLE_XML), "--out", "o", "--checkpoint", "E"]).export == Path("E")


# ---------------------------------------------------------------- export path


def test_clean_generated_answer():
    assert (
        clean_generated_answer("<think>\nhmm\n</think>\n\nIt is a stent [3]. Keep it |2,4|.")
        == "It is a stent. Keep it."
    )
    long = "First sentence here. " + " ".join(["word"] * 80)
    assert clean_generated_answer(long) == "First sentence here."
    no_stop = " ".join(["word"] * 80)
    assert count_words(clean_generated_answer(no_stop)) == 75
    assert clean_generated_answer("<think>only thinking</think> <|im_end|>") == ""
    assert clean_generated_answer("<think>unfinished thinking") == ""


class FakeCheckpoint:
    """The LoadedExport interface with scripted outputs (pipeline logic without a model)."""

    threshold = 0.6
    manifest = ExportManifest.from_dict(
        {
            "format": "archehr-export/1",
            "preset": "fake",
            "alignment": {"threshold": 0.6},
            "relevance": {"threshold": 0.55, "calibrated_on": "training cases"},
        }
    )

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.calls: list[tuple[list[str], int, int]] = []

    def generate_answers(self, cases, max_new_tokens=100, batch_size=8):
        self.calls.append(([c.case_id for c in cases], max_new_tokens, batch_size))
        return [self.answers[c.case_id] for c in cases]

    def score_relevance(self, case):
        return np.linspace(0.0, 1.0, len(case.note_sentences))

    def score_pairs(self, case):
        n_a, n_n = len(case.answer_sentences), len(case.note_sentences)
        # Row i: note i scores 0.9, note i+1 scores 0.7, note i+2 0.65, the rest 0.1; last row all 0.2/0.3.
        s = np.full((n_a, n_n), 0.1)
        for i in range(n_a - 1):
            s[i, i % n_n], s[i, (i + 1) % n_n], s[i, (i + 2) % n_n] = 0.9, 0.7, 0.65
        s[-1] = 0.2
        s[-1, 3] = 0.3
        return s


@pytest.fixture
def fake_checkpoint(monkeypatch, tmp_path):
    import model.loaded_export

    long_answer = "The stent drains the kidney [4]. " + " ".join(["more"] * 90)
    fake = FakeCheckpoint({"101": long_answer, "102": "   ", "103": "<think>x</think>Redness can last weeks."})
    monkeypatch.setattr(model.loaded_export, "load_export", lambda *a, **k: fake)
    export = tmp_path / "export"
    export.mkdir()
    return fake, export


def test_checkpoint_path_generation_and_head_linking(tmp_path, capsys, fake_checkpoint):
    fake, export = fake_checkpoint
    out = tmp_path / "run"
    run, log = run_infer(
        capsys, EXAMPLE_XML, "--out", out, "--export", export, "--batch-size", "2", "--max-new-tokens", "33"
    )
    cases = load_cases(EXAMPLE_XML)
    entries = check_outputs(out, cases)
    assert run["engine"] == "export" and run["export_manifest"] == fake.manifest.to_dict()
    assert "RETRIEVAL BASELINE" not in log
    assert fake.calls == [(["101", "102"], 33, 2), (["103"], 33, 2)]
    answers = {e["case_id"]: e["prediction"] for e in entries[3]}
    assert answers["101"] == "The stent drains the kidney."  # marker gone, cut at the sentence end
    assert answers["102"] == extractive_answer(cases[1])  # empty generation -> extractive answer
    assert answers["103"] == "Redness can last weeks."
    assert run["subtask3"]["extractive_fallback_cases"] == ["102"]
    assert "case 102: the model's answer was empty" in log
    assert run["subtask4"] == {**run["subtask4"], "aligner": "head", "threshold": 0.6, "max_per_answer": None}
    for entry, case in zip(entries[4], cases):
        # The fake scores row i: notes i, i+1, i+2 at 0.9 / 0.7 / 0.65 (>= 0.6), the rest 0.1; last row <= 0.3.
        n_a, n_n = len(case.answer_sentences), len(case.note_sentences)
        expected = [sorted({i % n_n, (i + 1) % n_n, (i + 2) % n_n}) for i in range(n_a - 1)] + [[]]
        got = [[case.note_ids.index(e) for e in p["evidence_id"]] for p in entry["prediction"]]
        assert got == expected
        assert entry["prediction"][-1]["evidence_id"] == []  # nothing passes: listed with []


def test_checkpoint_path_cap_and_fallback(tmp_path, capsys, fake_checkpoint):
    _, export = fake_checkpoint
    out = tmp_path / "run"
    run, _ = run_infer(
        capsys,
        EXAMPLE_XML,
        "--out",
        out,
        "--export",
        export,
        "--subtasks",
        "4",
        "--max-links-per-answer",
        "1",
        "--top1-fallback",
    )
    entries = check_outputs(out, load_cases(EXAMPLE_XML), subtasks=(4,))
    assert not (out / "subtask3.zip").exists()
    assert run["subtask4"]["max_per_answer"] == 1 and run["subtask4"]["top1_fallback"] is True
    for entry in entries[4]:
        *rows, last = entry["prediction"]
        assert all(len(r["evidence_id"]) == 1 for r in rows)
        assert last["evidence_id"] == ["4"]  # note index 3 (id "4") is the best of a row below threshold


# ---------------------------------------------------------------- a real tiny checkpoint


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A tiny checkpoint trained through train.py (joint task stage on the bundled example, two steps)."""
    import train

    root = tmp_path_factory.mktemp("tiny_ckpt")
    assert (
        train.main(
            [
                "--stage",
                "task",
                "--joint",
                "--preset",
                "tiny",
                "--xml",
                str(EXAMPLE_XML),
                "--key",
                str(EXAMPLE_KEY),
                "--out",
                str(root / "task"),
                "--max-steps",
                "2",
                "--max-length",
                "1024",
                "--progress",
                "false",
                "--plot",
                "false",
            ]
        )
        == 0
    )
    return root / "task" / "export"


def test_tiny_export_end_to_end(tmp_path, capsys, tiny_export):
    from model.loaded_export import load_export

    out = tmp_path / "run"
    # The tiny export trained on these very cases: scoring them needs --allow-train-cases and is labelled.
    run, log = run_infer(
        capsys,
        EXAMPLE_XML,
        "--out",
        out,
        "--export",
        tiny_export,
        "--key",
        EXAMPLE_KEY,
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
        "--allow-train-cases",
    )
    assert run["training_case_ids"] == ["101", "102", "103"] and run["scores"]["evaluated_on"].startswith("TRAINING")
    cases = load_cases(EXAMPLE_XML, EXAMPLE_KEY)
    entries = check_outputs(out, cases)
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    assert run["engine"] == "export" and run["export_manifest"] == manifest
    threshold = manifest["alignment"]["threshold"]
    assert run["subtask4"]["threshold"] == threshold
    assert "load_export" in run["timings_s"] and "Subtask 4 scores:" in log
    # where the load went, step by step (issue 22: the first load's seconds outside the timed steps)
    steps = run["memory"]["load_steps_s"]
    # on CPU the adapter stays unmerged (CUDA: base_s, dequantise_s, adapter_merge_s in its place)
    assert list(steps) == ["import_s", "start_s", "check_s", "tokenizer_s", "base_adapter_s", "head_s", "kernels_s"]
    assert all(v >= 0 for v in steps.values()) and sum(steps.values()) <= run["timings_s"]["load_export"] + 0.01
    # run.json names the decoding that ran: on CPU no CUDA graph (issue 23 found one claimed)
    engine = run["fast_inference"]["engine"]
    assert run["fast_inference"]["decode"]["cuda_graph"] is False
    assert engine == (
        "fast engine on cpu: static KV cache, greedy on device, eager decode step (no CUDA graph), "
        "matmul attention over the cache"
    ), engine
    fell_back = set(run["subtask3"]["extractive_fallback_cases"])
    for entry, case in zip(entries[3], cases):
        assert 0 < count_words(entry["prediction"]) <= 75
        assert (entry["prediction"] == extractive_answer(case)) == (case.case_id in fell_back)
    # The submission's links are exactly the head's probabilities cut at the manifest threshold.
    ckpt = load_export(tiny_export, device="cpu")
    for entry, case in zip(entries[4], cases):
        probs = ckpt.score_pairs(case)
        assert probs.shape == (len(case.answer_sentences), len(case.note_sentences))
        expected = [[case.note_ids[j] for j in range(len(row)) if row[j] >= threshold] for row in probs]
        assert [p["evidence_id"] for p in entry["prediction"]] == expected


@pytest.mark.parametrize("subtasks", ["2", "2,4", "2,3,4"])
def test_tiny_checkpoint_subtask2_batched_equals_one_case_at_a_time(
    tmp_path, capsys, tiny_export, monkeypatch, subtasks
):
    """The fast engine's packed relevance forwards (with Subtask 4, the same forwards as the
    alignment; with Subtask 3 too, the generation prefill) write the same Subtask 2 file as
    the plain checkpoint's one forward per case."""
    import inference.fast
    from data.prompts import encode_example, example_from_case
    from model.loaded_export import load_export
    from model.head_scoring import relevance_probabilities

    cases = load_cases(EXAMPLE_XML)
    ckpt = load_export(tiny_export, device="cpu")
    probs = [
        relevance_probabilities(
            ckpt.model, ckpt.head, [encode_example(ckpt.tokenizer, example_from_case(c, with_answer=False))]
        )[0]
        for c in cases
    ]
    threshold = float(np.median(np.concatenate(probs)))  # some notes in, some out
    args = [
        EXAMPLE_XML,
        "--export",
        tiny_export,
        "--subtasks",
        subtasks,
        "--device",
        "cpu",
        "--relevance-threshold",
        repr(threshold),
    ]
    fast_run, _ = run_infer(capsys, *args, "--out", tmp_path / "fast")
    load = inference.fast.load_for_inference
    monkeypatch.setattr(inference.fast, "load_for_inference", lambda *a, **k: load(*a, **{**k, "fast": False}))
    plain_run, _ = run_infer(capsys, *args, "--out", tmp_path / "plain")
    head_cases, packed = fast_run["fast_inference"]["head_cases"], fast_run["fast_inference"]["alignment"]
    if "3" in subtasks:  # one pass per case: the prefill carries the answer sentences for the head
        assert head_cases == {"prefill_shared": len(cases), "own_forwards": 0} and packed["forwards"] == 0
    else:  # one packed pass per case serves Subtasks 2 and 4
        assert head_cases == {"prefill_shared": 0, "own_forwards": len(cases)} and packed["forwards"] >= 1
    assert plain_run["fast_inference"] is None
    assert fast_run["fast_inference"]["engine"] == (
        "fast engine on cpu: static KV cache, greedy on device, eager decode step (no CUDA graph), matmul attention "
        "over the cache"
        if "3" in subtasks
        else "fast engine on cpu; no answers decoded (alignment and relevance forwards only)"
    )
    written = (tmp_path / "fast" / "subtask2" / "submission.json").read_bytes()
    assert written == (tmp_path / "plain" / "subtask2" / "submission.json").read_bytes()
    entries = check_outputs(tmp_path / "fast", cases, subtasks=(2,))[2]
    for entry, case, p in zip(entries, cases, probs):
        assert entry["prediction"] == [s for s, x in zip(case.note_ids, p) if x >= threshold]
    assert 0 < sum(len(e["prediction"]) for e in entries) < sum(len(c.note_ids) for c in cases)


def test_tiny_checkpoint_on_its_training_cases_is_refused(tmp_path, capsys, tiny_export):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        infer.main(
            [
                str(EXAMPLE_XML),
                "--out",
                str(out),
                "--export",
                str(tiny_export),
                "--key",
                str(EXAMPLE_KEY),
                "--no-progress",
            ]
        )
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "training cases" in lines[0] and "--allow-train-cases" in lines[0]
    assert not out.exists()


def test_checkpoint_subtask2_uses_the_manifest_threshold_or_the_override(tmp_path, capsys, fake_checkpoint):
    fake, export = fake_checkpoint
    cases = load_cases(EXAMPLE_XML)
    for extra, threshold in (([], 0.55), (["--relevance-threshold", "0.9"], 0.9)):
        out = tmp_path / f"run{threshold}"
        run, log = run_infer(capsys, EXAMPLE_XML, "--out", out, "--export", export, "--subtasks", "2", *extra)
        entries = check_outputs(out, cases, subtasks=(2,))
        for entry, case in zip(entries[2], cases):
            probs = fake.score_relevance(case)
            assert entry["prediction"] == [s for s, p in zip(case.note_ids, probs) if p >= threshold]
        assert run["subtask2"]["threshold"] == threshold and run["subtask2"]["method"] == "head relevance probability"
        assert "RETRIEVAL BASELINE" not in log


def test_checkpoint_without_relevance_threshold(tmp_path, capsys, fake_checkpoint):
    fake, export = fake_checkpoint
    fake.manifest = dataclasses.replace(fake.manifest, relevance=None)
    # By default Subtask 2 is skipped, said on screen and in run.json ...
    run, log = run_infer(capsys, EXAMPLE_XML, "--out", tmp_path / "default", "--export", export)
    assert not (tmp_path / "default" / "subtask2.zip").exists() and (tmp_path / "default" / "subtask4.zip").is_file()
    assert "warning: Subtask 2 not written" in log and "not_written" in run["subtask2"]
    assert run["subtasks"] == [3, 4]
    fake.calls.clear()
    # ... asked for explicitly, it is an error before any work.
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        infer.main([str(EXAMPLE_XML), "--out", str(out), "--export", str(export), "--subtasks", "2,3", "--no-progress"])
    assert err.value.code == 2
    assert "--relevance-threshold" in capsys.readouterr().err
    assert not out.exists() and fake.calls == []


# ---------------------------------------------------------------- stdout / stderr


def test_results_on_stdout_everything_else_on_stderr(tmp_path, capsys):
    out = tmp_path / "run"
    assert infer.main([str(EXAMPLE_XML), "--out", str(out), "--key", str(EXAMPLE_KEY), "--no-progress"]) == 0
    captured = capsys.readouterr()
    stdout = captured.out.strip().splitlines()
    assert all(line.startswith("wrote ") or " scores: " in line for line in stdout), stdout
    assert [line for line in stdout if line.startswith("wrote ")] == [
        *(
            f"wrote Subtask {n}: {out / f'subtask{n}' / 'submission.json'} and {out / f'subtask{n}.zip'}"
            for n in (2, 3, 4)
        ),
        f"wrote {out / 'run.json'}",
        f"wrote {out / 'report.html'}",
    ]
    assert sorted(line.split(" scores: ")[0] for line in stdout if " scores: " in line) == [
        "Subtask 2",
        "Subtask 3",
        "Subtask 4",
    ]
    assert "engine: RETRIEVAL BASELINE" in captured.err and "times: " in captured.err
    assert "wrote " not in captured.err and " scores: " not in captured.err


@pytest.mark.parametrize("flags, hidden, verbose", [([], False, False), (["--no-progress", "--verbose"], True, True)])
def test_no_progress_hides_every_bar_and_verbose_shows_library_noise(tmp_path, monkeypatch, flags, hidden, verbose):
    import inference.pipeline

    calls = []
    monkeypatch.setattr(infer, "hide_progress_bars", lambda: calls.append("hide"))
    monkeypatch.setattr(infer, "quiet_library_noise", lambda verbose: calls.append(("quiet", verbose)))
    monkeypatch.setattr(inference.pipeline, "run_inference", lambda opts: calls.append(("run", opts.progress)))
    assert infer.main([str(EXAMPLE_XML), "--out", str(tmp_path / "run"), *flags]) == 0
    # the library is told before anything loads (bitsandbytes logs at import, the model's bars at load)
    assert calls == [("quiet", verbose), *(["hide"] if hidden else []), ("run", not hidden)]


def test_hide_progress_bars_turns_off_the_model_loading_bars(monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    from plumbing.console import hide_progress_bars

    was_hidden = (not hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled())
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    hf_logging.enable_progress_bar()
    assert hf_logging.is_progress_bar_enabled()
    try:
        hide_progress_bars()
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    finally:  # leave the process as it was
        monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
        (hf_logging.disable_progress_bar if was_hidden[0] else hf_logging.enable_progress_bar)()
        (disable_progress_bars if was_hidden[1] else enable_progress_bars)()


def test_engine_used_names_graphs_attention_and_generate_fallback():
    """What FastEngine.report() says for each way decoding can go (no model needed)."""
    from types import SimpleNamespace

    from inference.fast import FastEngine
    from model.decoding import SDPA_CUDNN, DecodeStats

    engine = FastEngine(SimpleNamespace(device="cuda:0"))
    engine.decode = DecodeStats(batches=[{"rows": 2}], cuda_graph=True, attention=SDPA_CUDNN)
    assert engine.engine_used() == (
        "fast engine on cuda:0: static KV cache, greedy on device, CUDA-graphed "
        "decode step, cuDNN fused attention over the cache"
    )
    engine.decode.elementwise = "triton"  # the fused kernels ran: said too
    assert engine.engine_used().endswith("cuDNN fused attention over the cache, Triton element-wise kernels")
    engine.fallbacks = ["generation: model type 'llama' is not qwen3; using model.generate"]
    assert engine.engine_used() == "model.generate on cuda:0 (model type 'llama' is not qwen3; using model.generate)"
