"""Honest records: scores on an export's own training cases refused or labelled, the
extractive fallback summarised, texts the official BLEU cannot score never written,
BERTScore official only with distilbert-base-uncased, per-case tables."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import infer
from baselines.extractive import extractive_answer
from data.archehr import load_cases
from plumbing.errors import InputError
from data.records import Case
from data.submission import subtask3_entries, validate_subtask3, write_submission
from data.answers import clean_generated_answer
from metrics import bertscore
from metrics.generation import score_generation
from metrics.training_cases import TRAINING_CASES_LABEL
from model.manifest import ExportManifest

ROOT = Path(__file__).resolve().parents[1]
XML = ROOT / "examples" / "archehr-qa.xml"
KEY = ROOT / "examples" / "archehr-qa_key.json"


class ScriptedCheckpoint:
    """The LoadedExport interface with scripted answers and constant pair scores."""

    threshold = 0.5

    def __init__(self, answers: dict[str, str], manifest: ExportManifest):
        self.answers = answers
        self.manifest = manifest

    def generate_answers(self, cases, max_new_tokens=100, batch_size=8):
        return [self.answers[c.case_id] for c in cases]

    def score_pairs(self, case):
        return np.full((len(case.answer_sentences), len(case.note_sentences)), 0.6)


def make_export(tmp_path: Path, monkeypatch, trained: list[str] | None, answers: dict[str, str] | None = None):
    import model.loaded_export

    manifest = {"format": "archehr-export/1", "preset": "fake"}
    if trained is not None:
        manifest["training_case_ids"] = trained
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text(json.dumps(manifest))
    fake = ScriptedCheckpoint(
        answers or {"101": "A stent.", "102": "Rest.", "103": "Redness fades."}, ExportManifest.from_dict(manifest)
    )
    loads = []
    monkeypatch.setattr(model.loaded_export, "load_export", lambda *a, **k: loads.append(1) or fake)
    return export, loads


def run_infer(*args) -> int:
    try:
        return infer.main([*map(str, args), "--no-progress"])
    except SystemExit as err:
        return err.code


def test_infer_refuses_an_exports_training_cases_before_any_work(tmp_path, monkeypatch, capsys):
    export, loads = make_export(tmp_path, monkeypatch, trained=["102", "999"])
    out = tmp_path / "run"
    assert run_infer(XML, "--out", out, "--export", export, "--key", KEY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case 102" in err[0] and "--allow-train-cases" in err[0]
    assert not out.exists() and loads == []  # refused before the model loaded or anything was written


def test_infer_with_allow_train_cases_labels_every_score(tmp_path, monkeypatch, capsys):
    export, _ = make_export(tmp_path, monkeypatch, trained=["102"])
    out = tmp_path / "run"
    assert run_infer(XML, "--out", out, "--export", export, "--key", KEY, "--allow-train-cases") == 0
    log = capsys.readouterr().out  # the scores are results: stdout
    run = json.loads((out / "run.json").read_text())
    assert run["training_case_ids"] == ["102"]
    assert run["scores"]["evaluated_on"] == TRAINING_CASES_LABEL
    for subtask in ("subtask3", "subtask4"):
        assert run["scores"][subtask]["evaluated_on"] == TRAINING_CASES_LABEL
    score_lines = [line for line in log.splitlines() if "scores:" in line]
    assert len(score_lines) == 2 and all(TRAINING_CASES_LABEL in line for line in score_lines)

    # score.py finds the run.json beside the submission and applies the same rule.
    def score(*extra):
        return subprocess.run(
            [
                sys.executable,
                "score.py",
                "--subtask",
                "4",
                "--submission",
                str(out / "subtask4.zip"),
                "--key",
                str(KEY),
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    refused = score("--json", str(tmp_path / "s.json"))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "training cases" in refused.stderr and not (tmp_path / "s.json").exists()
    allowed = score("--allow-train-cases", "--json", str(tmp_path / "s.json"))
    assert allowed.returncode == 0, allowed.stderr
    rows = [line for line in allowed.stdout.splitlines() if line.startswith(("micro", "macro", "overall"))]
    assert len(rows) == 7 and all("TRAINING CASES" in row for row in rows)
    assert json.loads((tmp_path / "s.json").read_text())["evaluated_on"] == TRAINING_CASES_LABEL


def test_held_out_cases_are_not_labelled(tmp_path, monkeypatch, capsys):
    export, _ = make_export(tmp_path, monkeypatch, trained=["900", "901"])
    out = tmp_path / "run"
    assert run_infer(XML, "--out", out, "--export", export, "--key", KEY) == 0
    run = json.loads((out / "run.json").read_text())
    assert "evaluated_on" not in run["scores"] and "TRAINING CASES" not in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "score.py", "--subtask", "4", "--submission", str(out / "subtask4.zip"), "--key", str(KEY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "TRAINING CASES" not in proc.stdout


def test_export_without_a_record_warns(tmp_path, monkeypatch, capsys):
    export, _ = make_export(tmp_path, monkeypatch, trained=None)
    assert run_infer(XML, "--out", tmp_path / "run", "--export", export, "--key", KEY, "--subtasks", "4") == 0
    assert "does not record its training cases" in capsys.readouterr().err


@pytest.mark.parametrize("empty", [["102"], ["101", "102", "103"]])
def test_fallback_summary_ends_the_console_and_the_engine_note(tmp_path, monkeypatch, capsys, empty):
    answers = {cid: ("<skipped>" if cid in empty else "A real answer.") for cid in ("101", "102", "103")}
    export, _ = make_export(tmp_path, monkeypatch, trained=[], answers=answers)
    out = tmp_path / "run"
    assert run_infer(XML, "--out", out, "--export", export, "--subtasks", "3") == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    summary = f"{len(empty)} of 3 answers were empty and replaced by extractive answers"
    assert last.startswith(summary)
    run = json.loads((out / "run.json").read_text())
    assert summary in run["engine_note"] and run["subtask3"]["extractive_fallback_cases"] == empty
    all_replaced = len(empty) == 3
    assert ("NOT THE MODEL'S ANSWERS" in last) == all_replaced == ("NOT THE MODEL'S ANSWERS" in run["engine_note"])
    assert run["subtask3"]["model_answers"] is not all_replaced


def test_no_summary_when_nothing_fell_back(tmp_path, monkeypatch, capsys):
    export, _ = make_export(tmp_path, monkeypatch, trained=[])
    out = tmp_path / "run"
    assert run_infer(XML, "--out", out, "--export", export, "--subtasks", "3") == 0
    assert "replaced by extractive" not in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["engine_note"] == "fine-tuned export"


def test_validator_refuses_texts_without_13a_tokens(tmp_path):
    cases = load_cases(XML, KEY)
    for bad in ("<skipped>", "-\n", " <skipped> <skipped>"):
        entries = subtask3_entries({c.case_id: (bad if c.case_id == "102" else "Fine.") for c in cases})
        with pytest.raises(InputError, match="13a") as err:
            validate_subtask3(entries, cases)
        assert err.value.case_id == "102"
        with pytest.raises(InputError):
            write_submission(entries, tmp_path, 3, cases)
        assert not (tmp_path / "subtask3").exists() or not any((tmp_path / "subtask3").iterdir())
    validate_subtask3(subtask3_entries({c.case_id: "..." for c in cases}), cases)  # punctuation tokens are fine


def test_our_answers_never_lack_13a_tokens():
    assert clean_generated_answer("<skipped>") == "" and clean_generated_answer("<think>x</think><skipped>") == ""
    case = load_cases(XML, KEY)[0]
    from dataclasses import replace

    sentences = list(case.note_sentences)
    used = next(i for i, s in enumerate(sentences) if " ".join(s.text.split()) in extractive_answer(case))
    sentences[used] = replace(sentences[used], text="<skipped>")  # the sentence it would have chosen
    patched: Case = replace(case, note_sentences=sentences)
    assert "<skipped>" not in extractive_answer(patched)


# ---------------------------------------------------------------- BERTScore naming


def distilbert_folder(tmp_path: Path, official: bool) -> Path:
    folder = tmp_path / ("distilbert" if official else "minilm")
    folder.mkdir()
    cfg = (
        {
            "model_type": "distilbert",
            "vocab_size": 30522,
            "n_layers": 6,
            "dim": 768,
            "architectures": ["DistilBertForMaskedLM"],
        }
        if official
        else {"model_type": "bert", "vocab_size": 30522, "num_hidden_layers": 6, "hidden_size": 384}
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def fake_bert_score(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    calls = []

    def score(cands, refs, **kwargs):
        calls.append(kwargs)
        f1 = torch.tensor([0.5] * len(cands))
        return f1, f1, f1

    module = types.ModuleType("bert_score")
    module.__file__ = str(tmp_path / "bert_score" / "__init__.py")
    module.score = score
    monkeypatch.setitem(sys.modules, "bert_score", module)
    return calls


def test_bertscore_official_only_with_distilbert_base_uncased(tmp_path, fake_bert_score):
    preds, refs, srcs = {"a": "A stent."}, {"a": "The stent."}, {"a": "Why?"}
    official = score_generation(preds, refs, srcs, str(distilbert_folder(tmp_path, True)))
    kwargs = fake_bert_score[-1]
    assert kwargs["num_layers"] == 4 and kwargs["idf"] is False and kwargs["rescale_with_baseline"] is True
    assert kwargs["baseline_path"].endswith("rescale_baseline/en/distilbert-base-uncased.tsv")
    assert official.scores["bertscore"] == pytest.approx(50.0) and "bertscore_unofficial" not in official.scores
    assert not official.is_official_overall and "mean of 4 of 6 metrics" in official.overall_name

    other = score_generation(preds, refs, srcs, str(distilbert_folder(tmp_path, False)))
    assert other.scores["bertscore"] is None and other.scores["bertscore_unofficial"] == pytest.approx(50.0)
    assert fake_bert_score[-1]["rescale_with_baseline"] is False
    assert "NOT OFFICIAL" in other.notes["bertscore_unofficial"]
    assert "mean of 3 of 6 metrics" in other.overall_name  # an unofficial BERTScore never enters the overall
    assert other.to_json()["bertscore_unofficial"] == pytest.approx(50.0)


def test_bertscore_not_computed_reasons(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bert_score", None)  # as if not installed
    assert "--bertscore-model" in bertscore.bertscore_f1(["a"], ["b"], None).reason
    r = bertscore.bertscore_f1(["a"], ["b"], str(distilbert_folder(tmp_path, True)))
    assert r.values is None and "not installed" in r.reason
    assert "not a local model folder" in bertscore.bertscore_f1(["a"], ["b"], str(tmp_path / "nope")).reason


# ---------------------------------------------------------------- per-case table


def test_per_case_table(tmp_path):
    cases = load_cases(XML, KEY)
    path, _ = write_submission(
        subtask3_entries({c.case_id: "The stent drains the kidney." for c in cases}), tmp_path, 3, cases
    )
    proc = subprocess.run(
        [
            sys.executable,
            "score.py",
            "--subtask",
            "3",
            "--submission",
            str(path),
            "--key",
            str(KEY),
            "--xml",
            str(XML),
            "--per-case",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("case_id"))
    assert lines[header].split()[1:] == ["bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "sari"]
    assert [line.split()[0] for line in lines[header + 1 : header + 4]] == ["101", "102", "103"]
