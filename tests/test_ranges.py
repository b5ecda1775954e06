"""Issue 20, class 3: every number a user gives has a range, said in --help, checked before work.

One factory (``plumbing/ranges.py``) makes the argparse types of infer.py / score.py and the numeric
rules of ``training/validation.py``; these tests run the factory over generated text and every
CLI's numeric options and config fields over generated out-of-range values (each refused with
exit 2, one line, nothing written), plus the trainer state a resume reads, a key's relevance
labels and a config file's encoding.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import infer
import score
import train
from data.archehr import load_key
from plumbing.errors import InputError
from plumbing.ranges import Range, integer, number
from data.records import RELEVANCE_LABELS
from training.checkpoints import STATE_FILE, latest_checkpoint, state_problem
from training.config import TrainConfig, read_toml
from training.validation import RULES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EMRQA, KEY = EXAMPLES / "emrqa_sample.jsonl", EXAMPLES / "archehr-qa_key.json"

RANGES = [
    integer(0, 10),
    integer(1, 8192),
    integer(-1, 5),
    integer(),
    number(0, 1),
    number(0, 1, hi_open=True),
    number(0, 4096, lo_open=True),
    number(),
    number(-3.5, 2.25),
]


def refused(capsys, main, argv, contains: str = "") -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert contains in err, err
    return err


# --- the factory --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    r=st.sampled_from(RANGES),
    text=st.one_of(
        st.text(max_size=12),
        st.integers().map(str),
        st.floats().map(repr),
        st.sampled_from(
            [
                "1e9",
                "1e309",
                "-1e309",
                "nan",
                "inf",
                "-inf",
                "0x10",
                "1_000",
                " 3 ",
                "2.0",
                "1e3",
                "+4",
                "4294967296",
                "-0",
                "",
                "١٢",
            ]
        ),
    ),
)
def test_parse_returns_a_number_in_range_or_refuses_in_words(r: Range, text: str):
    try:
        value = r.parse(text)
    except ValueError as err:
        assert str(err).startswith(f"must be {r.words()}, got ")
        return
    assert r.contains(value) and isinstance(value, int if r.integer else float)
    assert math.isfinite(value)


@settings(max_examples=200, deadline=None)
@given(r=st.sampled_from(RANGES), x=st.one_of(st.integers(-(10**12), 10**12), st.floats(allow_nan=True)))
def test_contains_agrees_with_the_words(r: Range, x):
    inside = r.contains(x)
    if isinstance(x, float) and (not math.isfinite(x) or r.integer):
        assert not inside
        return
    lo_ok = r.lo is None or (x > r.lo if r.lo_open else x >= r.lo)
    hi_ok = r.hi is None or (x < r.hi if r.hi_open else x <= r.hi)
    assert inside == (lo_ok and hi_ok)


def test_bools_are_not_numbers():
    assert not integer(0, 1).contains(True) and not number(0, 1).contains(False)


# --- every numeric option of infer.py / score.py comes from the factory -----------------------


def _parsers() -> dict[str, argparse.ArgumentParser]:
    top = score.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {"infer.py": infer.build_parser(), "score.py": top, "score.py cv": sub.choices["cv"]}


def _numeric_options() -> list[tuple[str, argparse.Action]]:
    out = []
    for name, parser in _parsers().items():
        for action in parser._actions:
            if action.type in (int, float) or getattr(action.type, "__name__", "") in ("integer", "number"):
                out.append((name, action))
    return out


def test_no_option_takes_a_bare_int_or_float():
    bare = [(name, a.option_strings) for name, a in _numeric_options() if a.type in (int, float) and not a.choices]
    assert bare == []


def test_no_program_file_declares_a_bare_numeric_option():
    """Every CLI of the program (bench scripts and baselines.fit included) takes numbers through the factory."""
    import ast

    bare = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", "build") or any(p.startswith(".") for p in rel.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                for kw in node.keywords:
                    if kw.arg == "type" and isinstance(kw.value, ast.Name) and kw.value.id in ("int", "float"):
                        if not any(k.arg == "choices" for k in node.keywords):
                            bare.append(f"{rel}:{node.lineno}")
    assert bare == []


def test_every_numeric_option_shows_its_range_in_help():
    options = [(n, a) for n, a in _numeric_options() if a.type not in (int, float)]
    assert len(options) >= 8
    for name, action in options:
        assert "an integer in [" in action.help or "a finite number" in action.help, (name, action.option_strings)


def _out_of_range(r: Range) -> list[str]:
    bad = ["nan", "inf", "1e309", "abc", ""]
    if r.lo is not None:
        bad += [repr(r.lo - 1) if r.integer else repr(r.lo - 0.5)] + ([repr(r.lo)] if r.lo_open else [])
    if r.hi is not None:
        bad += [str(int(r.hi) + 1) if r.integer else repr(r.hi * 2 + 1)] + ([repr(r.hi)] if r.hi_open else [])
    if r.integer:
        bad += ["2.5", "1e9" if (r.hi or 0) < 1e9 else "-1e9"]
    return bad


INFER_OPTIONS = {
    "--max-new-tokens": "MAX_NEW_TOKENS",
    "--batch-size": "GENERATION_BATCH",
    "--max-prompt-tokens": "PROMPT_TOKENS",
    "--max-memory-gb": "MEMORY_GB",
    "--max-links-per-answer": "LINKS_PER_ANSWER",
    "--relevance-threshold": "PROBABILITY",
}
CV_OPTIONS = {"--folds": "FOLDS", "--seed": "SEED", "--resamples": "RESAMPLES", "--max-new-tokens": "MAX_NEW_TOKENS"}


def _cases(options: dict[str, str]) -> list[tuple[str, str]]:
    import plumbing.ranges as ranges

    return [(opt, bad) for opt, const in options.items() for bad in _out_of_range(getattr(ranges, const))]


@pytest.mark.parametrize("option, value", _cases(INFER_OPTIONS))
def test_infer_refuses_out_of_range_numbers(tmp_path, capsys, option, value):
    refused(
        capsys,
        infer.main,
        [EXAMPLES / "archehr-qa.xml", "--out", tmp_path / "o", f"{option}={value}"],
        contains=f"argument {option}",
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value", _cases(CV_OPTIONS))
def test_score_cv_refuses_out_of_range_numbers(tmp_path, capsys, option, value):
    refused(
        capsys,
        score.main,
        ["cv", "--xml", EXAMPLES / "archehr-qa.xml", "--key", KEY, "--out", tmp_path / "cv", f"{option}={value}"],
        contains=f"argument {option}",
    )
    assert list(tmp_path.iterdir()) == []


# --- every numeric TrainConfig field ----------------------------------------------------------


def _field_cases() -> list[tuple[str, str]]:
    import plumbing.ranges as ranges

    cases = []
    for f in fields(TrainConfig):
        if f.type not in ("int", "float", int, float):
            continue
        words = RULES[f.name].expect
        r = _range_from_words(words)
        assert r is not None, (f.name, words)  # every numeric field has a finite range
        cases += [(f.name, bad) for bad in _out_of_range(r) if bad != ""]
    assert len(cases) > 100
    del ranges
    return cases


def _range_from_words(words: str) -> Range | None:
    """Rebuild a Range from its words (the words are the contract --help and refusals show)."""
    import re

    m = re.match(r"(an integer|a finite number) in ([\[(])(-?[\d.e+]+), (-?[\d.e+]+)([\])])", words)
    if not m:
        return None
    kind, left, lo, hi, right = m.groups()
    integral = kind == "an integer"
    conv = int if integral else float
    return Range(integral, conv(float(lo)), conv(float(hi)), left == "(", right == ")")


@pytest.mark.parametrize("name, value", _field_cases())
def test_train_refuses_out_of_range_config_numbers(tmp_path, capsys, name, value):
    err = refused(
        capsys,
        train.main,
        ["--stage", "domain", "--data", EMRQA, "--out", tmp_path / "run", "--print-config", f"--{name}={value}"],
        contains=f"--{name} must be",
    )
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_train_help_shows_every_numeric_range(capsys):
    assert train.main(["--help"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  --")}
    for f in fields(TrainConfig):
        if f.type in ("int", "float"):
            assert RULES[f.name].expect in lines[f"--{f.name}"], f.name


@pytest.mark.parametrize("preset, length", [("tiny", 8193), ("tiny", 40960), ("qwen3-4b-random", 40961)])
def test_max_length_beyond_the_presets_context_refused(tmp_path, capsys, preset, length):
    refused(
        capsys,
        train.main,
        [
            "--stage",
            "domain",
            "--preset",
            preset,
            "--data",
            EMRQA,
            "--out",
            tmp_path / "r",
            "--print-config",
            "--max_length",
            str(length),
        ],
        contains="--max_length must be",
    )


@pytest.mark.parametrize(
    "name, value",
    [
        ("seed", 2**32),
        ("seed", -1),
        ("epochs", 1e309),
        ("lora_r", 10**9),
        ("lr", float("nan")),
        ("max_steps", -5),
        ("warmup_ratio", 1.5),
        ("batch_size", 0),
        ("head_dropout", 1.0),
        ("keep_checkpoints", -1),
    ],
)
def test_resumed_run_config_out_of_range_refused(tmp_path, capsys, name, value):
    """A tampered RUN/config.json is checked by the same rules as the command line."""
    run = tmp_path / "run"
    run.mkdir()
    config = {f.name: f.default for f in fields(TrainConfig)}
    config.update(out=str(run), data=str(EMRQA), **{name: value})
    (run / "config.json").write_text(json.dumps(config))
    refused(capsys, train.main, ["--resume", run], contains=f"{name}")
    assert [p.name for p in run.iterdir()] == ["config.json"]


# --- config files: TOML is UTF-8 ---------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252", "utf-16", "utf-32", "shift_jis"])
def test_non_utf8_toml_is_one_line(tmp_path, capsys, encoding):
    path = tmp_path / "c.toml"
    path.write_bytes("lr = 1e-4\n# café ½ ü 日本\n".encode(encoding, errors="replace"))
    with pytest.raises(InputError, match="UTF-8"):
        read_toml(path)
    refused(capsys, train.main, ["--config", path, "--out", tmp_path / "r", "--print-config"], contains="UTF-8")


@settings(max_examples=60, deadline=None)
@given(blob=st.binary(max_size=64))
def test_any_bytes_as_toml_load_or_refuse_in_one_line(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("toml") / "c.toml"
    path.write_bytes(blob)
    try:
        read_toml(path)
    except InputError as err:
        assert "\n" not in err.one_line()


# --- the trainer state a resume reads ----------------------------------------------------------

GOOD_STATE = {
    "step": 2,
    "epoch": 0,
    "position": 4,
    "tokens": 900,
    "total_steps": 4,
    "processes": 1,
    "batches_per_step": 1,
}


@pytest.mark.parametrize(
    "field, value",
    [
        ("step", -1),
        ("step", 3),
        ("step", 2.0),
        ("step", "2"),
        ("step", None),
        ("step", True),
        ("epoch", -1),
        ("position", -4),
        ("tokens", -1),
        ("tokens", 1e30),
        ("processes", 0),
        ("batches_per_step", -2),
        ("total_steps", -1),
        ("epoch", 10**12),
    ],
)
def test_trainer_state_out_of_range_skips_the_checkpoint(tmp_path, capsys, field, value):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    state = dict(GOOD_STATE, **{field: value})
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    problem = state_problem(state, ckpt)
    assert problem is not None and field in problem or "step 3" in problem
    assert latest_checkpoint(run) is None
    assert "warning: skipping checkpoint" in capsys.readouterr().err


def test_trainer_state_missing_field_and_good_state(tmp_path):
    ckpt = tmp_path / "step-2"
    assert state_problem(GOOD_STATE, ckpt) is None
    assert "lacks 'tokens'" in state_problem({k: v for k, v in GOOD_STATE.items() if k != "tokens"}, ckpt)
    assert "JSON object" in state_problem([1, 2], ckpt)


# --- a key's relevance labels are the official ones ----------------------------------------------


@pytest.mark.parametrize(
    "label",
    [
        3,
        0,
        1.0,
        "Essential",
        "ESSENTIAL",
        "relevant",
        "",
        " essential",
        None,
        True,
        ["essential"],
        {"x": 1},
        "not_relevant",
        "supplemental",
    ],
)
def test_key_relevance_label_outside_the_official_set(tmp_path, label):
    key = json.loads(KEY.read_text())
    key[0]["answers"][0]["relevance"] = label
    path = tmp_path / "k.json"
    path.write_text(json.dumps(key))
    with pytest.raises(InputError) as err:
        load_key(path)
    assert "official labels: " + ", ".join(RELEVANCE_LABELS) in err.value.one_line()


def test_official_labels_are_accepted():
    assert {label for case in load_key(KEY).values() for label in case.relevance.values()} <= set(RELEVANCE_LABELS)
