"""Issue 20 classes 7 (concurrent and repeated runs), 8 (permissions), 10 (opaque paths) and issue 23
frictions 5 and 6: each mechanism over a table of generated inputs, then the CLIs end to end.

* class 7: ``training.run_folder`` (the run lock, ``resume_config``, ``finished_export``);
* class 8: ``plumbing.atomic.fsync_tree``, which seals every folder we build aside with the umask's modes;
* class 10: ``training.config`` / ``training.data.split_files`` (NUL-separated task files) and the
  output preflight, over path names with newlines, tabs, quotes and the like.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import score
import train
from plumbing.atomic import check_file_target, check_out_folder, fsync_tree
from plumbing.errors import InputError
from training.config import TrainConfig, build_config, parse_overrides
from training.data import split_files
from training.run_folder import FREE_ON_RESUME, LOCK_FILE, RunLock, check_not_locked, resume_config

import training.run  # noqa: F401  (heavy import up front: its notices stay out of the tests' stderr)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
XML, KEY, EMRQA = EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json", EXAMPLES / "emrqa_sample.jsonl"
HOST = socket.gethostname()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_domain(out: Path, *extra: str) -> list[str]:
    return [
        "--stage",
        "domain",
        "--preset",
        "tiny",
        "--data",
        str(EMRQA),
        "--out",
        str(out),
        "--max_steps",
        "1",
        "--batch_tokens",
        "0",
        "--batch_size",
        "2",
        "--max_length",
        "512",
        "--compile",
        "false",
        "--no-progress",
        *extra,
    ]


def one_error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- class 7: the lock -------------------------------------------------------------------------

LOCKS = {  # lock content -> taken over (True) or refused (False)
    "live process here": (lambda live: f"{live}@{HOST}", False),
    "this very process": (lambda live: f"{os.getpid()}@{HOST}", False),
    "dead process here": (lambda live: f"{dead_pid()}@{HOST}", True),
    "dead process, newline": (lambda live: f"{dead_pid()}@{HOST}\n\n", True),
    "pid past the range": (lambda live: f"{2**40}@{HOST}", True),
    "another host": (lambda live: f"{live}@other-host.example", False),
    "pid 0": (lambda live: f"0@{HOST}", False),
    "negative pid": (lambda live: f"-5@{HOST}", False),
    "garbage": (lambda live: "potato", False),
    "empty": (lambda live: "", False),
    "binary": (lambda live: b"\xff\xfe\x00".decode("latin-1"), False),
}


@pytest.mark.parametrize("name", list(LOCKS))
def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, sleeper, name):
    make, taken_over = LOCKS[name]
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(make(sleeper), encoding="latin-1")
    notes: list[str] = []
    if taken_over:
        lock = RunLock(out, notes.append)
        assert len(notes) == 1 and "no longer runs" in notes[0]
        assert (out / LOCK_FILE).read_text().strip() == f"{os.getpid()}@{HOST}"
        lock.release()
        assert not (out / LOCK_FILE).exists()
    else:
        with pytest.raises(InputError, match="another training"):
            RunLock(out, notes.append)
        with pytest.raises(InputError, match="another training"):
            check_not_locked(out)
        assert notes == [] and (out / LOCK_FILE).exists()


def test_lock_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / LOCK_FILE).mkdir()
    with pytest.raises(InputError, match="another training"):
        RunLock(tmp_path, print)


def test_a_refused_run_leaves_no_folder(tmp_path):
    lock = RunLock(tmp_path / "new", print)
    lock.release()
    assert not (tmp_path / "new").exists()


# --- class 7 / friction 6: what a resume may change ---------------------------------------------


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    return f"{value}-changed"


SAVED = dataclasses.replace(TrainConfig(), stage="domain", data=str(EMRQA), out="")
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


@pytest.fixture
def saved_run(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dataclasses.replace(SAVED, out=str(run)).to_dict()))
    return run


@pytest.mark.parametrize("name", [f for f in FIELDS if f not in FREE_ON_RESUME])
def test_resume_names_every_setting_that_differs(saved_run, name):
    before = getattr(SAVED, name)
    with pytest.raises(InputError) as err:
        resume_config(str(saved_run), {name: _changed(before)}, None)
    message = err.value.one_line()
    assert f"{name} {before!r} -> {_changed(before)!r}" in message and "Drop them" in message
    assert "delete" not in message  # never advice that destroys work


def test_resume_names_all_differing_settings_at_once(saved_run):
    changed = {"lr": 1e-3, "lora_r": 32, "seed": 7}
    with pytest.raises(InputError, match=r"3 setting\(s\) differ: lr .*lora_r .*seed"):
        resume_config(str(saved_run), changed, None)


@pytest.mark.parametrize("name", [f for f in FREE_ON_RESUME if f != "out"])
def test_resume_may_change_what_does_not_change_the_weights(saved_run, name):
    value = {"progress": False, "plot": False, "log_every": 3, "save_every": 5, "keep_checkpoints": 4}[name]
    assert getattr(resume_config(str(saved_run), {name: value}, None), name) == value


def test_resume_with_the_same_values_is_fine(saved_run):
    same = {"lr": SAVED.lr, "lora_r": SAVED.lora_r, "stage": "domain"}
    cfg = resume_config(str(saved_run), same, None)
    assert cfg.out == str(saved_run) and cfg.lr == SAVED.lr


def test_resume_with_config_file_is_refused(saved_run):
    with pytest.raises(InputError, match="--config cannot be used with --resume"):
        resume_config(str(saved_run), {}, "configs/domain.toml")


# --- end to end: one tiny run (trained under a group-writable umask) -----------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("finished") / "run"
    previous = os.umask(0o002)
    try:
        assert train.main(tiny_domain(out, "--save_every", "1")) == 0
    finally:
        os.umask(previous)
    return out, 0o002


def test_every_file_of_a_run_follows_the_umask(finished_run):
    """Class 8: checkpoints and the export (safetensors included: 0600 before) follow the umask."""
    run, mask = finished_run
    wrong = []
    for path in [run, *run.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        if mode != want:
            wrong.append(f"{path.relative_to(run)} {oct(mode)}")
    assert not wrong, wrong
    assert (run / "export" / "adapter_model.safetensors").is_file()


def test_a_finished_run_is_left_alone_on_resume(finished_run, capsys):
    """Friction 6: --resume of a finished run says so and exits 0 without re-exporting."""
    run, _ = finished_run
    stamps = {p: p.stat().st_mtime_ns for p in (run / "export").iterdir()}
    capsys.readouterr()
    assert train.main(["--resume", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "has finished training" in err and out.strip() == f"export: {run / 'export'}"
    assert {p: p.stat().st_mtime_ns for p in (run / "export").iterdir()} == stamps
    assert not (run / LOCK_FILE).exists()


def test_resume_with_a_changed_setting_names_it(finished_run, capsys):
    """Class 7 / friction 6: the changed setting is named, with how to proceed; nothing changes."""
    run, _ = finished_run
    config = (run / "config.json").read_bytes()
    line = one_error_line(capsys, ["--resume", str(run), "--lr", "1e-3", "--lora_r", "8"])
    assert "lr 0.0002 -> 0.001" in line and "lora_r 16 -> 8" in line and "new --out" in line
    assert (run / "config.json").read_bytes() == config


def test_a_second_training_into_a_locked_folder_is_refused(finished_run, capsys, sleeper, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    shutil.rmtree(run / "export")  # an unfinished run, being written by another training
    (run / LOCK_FILE).write_text(f"{sleeper}@{HOST}\n")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    line = one_error_line(capsys, ["--resume", str(run)])
    assert f"process {sleeper}@{HOST}" in line and "another training" in line
    assert one_error_line(capsys, tiny_domain(run)).count("another training") == 1
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_a_stale_lock_is_taken_over_and_said(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    (out / LOCK_FILE).write_text(f"{pid}@{HOST}\n")
    capsys.readouterr()
    assert train.main(tiny_domain(out, "--plot", "false")) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of training process {pid}@{HOST}" in err
    assert (out / "export" / "manifest.json").is_file() and not (out / LOCK_FILE).exists()


def test_train_never_writes_into_a_folder_of_other_files(tmp_path, capsys):
    """Friction 5: today it wrote its run into the user's folder."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    line = one_error_line(capsys, tiny_domain(out))
    assert "not empty (holds thesis.tex)" in line
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


# --- class 8: the mechanism over umasks ---------------------------------------------------------


@pytest.mark.parametrize("mask", [0o000, 0o002, 0o007, 0o022, 0o026, 0o027, 0o033, 0o037, 0o070, 0o077, 0o277])
def test_sealing_a_built_folder_applies_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        root = tmp_path / "built"
        (root / "sub").mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(root / "w.safetensors"))  # 0600 whatever the umask
        torch.save({"x": 1}, root / "sub" / "state.pt")
        fd, _ = tempfile.mkstemp(dir=root / "sub")  # 0600
        os.close(fd)
        Path(tempfile.mkdtemp(dir=root)).joinpath("f.json").write_text("{}")  # a 0700 folder
        (root / "sub" / "config.json").write_text("{}")
        fsync_tree(root)
    finally:
        os.umask(previous)
    for path in [root, *root.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == want, (oct(mask), path.name, oct(path.stat().st_mode))


# --- class 10: paths are opaque -----------------------------------------------------------------

ODD_NAMES = [
    "new\nline",
    "tab\there",
    " leading space",
    "trailing space ",
    "unicodé ✓",
    "semi;colon",
    "quote'\"",
    "dollar$HOME",
    "star*?",
    "back\\slash",
    "-dash-first",
    "#hash",
    "carriage\rreturn",
    "%s%n",
    "{}[]",
]


@pytest.mark.parametrize("name", ODD_NAMES, ids=[repr(n) for n in ODD_NAMES])
def test_odd_path_names_are_kept_whole(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    xml_a, xml_b = str(folder / "a.xml"), str(folder / "b.xml")
    values = parse_overrides(["--xml", xml_a, "--xml", xml_b, "--key", str(folder / "k.json")])
    assert split_files(values["xml"]) == [xml_a, xml_b]
    assert split_files(values["key"]) == [str(folder / "k.json")]
    check_out_folder(folder / "out")  # valid places to write: no refusal
    check_file_target(folder / "scores.json", [], "--json")
    cfg = build_config({"stage": "task", "xml": values["xml"], "key": values["key"], "out": str(folder / "run")})
    assert split_files(json.loads(json.dumps(cfg.to_dict()))["xml"]) == [xml_a, xml_b]


def test_old_runs_with_newline_separated_files_still_read(tmp_path):
    from training.config import load_run_config

    real = tmp_path / "x\ny.xml"
    real.write_text("<x/>")
    (tmp_path / "config.json").write_text(json.dumps({"xml": "a.xml\nb.xml", "key": str(real)}))
    saved = load_run_config(tmp_path)
    assert split_files(saved["xml"]) == ["a.xml", "b.xml"] and split_files(saved["key"]) == [str(real)]


def test_score_and_train_take_a_path_with_a_newline(tmp_path, capsys):
    folder = tmp_path / "my\nfiles"
    folder.mkdir()
    for src in (XML, KEY):
        (folder / src.name).write_bytes(src.read_bytes())
    key = json.loads(KEY.read_text())
    sub = folder / "sub.json"
    sub.write_text(
        json.dumps(
            [
                {
                    "case_id": c["case_id"],
                    "prediction": [
                        {"answer_id": a["id"], "evidence_id": a["citations"]} for a in c["clinician_answer_sentences"]
                    ],
                }
                for c in key
            ]
        )
    )
    assert (
        score.main(
            [
                "--subtask",
                "4",
                "--submission",
                str(sub),
                "--key",
                str(folder / KEY.name),
                "--json",
                str(folder / "scores.json"),
            ]
        )
        == 0
    )
    assert json.loads((folder / "scores.json").read_text())["overall_score"] == 100.0
    assert (
        train.main(
            [
                "--stage",
                "task",
                "--preset",
                "tiny",
                "--xml",
                str(folder / XML.name),
                "--key",
                str(folder / KEY.name),
                "--out",
                str(folder / "run"),
                "--max_steps",
                "1",
                "--compile",
                "false",
                "--no-progress",
                "--plot",
                "false",
            ]
        )
        == 0
    )
    manifest = json.loads((folder / "run" / "export" / "manifest.json").read_text())
    assert [d["path"] for d in manifest["stages"][-1]["data"]][:1] == [str(folder / XML.name)]


# --- friction 5: a failed cross-validation leaves nothing that blocks the retry -----------------


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failed_cv_leaves_nothing_and_the_retry_runs(tmp_path, monkeypatch, capsys, failure):
    import evaluation.cv as cv

    out = tmp_path / "cv"
    argv = [
        "cv",
        "--xml",
        str(XML),
        "--key",
        str(KEY),
        "--out",
        str(out),
        "--systems",
        "bm25",
        "--folds",
        "3",
        "--resamples",
        "100",
        "--no-progress",
    ]

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(cv, "_write_reports", fail)
    with pytest.raises((RuntimeError, SystemExit)):
        score.main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial folder, no staging sibling
    monkeypatch.undo()
    assert score.main(argv) == 0
    assert (out / "cv.json").is_file() and (out / "folds" / "0" / "fold.json").is_file()
    files = json.loads((out / "cv.json").read_text())["files"]
    assert all(Path(p).parent == out for p in files.values())  # named where they are, not the staging folder
    with pytest.raises(SystemExit):  # a second run into it: refused ...
        score.main(argv)
    assert score.main([*argv, "--overwrite"]) == 0  # ... unless --overwrite


def test_readme_never_says_bare_python_before_saying_to_activate():
    """Friction 5: a recipe line said bare ``python`` where the venv is not active."""
    text = (ROOT / "README.md").read_text()
    activate = text.find("source .venv/bin/activate")
    first_bare = min(i for i in (text.find("`python "), text.find("\npython ")) if i >= 0)
    assert 0 <= activate < first_bare
