"""The task stage on several annotated files: loading, collisions, manifest, per-case loss masks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data.archehr import load_cases, write_cases
from plumbing.errors import InputError
from training.config import build_config, parse_overrides, read_toml
from training.batching import collate
from data.records import ESSENTIAL_LABELS, relevance_targets
from training.data import encode_items, load_task_files, split_files, task_cases, task_examples
from training.joint import LossSettings, joint_losses
from training.run import run_training

ROOT = Path(__file__).resolve().parents[1]
XML, KEY = ROOT / "examples" / "archehr-qa.xml", ROOT / "examples" / "archehr-qa_key.json"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """dev = the examples (citations + relevance); test = other case ids, answers only (no citations, no labels)."""
    root = tmp_path_factory.mktemp("multi")
    dev_xml, dev_key = root / "dev" / "dev.xml", root / "dev" / "dev_key.json"
    write_cases(load_cases(XML, KEY), dev_xml, dev_key)
    other = [replace(c, case_id=f"t{c.case_id}") for c in load_cases(XML, KEY)]
    test_xml, test_key = root / "test" / "test.xml", root / "test" / "test_key.json"
    write_cases(other, test_xml, test_key)
    key = json.loads(test_key.read_text())
    for case in key:
        del case["answers"]
        for s in case["clinician_answer_sentences"]:
            del s["citations"]
    test_key.write_text(json.dumps(key))
    return {"dev_xml": dev_xml, "dev_key": dev_key, "test_xml": test_xml, "test_key": test_key, "root": root}


def _cfg(files, out: Path, **extra):
    overrides = parse_overrides(
        [
            "--xml",
            str(files["dev_xml"]),
            "--key",
            str(files["dev_key"]),
            "--xml",
            str(files["test_xml"]),
            "--key",
            str(files["test_key"]),
        ]
    )
    return build_config(
        dict(
            stage="task",
            joint=True,
            preset="tiny",
            out=str(out),
            max_steps=2,
            batch_size=1,
            grad_accum=1,
            lr=1e-3,
            progress=False,
            plot=False,
            **overrides,
            **extra,
        )
    )


def test_loader_accepts_keys_without_citations_or_relevance(files, tmp_path):
    cases = load_cases(files["test_xml"], files["test_key"])
    assert all(c.answer_sentences and not c.gold_pairs() and not c.relevance for c in cases)
    # 'answers' listing the sentences without relevance labels: no labels either
    key = json.loads(files["test_key"].read_text())
    for case in key:
        case["answers"] = [{"sentence_id": s.sentence_id} for s in cases[0].note_sentences[:1]]
    unlabelled = tmp_path / "key.json"
    unlabelled.write_text(json.dumps(key))
    assert all(not c.relevance and c.answer_sentences for c in load_cases(files["test_xml"], unlabelled))
    # a half-labelled case is still an error
    key[0]["answers"].append({"sentence_id": "2", "relevance": "essential"})
    unlabelled.write_text(json.dumps(key))
    with pytest.raises(InputError, match="unknown relevance"):
        load_cases(files["test_xml"], unlabelled)


def test_each_file_contributes_and_is_announced(files, tmp_path):
    lines = []
    cases = task_cases(_cfg(files, tmp_path / "run"), log=lines.append)
    assert lines == ["task data: dev: 3 cases, 3 with citations, 3 with relevance; test: 3 cases, answers only"]
    assert [c.case_id for c in cases] == ["101", "102", "103", "t101", "t102", "t103"]


def test_colliding_case_ids_name_both_files(files, tmp_path):
    overrides = parse_overrides(
        ["--xml", str(files["dev_xml"]), "--key", str(files["dev_key"]), "--xml", str(XML), "--key", str(KEY)]
    )
    cfg = build_config(dict(stage="task", preset="tiny", out=str(tmp_path), **overrides))
    with pytest.raises(InputError) as err:
        load_task_files(cfg)
    message = err.value.one_line()
    assert str(KEY) in message and str(files["dev_key"]) in message and "101" in message


def test_unpaired_files_are_an_error(files, tmp_path):
    overrides = parse_overrides(
        ["--xml", str(files["dev_xml"]), "--xml", str(files["test_xml"]), "--key", str(files["dev_key"])]
    )
    with pytest.raises(InputError, match="in pairs"):
        load_task_files(build_config(dict(stage="task", preset="tiny", out=str(tmp_path), **overrides)))


def test_toml_task_data_list(files, tmp_path):
    toml = tmp_path / "task.toml"
    toml.write_text(
        'stage = "task"\n\n[[task.data]]\nxml = "%s"\nkey = "%s"\n\n[[task.data]]\nxml = "%s"\nkey = "%s"\n'
        % (files["dev_xml"], files["dev_key"], files["test_xml"], files["test_key"])
    )
    values = read_toml(toml)
    cfg = build_config(dict(out=str(tmp_path / "run"), preset="tiny"), config_file=toml)
    assert [f.name for f in load_task_files(cfg)] == ["dev", "test"]
    assert split_files(values["xml"]) == [str(files["dev_xml"]), str(files["test_xml"])]
    toml.write_text('stage = "task"\n[[task.data]]\nxml = "a.xml"\n')
    with pytest.raises(InputError, match="xml"):
        read_toml(toml)


@pytest.fixture(scope="module")
def trained(files):
    return run_training(_cfg(files, files["root"] / "run"))


def test_manifest_records_every_file_hash_and_case_ids(files, trained):
    manifest = json.loads((Path(trained.export_dir) / "manifest.json").read_text())
    data = manifest["stages"][-1]["data"]
    assert [Path(d["path"]).name for d in data] == ["dev.xml", "dev_key.json", "test.xml", "test_key.json"]
    import hashlib

    for d in data:
        assert d["sha256"] == hashlib.sha256(Path(d["path"]).read_bytes()).hexdigest()
    assert data[0]["case_ids"] == ["101", "102", "103"] and data[2]["case_ids"] == ["t101", "t102", "t103"]
    rel = manifest["relevance"]
    assert 0.0 < rel["threshold"] < 1.0 and rel["calibrated_on"] == "training cases"
    assert rel["n_examples"] == 3  # only the dev cases carry relevance labels


def test_each_loss_is_active_only_where_its_labels_exist(files, trained, qwen_tokenizer):
    cfg = _cfg(files, files["root"] / "unused")
    cases = task_cases(cfg, log=lambda _: None)
    examples, relevance = task_examples(cases, joint=True)
    items, _ = encode_items(
        qwen_tokenizer,
        examples,
        cfg.max_length,
        relevance,
        essential=[relevance_targets(c, ESSENTIAL_LABELS) for c in cases],
    )
    backbone, head = trained.backbone, trained.head
    backbone.train()
    head.train()
    head_params = [p for p in head.parameters() if p.requires_grad]
    for case, item in zip(cases, items):
        batch = collate([item], qwen_tokenizer.pad_token_id)
        parts = joint_losses(backbone, head, batch, LossSettings(), head.config.layer)
        assert parts["lm"].item() > 0, case.case_id  # every reference answer trains the LM
        labelled = not case.case_id.startswith("t")
        for name in ("align", "relevance"):
            grads = torch.autograd.grad(parts[name], head_params, allow_unused=True, retain_graph=True)
            norm = sum(float(g.abs().sum()) for g in grads if g is not None)
            if labelled:
                assert parts[name].item() > 0 and norm > 0, (case.case_id, name)
            else:
                assert parts[name].item() == 0 and norm == 0, (case.case_id, name)


def test_infer_writes_subtask2_from_the_trained_head(files, trained, tmp_path):
    """The real head path: relevance probabilities at the export's calibrated threshold, scored by score.py."""
    import infer
    from data.submission import read_submission, validate_subtask2
    from metrics.subtask2 import score_subtask2

    out = tmp_path / "infer"
    assert (
        infer.main(
            [
                str(files["dev_xml"]),
                "--out",
                str(out),
                "--export",
                str(trained.export_dir),
                "--key",
                str(files["dev_key"]),
                "--subtasks",
                "2",
                "--device",
                "cpu",
                "--no-progress",
                "--allow-train-cases",
            ]
        )
        == 0
    )  # the export's own training cases: labelled, not refused
    cases = load_cases(files["dev_xml"], files["dev_key"])
    entries = read_submission(out / "subtask2.zip", 2)
    validate_subtask2(entries, cases)
    run = json.loads((out / "run.json").read_text())
    manifest = json.loads((Path(trained.export_dir) / "manifest.json").read_text())
    assert run["subtask2"]["threshold"] == manifest["relevance"]["threshold"]
    stored = dict(run["scores"]["subtask2"])
    assert stored.pop("evaluated_on").startswith("TRAINING CASES")
    assert stored == score_subtask2(out / "subtask2.zip", files["dev_key"])
