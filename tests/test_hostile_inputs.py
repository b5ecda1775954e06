"""Hostile inputs, arguments, paths and interruptions: each ends cleanly.

Every case asserts the exit code (2 bad input, 130 interrupted), one stderr line and no
traceback, and the exact set of files left behind: none, or the complete previous set.
CLIs run in-process through ``main(argv)`` where exit code and message are the point;
signals and kills need a subprocess (marked ``slow``).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import infer
import score
import train
from plumbing.atomic import OutputSet, write_json_atomic
from hooks import train_hooks
from training.checkpoints import checkpoint_dirs, latest_checkpoint

# Heavy imports up front: their one-off library notices must not land in a test's stderr.
import inference.pipeline  # noqa: F401,E402
import model.loaded_export  # noqa: F401,E402
import training.run  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
XML, KEY, EMRQA = EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json", EXAMPLES / "emrqa_sample.jsonl"
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- helpers -------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) -> its bytes."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(folder.rglob("*"))
        if not p.is_symlink()
    }


def refused(capsys, main, argv: list[str], code: int = 2, contains: str = "") -> str:
    """Run a CLI ``main`` in-process: exit ``code``, exactly one stderr line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert contains in lines[0], lines[0]
    return lines[0]


def domain_args(out: Path, *extra) -> list[str]:
    return [
        "--stage",
        "domain",
        "--preset",
        "tiny",
        "--data",
        EMRQA,
        "--out",
        out,
        "--progress",
        "false",
        "--plot",
        "false",
        *extra,
    ]


# --- 1. one validator for every TrainConfig field --------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "gpt-5"], "--preset must be one of"),
        (["--seed", "-1"], "--seed must be an integer in [0, 4294967295]"),
        (["--lora_dropout", "2"], "--lora_dropout must be a finite number in [0, 1)"),
        (["--weight_decay", "-1"], "--weight_decay must be a finite number in [0, 1]"),
        (["--warmup_ratio", "nan"], "--warmup_ratio must be a finite number"),
        (["--warmup_ratio", "1.5"], "--warmup_ratio must be a finite number in [0, 1]"),
        (["--head_layer", "99"], "--head_layer must be -1 or 0..2 for preset 'tiny'"),
        (["--n_examples", "-3"], "--n_examples must be an integer in [0, "),
        (["--unanswerable", "maybe"], "--unanswerable must be one of abstain, skip"),
        (["--lr", "inf"], "--lr must be a finite number in (0, 1000]"),
        (["--lr", "0"], "--lr must be a finite number in (0, 1000]"),
        (["--head_lr", "nan"], "--head_lr must be a finite number in (0, 1000]"),
        (["--head_lr", "-1"], "--head_lr must be a finite number in (0, 1000]"),
        (["--max_grad_norm", "-1"], "--max_grad_norm must be"),
        (["--batch_size", "0"], "--batch_size must be an integer in [1, "),
        (["--schedule", "exponential"], "--schedule must be one of cosine, linear, constant"),
        (["--pos_weight", "inf"], "--pos_weight must be a finite number in (0, "),
    ],
)
def test_train_argument_refused_before_any_output(tmp_path, capsys, extra, message):
    refused(capsys, train.main, domain_args(tmp_path / "run", *extra), contains=message)
    assert snapshot(tmp_path) == {}


def test_every_config_field_has_a_rule():
    from dataclasses import fields

    from training.config import TrainConfig
    from training.validation import RULES

    assert [f.name for f in fields(TrainConfig) if f.name not in RULES] == []
    assert set(RULES) <= {f.name for f in fields(TrainConfig)}


def test_train_toml_nan_lr_refused(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('stage = "domain"\nlr = nan\n')
    refused(capsys, train.main, ["--config", config, *domain_args(tmp_path / "run")], contains="--lr must be")
    assert snapshot(tmp_path).keys() == {"bad.toml"}


def test_train_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    refused(capsys, train.main, domain_args(tmp_path / "f"), contains="exists and is a file, not a folder")
    assert snapshot(tmp_path) == {"f": b"mine"}


def test_train_out_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    refused(capsys, train.main, domain_args(tmp_path / "f" / "run"), contains="which is not a folder")
    assert snapshot(tmp_path) == {"f": b"mine"}


def test_train_out_dangling_symlink(tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    refused(capsys, train.main, domain_args(tmp_path / "link"), contains="dangling symbolic link")
    assert not (tmp_path / "gone").exists()


@pytest.mark.skipif(AS_ROOT, reason="root may write anywhere")
def test_train_out_read_only_parent(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(capsys, train.main, domain_args(ro / "run"), contains="cannot create files in")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# --- 2. the non-finite guard --------------------------------------------------------------


def test_diverging_run_stops_names_step_keeps_checkpoint_never_exports(tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(
        capsys,
        train.main,
        domain_args(
            out,
            "--lr",
            "1e3",
            "--head_lr",
            "1e3",
            "--max_steps",
            "4",
            "--batch_tokens",
            "0",
            "--batch_size",
            "2",
            "--save_every",
            "1",
            "--max_length",
            "512",
            "--compile",
            "false",
        ),
    )
    assert re.search(r"training diverged at step \d+: non-finite", line)
    assert not (out / "export").exists()
    kept = checkpoint_dirs(out)
    assert kept and f"last good checkpoint: {kept[-1]}" in line
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert "diverged" in rows[-1]  # recorded in the run's log, not only on screen


def test_non_finite_gradient_norm_stops_training(tmp_path):
    from types import SimpleNamespace

    from training.interrupt import TrainingDiverged, check_finite

    one = SimpleNamespace(num_processes=1)
    check_finite(3, [], 1.5, one, lambda: None, tmp_path)  # finite: nothing happens
    with pytest.raises(
        TrainingDiverged,
        match=r"diverged at step 3: non-finite gradient norm \(inf\); "
        r"no checkpoint was saved; nothing exported",
    ):
        check_finite(3, [], math.inf, one, lambda: None, tmp_path)


# --- load_export: manifest, head layer, weights, base model ---------------------------------


def fake_export(root: Path, manifest: dict | None = None, head_layer: object = -1, head: dict | None = None) -> Path:
    """An export folder with the right files (weights too small to run: checks come first)."""
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(
        json.dumps(
            manifest
            if manifest is not None
            else {"preset": "tiny", "base_model": {"id": None, "path": None}, "alignment": {"threshold": 0.5}}
        )
    )
    (root / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj"]})
    )
    (root / "head_config.json").write_text(json.dumps({"hidden_size": 64, "layer": head_layer}))
    save_file({"a": torch.zeros(2)}, str(root / "adapter_model.safetensors"))
    save_file(head or {"w": torch.zeros(2)}, str(root / "head.safetensors"))
    return root


def infer_checkpoint(capsys, tmp_path, export: Path, contains: str, *extra) -> None:
    out = tmp_path / "out"
    refused(
        capsys,
        infer.main,
        [XML, "--out", out, "--export", export, "--subtasks", "3", "--no-progress", *extra],
        contains=contains,
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "alignment, message",
    [
        ({"threshold": "high"}, "field 'alignment.threshold' must be a finite number in [0, 1], got 'high'"),
        ({"threshold": float("nan")}, "field 'alignment.threshold' must be a finite number"),
        ({"threshold": 7}, "field 'alignment.threshold' must be a finite number in [0, 1]"),
    ],
)
def test_manifest_bad_threshold(tmp_path, capsys, alignment, message):
    export = fake_export(tmp_path / "exp", {"preset": "tiny", "base_model": {}, "alignment": alignment})
    infer_checkpoint(capsys, tmp_path, export, message)


def test_manifest_unknown_preset_builds_nothing(tmp_path, capsys):
    export = fake_export(tmp_path / "exp", {"preset": "llama-70b", "base_model": {}})
    infer_checkpoint(capsys, tmp_path, export, "manifest preset 'llama-70b' is unknown")


def test_head_layer_out_of_range(tmp_path, capsys):
    infer_checkpoint(capsys, tmp_path, fake_export(tmp_path / "exp", head_layer=99), "head layer must be -1 or 0..2")


def test_manifest_nested_too_deeply(tmp_path, capsys):
    export = fake_export(tmp_path / "exp")
    (export / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    infer_checkpoint(capsys, tmp_path, export, "invalid manifest.json")


def test_export_with_nan_weights(tmp_path, capsys):
    export = fake_export(tmp_path / "exp", head={"w": torch.tensor([1.0, math.nan])})
    infer_checkpoint(capsys, tmp_path, export, "non-finite values")


def test_export_with_truncated_adapter(tmp_path, capsys):
    export = fake_export(tmp_path / "exp")
    path = export / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    infer_checkpoint(capsys, tmp_path, export, "unreadable weights")


@pytest.fixture
def no_cached_weights(monkeypatch):
    """Offline, and the local Hugging Face cache lacks every model (also on a developer's machine)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)


def test_hub_base_model_offline_fails_in_seconds(tmp_path, capsys, no_cached_weights):
    export = fake_export(
        tmp_path / "exp", {"preset": "qwen3-4b", "base_model": {"id": "Qwen/Qwen3-4B"}, "alignment": {"threshold": 0.4}}
    )
    start = time.perf_counter()
    infer_checkpoint(capsys, tmp_path, export, "pass --base /local/folder")
    assert time.perf_counter() - start < 10


def test_training_hub_model_offline_fails_in_seconds(tmp_path, capsys, no_cached_weights):
    start = time.perf_counter()
    refused(
        capsys, train.main, domain_args(tmp_path / "run", "--preset", "qwen3-4b"), contains="pass --base /local/folder"
    )
    assert time.perf_counter() - start < 10
    assert snapshot(tmp_path) == {}


# --- 4. infer.py's output set: all or nothing, never mixed -----------------------------------


def infer_args(out, *extra) -> list[str]:
    return [str(a) for a in (XML, "--out", out, "--subtasks", "3", "--no-progress", *extra)]


@pytest.fixture(scope="module")
def previous_set(tmp_path_factory) -> dict[str, bytes]:
    """A complete earlier output set (Subtasks 3 and 4 from the retrieval baseline, lexical only)."""
    out = tmp_path_factory.mktemp("prev") / "out"
    ensemble = out.parent / "lexical.json"
    write_json_atomic(ensemble, {"format": "archehr-retrieval-ensemble/1", "weights": {"bm25": 1.0}})
    assert infer.main([str(XML), "--out", str(out), "--no-progress", "--ensemble", str(ensemble)]) == 0
    files = snapshot(out)
    assert {"subtask3.zip", "subtask4.zip", "run.json"} <= set(files)
    return files


def copy_set(files: dict[str, bytes], out: Path) -> None:
    for rel, data in files.items():
        p = out / rel
        if data == b"<dir>":
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)


def test_infer_out_empty_string(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, infer.main, infer_args(""), contains="--out must name a folder")
    assert snapshot(tmp_path) == {}


def test_infer_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    refused(capsys, infer.main, infer_args(tmp_path / "f"), contains="exists and is a file, not a folder")
    assert snapshot(tmp_path) == {"f": b"mine"}


def test_infer_out_dangling_symlink(tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    refused(capsys, infer.main, infer_args(tmp_path / "link"), contains="dangling symbolic link")
    assert not (tmp_path / "gone").exists()


def test_infer_out_missing_parent_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    refused(capsys, infer.main, infer_args(tmp_path / "f" / "sub" / "out"), contains="which is not a folder")
    assert snapshot(tmp_path) == {"f": b"mine"}


@pytest.mark.skipif(AS_ROOT, reason="root may write anywhere")
def test_infer_out_read_only(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(capsys, infer.main, infer_args(ro / "out"), contains="cannot create files in")
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_infer_reused_out_refused_without_overwrite(tmp_path, capsys, previous_set):
    out = tmp_path / "out"
    copy_set(previous_set, out)
    refused(capsys, infer.main, infer_args(out), contains="pass --overwrite")
    assert snapshot(out) == previous_set
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_infer_refuses_to_replace_a_folder_with_foreign_files(tmp_path, capsys, previous_set):
    out = tmp_path / "out"
    copy_set(previous_set, out)
    (out / "thesis.tex").write_text("years of work")
    before = snapshot(out)
    refused(capsys, infer.main, infer_args(out, "--overwrite"), contains="not ours (thesis.tex")
    assert snapshot(out) == before


def test_infer_overwrite_replaces_the_whole_set(tmp_path, capsys, previous_set):
    out = tmp_path / "out"
    copy_set(previous_set, out)
    assert infer.main(infer_args(out, "--overwrite")) == 0
    files = snapshot(out)
    # Subtask 3 alone now: no stale subtask4 files from the earlier run beside it
    assert set(files) == {"run.json", "report.html", "subtask3", "subtask3/submission.json", "subtask3.zip"}
    assert json.loads(files["run.json"])["subtasks"] == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_outputs_respect_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with OutputSet(tmp_path / "out") as stage:
            write_json_atomic(stage / "run.json", {"a": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "run.json").stat().st_mode & 0o777 == 0o640


def test_failed_build_leaves_previous_set(tmp_path, previous_set):
    out = tmp_path / "out"
    copy_set(previous_set, out)
    with pytest.raises(RuntimeError):
        with OutputSet(out, overwrite=True) as stage:
            write_json_atomic(stage / "run.json", {"half": True})
            raise RuntimeError("disk full")
    assert snapshot(out) == previous_set
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- 8. valid notes that look like citations --------------------------------------------------


def test_note_with_bracket_and_table_markers_is_answered(tmp_path, capsys):
    xml = tmp_path / "notes.xml"
    text = XML.read_text()
    text = re.sub(
        r'(<sentence id="\d+" paragraph_id="\d+"[^>]*>)([^<]*)</sentence>',
        lambda m: f"{m.group(1)}{m.group(2)} see ref [2] and | 3 | mg</sentence>",
        text,
    )
    xml.write_text(text)
    out = tmp_path / "out"
    assert infer.main([str(xml), "--out", str(out), "--subtasks", "3", "--no-progress"]) == 0
    answers = json.loads((out / "subtask3" / "submission.json").read_text())
    assert all("[2]" not in a["prediction"] and "| 3 |" not in a["prediction"] for a in answers)
    assert all("see ref" in a["prediction"] for a in answers)  # the note's words, minus the markers


# --- 6. hostile submissions --------------------------------------------------------------------


def good_s4(tmp_path: Path) -> bytes:
    key = json.loads(KEY.read_text())
    s4 = [
        {
            "case_id": c["case_id"],
            "prediction": [
                {"answer_id": a["id"], "evidence_id": a["citations"]} for a in c["clinician_answer_sentences"]
            ],
        }
        for c in key
    ]
    return json.dumps(s4).encode()


def score_refused(capsys, tmp_path, submission: Path, contains: str, *extra) -> None:
    before = snapshot(tmp_path)
    refused(capsys, score.main, ["--subtask", "4", "--submission", submission, "--key", KEY, *extra], contains=contains)
    assert snapshot(tmp_path) == before


def test_zip_with_two_submission_members(tmp_path, capsys):
    sub = tmp_path / "s.zip"
    with zipfile.ZipFile(sub, "w") as zf:
        zf.writestr("submission.json", good_s4(tmp_path))
        with pytest.warns(UserWarning):  # zipfile itself warns about the duplicate name
            zf.writestr("submission.json", b"[]")
    score_refused(capsys, tmp_path, sub, "2 members named submission.json")


def test_zip_bomb_ratio(tmp_path, capsys):
    sub = tmp_path / "s.zip"
    with zipfile.ZipFile(sub, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("submission.json", b" " * (8 * 2**20))
    score_refused(capsys, tmp_path, sub, "a zip bomb?")


def test_zip_member_over_size_cap(tmp_path, capsys):
    sub = tmp_path / "s.zip"
    with zipfile.ZipFile(sub, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("submission.json", b" " * (64 * 2**20 + 1))
    score_refused(capsys, tmp_path, sub, "more than 67108864")


def test_plain_submission_over_size_cap(tmp_path, capsys):
    sub = tmp_path / "s.json"
    with sub.open("wb") as fh:
        fh.truncate(64 * 2**20 + 1)  # sparse: no real disk use
    score_refused(capsys, tmp_path, sub, "not a submission")


def test_deep_json_submission(tmp_path, capsys):
    sub = tmp_path / "s.json"
    sub.write_text("[" * 100_000 + "]" * 100_000)
    score_refused(capsys, tmp_path, sub, "nested too deeply")


def test_deep_json_key(tmp_path, capsys):
    sub = tmp_path / "s.json"
    sub.write_bytes(good_s4(tmp_path))
    key = tmp_path / "key.json"
    key.write_text("[" * 100_000 + "]" * 100_000)
    before = snapshot(tmp_path)
    refused(capsys, score.main, ["--subtask", "4", "--submission", sub, "--key", key], contains="nested too deeply")
    assert snapshot(tmp_path) == before


def test_score_json_would_overwrite_submission(tmp_path, capsys):
    sub = tmp_path / "s.json"
    sub.write_bytes(good_s4(tmp_path))
    score_refused(capsys, tmp_path, sub, "would overwrite an input file", "--json", sub)


def test_score_json_is_a_folder(tmp_path, capsys):
    sub = tmp_path / "s.json"
    sub.write_bytes(good_s4(tmp_path))
    (tmp_path / "d").mkdir()
    score_refused(capsys, tmp_path, sub, "is a folder", "--json", tmp_path / "d")


def test_score_json_dangling_symlink(tmp_path, capsys):
    sub = tmp_path / "s.json"
    sub.write_bytes(good_s4(tmp_path))
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    score_refused(capsys, tmp_path, sub, "dangling symbolic link", "--json", tmp_path / "link")


# --- 5. torn checkpoints ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A tiny domain run stopped at step 2 with checkpoints step-1 and step-2."""
    out = tmp_path_factory.mktemp("torn") / "run"
    with train_hooks(stop_after_steps=2):
        assert (
            train.main(
                [
                    str(a)
                    for a in domain_args(
                        out,
                        "--max_steps",
                        "4",
                        "--save_every",
                        "1",
                        "--batch_tokens",
                        "0",
                        "--batch_size",
                        "2",
                        "--max_length",
                        "512",
                        "--compile",
                        "false",
                    )
                ]
            )
            == 0
        )
    assert [d.name for d in checkpoint_dirs(out)] == ["step-1", "step-2"]
    return out


def torn_copy(run: Path, tmp_path: Path, tear) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    tear(copy / "checkpoints" / "step-2")
    return copy


def test_truncated_adapter_falls_back_to_previous_checkpoint(tmp_path, capsys, stopped_run):
    def tear(ckpt):
        p = ckpt / "adapter" / "adapter_model.safetensors"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    run = torn_copy(stopped_run, tmp_path, tear)
    assert latest_checkpoint(run).name == "step-1"
    assert "warning: skipping checkpoint" in capsys.readouterr().err


def test_resume_after_torn_checkpoint_continues_from_the_previous_one(tmp_path, capsys, stopped_run):
    run = torn_copy(stopped_run, tmp_path, lambda ckpt: (ckpt / "optimizer.pt").write_bytes(b""))
    assert train.main(["--resume", str(run)]) == 0
    assert "warning: skipping checkpoint" in capsys.readouterr().err
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert {"step": 1, "resumed_from": "step-1", "skipped_torn": ["step-2"]} in rows  # recorded, not only said
    assert (run / "export" / "manifest.json").is_file()


def test_empty_optimizer_falls_back_to_previous_checkpoint(tmp_path, capsys, stopped_run):
    run = torn_copy(stopped_run, tmp_path, lambda ckpt: (ckpt / "optimizer.pt").write_bytes(b""))
    assert latest_checkpoint(run).name == "step-1"
    assert "optimizer.pt is missing, empty or truncated" in capsys.readouterr().err


def test_no_complete_checkpoint_refused(tmp_path, capsys, stopped_run):
    run = torn_copy(stopped_run, tmp_path, lambda ckpt: (ckpt / "optimizer.pt").write_bytes(b""))
    (run / "checkpoints" / "step-1" / "scheduler.pt").write_bytes(b"")
    before = snapshot(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", str(run)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no checkpoint to resume from" in errors[0] and "Traceback" not in err
    assert snapshot(run) == before


def test_unreadable_checkpoint_content_refused(tmp_path, capsys, stopped_run):
    def tear(ckpt):  # a whole zip, so it passes the completeness check, but no torch payload
        (ckpt / "optimizer.pt").unlink()
        with zipfile.ZipFile(ckpt / "optimizer.pt", "w") as zf:
            zf.writestr("junk", b"not a state dict")

    run = torn_copy(stopped_run, tmp_path, tear)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", str(run)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint is unreadable" in errors[0] and "step-2" in errors[0], err
    assert "Traceback" not in err
    assert not (run / "export").exists()


def test_corrupt_run_config_refused(tmp_path, capsys, stopped_run):
    run = torn_copy(stopped_run, tmp_path, lambda ckpt: None)
    (run / "config.json").write_text("{" * 50_000)
    refused(capsys, train.main, ["--resume", run], contains="config.json")


# --- 3. signals: subprocesses ------------------------------------------------------------------


def start(args: list, env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, *[str(a) for a in args]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def task_args(tmp_path: Path, out: Path) -> list:
    return [
        "train.py",
        "--stage",
        "task",
        "--joint",
        "--preset",
        "tiny",
        "--xml",
        tmp_path / "c.xml",
        "--key",
        tmp_path / "k.json",
        "--out",
        out,
        "--batch_size",
        "2",
        "--batch_tokens",
        "0",
        "--grad_accum",
        "1",
        "--epochs",
        "5",
        "--lr",
        "1e-3",
        "--head_lr",
        "3e-3",
        "--lora_dropout",
        "0.1",
        "--head_dropout",
        "0.1",
        "--log_every",
        "1",
        "--progress",
        "false",
        "--plot",
        "false",
        "--gradient_checkpointing",
        "false",
        "--compile",
        "false",
        "--save_every",
        "0",
    ]


def export_weights(export_dir: Path) -> dict[str, torch.Tensor]:
    out = {f"adapter/{k}": v for k, v in load_file(str(export_dir / "adapter_model.safetensors")).items()}
    out.update({f"head/{k}": v for k, v in load_file(str(export_dir / "head.safetensors")).items()})
    return out


@pytest.mark.parametrize(
    "sig, resume",
    [
        (signal.SIGINT, False),  # ~7 s: the message, exit 130 and the checkpoint
        pytest.param(signal.SIGTERM, True, marks=pytest.mark.slow),  # ~25 s: and the bit-identical resume
    ],
)
def test_signal_mid_training_checkpoints_and_resumes_bit_identical(tmp_path, sig, resume):
    from synthetic import make_cases, write_archehr

    write_archehr(make_cases(6, seed=3), tmp_path / "c.xml", tmp_path / "k.json")
    part = tmp_path / "part"
    proc = start(task_args(tmp_path, part))
    log = part / "log.jsonl"
    wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    match = re.search(r"^interrupted at step (\d+); resume with: python train.py --resume (\S+)$", err, re.M)
    assert match and Path(match.group(2)) == part, err[-3000:]
    assert "Traceback" not in err
    step = int(match.group(1))
    assert [d.name for d in checkpoint_dirs(part)] == [f"step-{step}"]
    assert not (part / "export").exists()
    total = 3 * 5  # 6 cases / batch 2 = 3 steps per epoch
    assert 0 < step < total
    if not resume:
        return  # both signals take the same path from here; one bit-identity check is enough

    resumed = start(["train.py", "--resume", part])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    full = start(task_args(tmp_path, tmp_path / "full"))
    _, err = full.communicate(timeout=600)
    assert full.returncode == 0, err[-3000:]
    expected, got = export_weights(tmp_path / "full" / "export"), export_weights(part / "export")
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_infer_killed_while_writing_leaves_the_previous_set(tmp_path, previous_set, how):
    out = tmp_path / "out"
    copy_set(previous_set, out)
    marker = tmp_path / "paused"
    proc = start(["infer.py", *infer_args(out, "--overwrite")], {"ARCHEHR_TEST_PAUSE_BEFORE_COMMIT": str(marker)})
    wait_for(marker.exists, proc)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    assert snapshot(out) == previous_set  # the untouched old set, nothing mixed in
    if how == "SIGTERM":
        assert proc.returncode == 130
        assert err.strip().splitlines()[-1] == "interrupted: no half-written file was left"
        assert "Traceback" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "paused"]  # staging removed
    # And a run that is not interrupted puts the complete new set in place.
    proc = start(["infer.py", *infer_args(out, "--overwrite")])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert set(snapshot(out)) == {"run.json", "report.html", "subtask3", "subtask3/submission.json", "subtask3.zip"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "paused"]  # the killed run's staging cleared
