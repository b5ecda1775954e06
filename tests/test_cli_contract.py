"""The house rules, for every command line at once (issue 20).

Every CLI entry point (``train.py``, ``infer.py``, ``score.py``, ``score.py cv``, ``baselines.fit`` and
the ``bench`` scripts) meets one shared table of hostile output paths (class 1) and argument errors
(class 9): exit code 2, one or two stderr lines, no traceback, nothing on stdout, nothing written
and nothing replaced. The table runs in-process through each ``main(argv)`` (a subprocess per row
would cost 2-4 s of torch start-up); the rows that need a real process (stdout closed early or
full, the ``__main__`` path of every script) run as subprocesses.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import infer
import score
import train
from baselines import fit
from bench import decode_profile, journey, multigpu, scaling
from bench import run as bench_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
XML, KEY, EMRQA = EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json", EXAMPLES / "emrqa_sample.jsonl"
OUT = "<OUT>"  # where a CLI's output path goes in its argument list


@dataclass(frozen=True)
class Cli:
    name: str
    main: Callable
    argv: tuple[str, ...]  # a valid call, with OUT where the output path goes
    output: str  # "folder" or "file"
    module: str  # how a user runs it: a script path or "-m package.module"
    bad_values: tuple[tuple[str, ...], ...] = ()  # CLI-specific argument errors (appended)


def good_submission(folder: Path) -> Path:
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
    path = folder / "sub4.json"
    path.write_text(json.dumps(s4))
    return path


SUBMISSION = "<SUBMISSION>"
CLIS = [
    Cli(
        "train.py",
        train.main,
        ("--stage", "domain", "--preset", "tiny", "--data", str(EMRQA), "--out", OUT, "--max_steps", "1"),
        "folder",
        "train.py",
        (("--lr", "nan"), ("--stage", "potato"), ("--max_steps", "x"), ("--lora_dropout", "1.5")),
    ),
    Cli(
        "infer.py",
        infer.main,
        (str(XML), "--out", OUT),
        "folder",
        "infer.py",
        (("--subtasks", "9"), ("--batch-size", "0"), ("--relevance-threshold", "nan"), ("--aligner", "potato")),
    ),
    Cli(
        "score.py",
        score.main,
        ("--subtask", "4", "--submission", SUBMISSION, "--key", str(KEY), "--json", OUT),
        "file",
        "score.py",
        (("--subtask", "9"), ("--subtask", "x")),
    ),
    Cli(
        "score.py cv",
        score.main,
        ("cv", "--xml", str(XML), "--key", str(KEY), "--out", OUT, "--systems", "bm25", "--resamples", "100"),
        "folder",
        "score.py",
        (
            ("--folds", "x"),
            ("--set", "lr=-1"),
            ("--lr", "-1"),
            ("--set", "no_such_key=1"),
            ("--set", "junk"),
            ("--systems", "potato"),
        ),
    ),
    Cli(
        "baselines.fit",
        fit.main,
        ("--xml", str(XML), "--key", str(KEY), "--out", OUT),
        "file",
        "-m baselines.fit",
        (("--epochs", "x"),),
    ),
    Cli("bench.run", bench_run.main, ("--smoke", "--out", OUT), "folder", "-m bench.run", (("--steps", "x"),)),
    Cli(
        "bench.scaling",
        scaling.main,
        ("--preset", "tiny", "--out", OUT),
        "folder",
        "-m bench.scaling",
        (("--gpus", "x"),),
    ),
    Cli(
        "bench.journey",
        journey.main,
        ("--preset", "tiny", "--tiny", "--out", OUT),
        "folder",
        "-m bench.journey",
        (("--cap-gb", "x"),),
    ),
    Cli(
        "bench.decode_profile",
        decode_profile.main,
        ("--preset", "tiny", "--out", OUT),
        "folder",
        "-m bench.decode_profile",
        (("--rows", "x"),),
    ),
    Cli("bench.multigpu", multigpu.main, ("--out", OUT), "folder", "-m bench.multigpu", (("--steps", "x"),)),
]


# --- the hostile output paths (class 1) --------------------------------------------------------
# Each makes its hostile thing inside the test's folder (devices with os.mknod: never a real /dev
# node) and returns the path given to the CLI.


def _char_device(tmp: Path) -> str:
    os.mknod(tmp / "dev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return str(tmp / "dev")


def _block_device(tmp: Path) -> str:
    os.mknod(tmp / "blk", 0o666 | stat.S_IFBLK, os.makedev(7, 250))
    return str(tmp / "blk")


def _fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "fifo")
    return str(tmp / "fifo")


def _dangling_link(tmp: Path) -> str:
    (tmp / "link").symlink_to(tmp / "gone")
    return str(tmp / "link")


def _under_dangling_link(tmp: Path) -> str:
    (tmp / "link").symlink_to(tmp / "gone")
    return str(tmp / "link" / "out")


def _link_to_device(tmp: Path) -> str:
    _char_device(tmp)
    (tmp / "devlink").symlink_to(tmp / "dev")
    return str(tmp / "devlink")


def _under_a_file(tmp: Path) -> str:
    (tmp / "file").write_text("mine")
    return str(tmp / "file" / "out")


def _deep_under_a_file(tmp: Path) -> str:
    (tmp / "file").write_text("mine")
    return str(tmp / "file" / "a" / "b" / "out")


def _wrong_kind(tmp: Path) -> str:
    """A folder where a file is written, a file where a folder is written."""
    (tmp / "thing").mkdir()
    (tmp / "thing" / "keep").write_text("mine")
    (tmp / "regular").write_text("mine")
    return str(tmp / "thing") if CURRENT_OUTPUT[0] == "file" else str(tmp / "regular")


CURRENT_OUTPUT = ["folder"]
OUT_PATHS: dict[str, Callable[[Path], str]] = {
    "character device": _char_device,
    "block device": _block_device,
    "FIFO": _fifo,
    "dangling symlink": _dangling_link,
    "under a dangling symlink": _under_dangling_link,
    "symlink to a device": _link_to_device,
    "under a regular file": _under_a_file,
    "deep under a regular file": _deep_under_a_file,
    "wrong kind": _wrong_kind,
    "under /proc": lambda tmp: "/proc/archehr-contract-test/out",
    "a /proc file": lambda tmp: "/proc/self/status",
    "under /sys": lambda tmp: "/sys/archehr-contract-test",
    "empty": lambda tmp: "",
}

# --- argument errors (class 9), for every CLI ---------------------------------------------------
ARG_ERRORS: dict[str, Callable[[list[str]], list[str]]] = {
    "unknown option": lambda argv: [*argv, "--no-such-option", "1"],
    "unknown option=value": lambda argv: [*argv, "--no-such-option=1"],
    "stray positional": lambda argv: [*argv, "stray-positional"],
    "option without its value": lambda argv: [a for a in argv if a != OUT_VALUE[0]],
}
OUT_VALUE = [""]


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry under ``folder`` -> its bytes (files) or its kind (anything else): 'nothing written,
    nothing replaced' is this staying equal."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        mode = p.lstat().st_mode
        out[str(p.relative_to(folder))] = p.read_bytes() if stat.S_ISREG(mode) else stat.S_IFMT(mode)
    return out


def follows_the_rules(capsys, cli: Cli, argv: list[str], work: Path) -> str:
    """Run ``cli`` in-process: exit 2, one or two stderr lines, no traceback, empty stdout, ``work`` unchanged."""
    before = snapshot(work)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2, (cli.name, argv, err)
    assert 1 <= len(lines) <= 2, (cli.name, argv, err)
    assert "Traceback" not in err and out == "", (cli.name, argv, out, err)
    assert snapshot(work) == before, (cli.name, argv)
    return lines[0]


def fill(cli: Cli, out_path: str, work: Path) -> list[str]:
    submission = str(good_submission(work)) if SUBMISSION in cli.argv else ""
    return [out_path if a == OUT else submission if a == SUBMISSION else a for a in cli.argv]


@pytest.fixture
def work(tmp_path, monkeypatch):
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    # The in-process CLIs must not leak settings into later tests.
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "0"))
    return folder


@pytest.mark.parametrize("cli", CLIS, ids=[c.name for c in CLIS])
@pytest.mark.parametrize("hostile", list(OUT_PATHS), ids=list(OUT_PATHS))
def test_hostile_output_path_is_refused_before_any_work(capsys, work, cli, hostile):
    CURRENT_OUTPUT[0] = cli.output
    out_path = OUT_PATHS[hostile](work)
    line = follows_the_rules(capsys, cli, fill(cli, out_path, work), work)
    assert line.startswith("error:"), line


@pytest.mark.parametrize("cli", CLIS, ids=[c.name for c in CLIS])
@pytest.mark.parametrize("mistake", list(ARG_ERRORS), ids=list(ARG_ERRORS))
def test_argument_error_is_one_line_before_anything_is_written(capsys, work, cli, mistake):
    out_path = str(work / "new-out")
    OUT_VALUE[0] = out_path
    follows_the_rules(capsys, cli, ARG_ERRORS[mistake](fill(cli, out_path, work)), work)
    assert not Path(out_path).exists()


@pytest.mark.parametrize(
    "cli,extra",
    [(c, v) for c in CLIS for v in c.bad_values],
    ids=[f"{c.name}:{' '.join(v)}" for c in CLIS for v in c.bad_values],
)
def test_bad_value_is_one_line_before_anything_is_written(capsys, work, cli, extra):
    out_path = str(work / "new-out")
    follows_the_rules(capsys, cli, [*fill(cli, out_path, work), *extra], work)
    assert not Path(out_path).exists()


@pytest.mark.parametrize(
    "cli,held",
    [
        (CLIS[0], {"notes.txt": "mine"}),  # train.py: a folder of other files (issue 23, friction 5)
        (CLIS[0], {"config.json": "{}", "export": None}),  # an earlier training run
        (CLIS[1], {"run.json": "{}"}),  # infer.py: an earlier run, no --overwrite
        (CLIS[1], {"notes.txt": "mine"}),
        (CLIS[3], {"cv.json": "{}"}),  # score.py cv: an earlier cross-validation, no --overwrite
        (CLIS[3], {"notes.txt": "mine"}),
    ],
    ids=["train-foreign", "train-earlier-run", "infer-earlier-run", "infer-foreign", "cv-earlier-run", "cv-foreign"],
)
def test_another_runs_folder_is_refused(capsys, work, cli, held):
    out = work / "taken"
    out.mkdir()
    for name, text in held.items():
        if text is None:
            (out / name).mkdir()
            (out / name / "manifest.json").write_text("{}")
        else:
            (out / name).write_text(text)
    follows_the_rules(capsys, cli, fill(cli, str(out), work), work)


# --- real processes: stdout closed early or full, every script's __main__ ------------------------


def _command(cli: Cli) -> list[str]:
    return (
        [sys.executable, *cli.module.split()]
        if cli.module.startswith("-m")
        else [sys.executable, str(ROOT / cli.module)]
    )


def _score_argv(work: Path) -> list[str]:
    return ["--subtask", "4", "--submission", str(good_submission(work)), "--key", str(KEY), "--per-case"]


def test_stdout_closed_early_ends_quietly(tmp_path):
    """``score.py ... | head -1``: the reader is gone before the results are written."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "score.py"), *_score_argv(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141  # as the shell reports a writer stopped by SIGPIPE
    assert err == "", err


def test_stdout_on_a_full_device_is_one_line(tmp_path):
    """``score.py ... > /dev/full``, on a full-device node made here (never the real /dev/full)."""
    full = tmp_path / "full"
    os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    with open(full, "w") as stdout:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "score.py"), *_score_argv(tmp_path)],
            cwd=ROOT,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "No space left" in lines[0], lines
    assert stat.S_ISCHR(full.stat().st_mode)


def _real_process_rules(cli: Cli, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out_path = _char_device(work)
    argv = fill(cli, out_path, work)
    before = snapshot(work)
    proc = subprocess.run([*_command(cli), *argv], cwd=ROOT, capture_output=True, timeout=300)
    err = proc.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and 1 <= len(lines) <= 2 and "Traceback" not in err, (cli.name, err)
    assert proc.stdout == b"" and snapshot(work) == before
    usage = subprocess.run(
        [*_command(cli), *fill(cli, str(work / "x"), work), "--no-such-option"],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    lines = [line for line in usage.stderr.decode().splitlines() if line.strip()]
    assert usage.returncode == 2 and len(lines) <= 2 and "usage:" not in usage.stderr.decode(), (cli.name, lines)


@pytest.mark.parametrize("cli", CLIS[:3], ids=[c.name for c in CLIS[:3]])
def test_every_script_follows_the_rules_as_a_process(tmp_path, cli):
    _real_process_rules(cli, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("cli", CLIS[3:], ids=[c.name for c in CLIS[3:]])
def test_every_module_follows_the_rules_as_a_process(tmp_path, cli):
    _real_process_rules(cli, tmp_path)
