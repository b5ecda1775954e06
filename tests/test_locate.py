"""Issue 20, class 4 and issue 23, friction 2: devices and base models, one line in seconds.

``model/locate.py`` is the one place every CLI resolves ``--device`` and checks ``--base``;
these tests run it over tables and generated text (never another exception than InputError,
the message naming what was asked and what exists), then each CLI over the same table
(exit 2, one line, nothing written, within seconds), and the deprecated ``--base_path``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import infer
import score
import train
from plumbing.errors import InputError
from model.locate import available_devices, check_base, model_folder_problem, resolve_device
from training.config import build_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
XML, KEY, EMRQA = EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json", EXAMPLES / "emrqa_sample.jsonl"

BAD_DEVICES = [
    "potato",
    "gpu0",
    "cuda:-1",
    "cuda:99",
    "meta",
    "xla",
    "cpu:cpu",
    "",
    " ",
    "cuda0",
    "CUDA",
    "0",
    "cuda:0:1",
    "mps:7",
    "ipu",
    "vulkan",
    "cuda;rm -rf",
    "\x00",
    "tpu:0",
]


def one_line(err: InputError) -> str:
    line = err.one_line()
    assert "\n" not in line
    return line


@pytest.mark.parametrize("requested", [d for d in BAD_DEVICES if d.strip()])
def test_unknown_or_absent_device_named_with_what_exists(requested):
    if requested in available_devices():
        pytest.skip(f"{requested} exists on this machine")
    with pytest.raises(InputError) as err:
        resolve_device(requested)
    line = one_line(err.value)
    assert repr(requested) in line and "cpu" in line  # what was asked, what this machine has


def test_cuda_without_cuda_says_so(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for requested in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(InputError, match="CUDA") as err:
            resolve_device(requested)
        assert "this machine has: cpu" in one_line(err.value)


def test_existing_devices_and_the_default_resolve():
    for device in available_devices():
        assert resolve_device(device) == device
    assert resolve_device(None) in ("cpu", "cuda")
    assert resolve_device("") == resolve_device(None)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=16))
def test_any_device_text_resolves_or_is_one_line(text):
    try:
        assert resolve_device(text) in available_devices() + ["cuda"]
    except InputError as err:
        one_line(err)


# --- base models ------------------------------------------------------------------------------


def model_folder(root: Path, *, config=True, weights=True, tokenizer=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if config:
        (root / "config.json").write_text("{}")
    if weights:
        (root / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (root / "tokenizer_config.json").write_text("{}")
    return root


@pytest.fixture
def no_cached_weights(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)


def bad_bases(tmp: Path) -> list[tuple[str, str]]:
    """(source, words the refusal holds): at least ten ways a base is not loadable."""
    (tmp / "file.txt").write_text("x")
    return [
        ("/nonexistent", "no such folder"),
        (str(tmp / "missing" / "deeper"), "no such folder"),
        (str(tmp / "file.txt"), "no such folder"),
        (str(model_folder(tmp / "empty", config=False, weights=False, tokenizer=False)), "no config.json"),
        (str(model_folder(tmp / "noweights", weights=False)), "no .safetensors"),
        (str(model_folder(tmp / "notok", tokenizer=False)), "no tokenizer"),
        ("Qwen/Qwen3-4B", "hf download Qwen/Qwen3-4B"),
        ("someone/not-cached", "not in the local Hugging Face cache"),
        ("Qwen/Qwen3 4B", "not a hub id"),
        ("a/b/c", "not a hub id"),
        ("~/no-such-model-here", "no such folder"),
        ("./relative/missing", "no such folder"),
        ("Qwen3-4B", "not a hub id"),
        ("bad/na\x00me", "not a hub id"),
        ("x/" + "y" * 300, "not in the local Hugging Face cache"),
    ]


def test_bad_bases_are_one_line_naming_the_source(tmp_path, no_cached_weights):
    cases = bad_bases(tmp_path)
    assert len(cases) >= 10
    for source, words in cases:
        start = time.perf_counter()
        with pytest.raises(InputError) as err:
            check_base(source)
        line = one_line(err.value)
        assert source.replace("\n", " ") in line and words in line, (source, line)
        assert "huggingface-cli" not in line  # current huggingface_hub ships `hf`
        assert time.perf_counter() - start < 5


def test_loadable_bases_pass(tmp_path, monkeypatch):
    import huggingface_hub

    check_base(str(model_folder(tmp_path / "ok")))
    assert model_folder_problem(tmp_path / "ok") is None
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, f: f"/cache/{repo}/{f}")
    check_base("Qwen/Qwen3-4B")
    check_base(None)
    check_base("")


def test_unreachable_hub_fails_within_the_probe(monkeypatch):
    """Not offline, not cached, the hub silent (DNS that hangs): refused after the bounded probe."""
    import socket

    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr("model.locate.HUB_PROBE_SECONDS", 0.5)

    def silent_hub(*a, **k):  # DNS that hangs, then gives up
        time.sleep(3)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent_hub)
    start = time.perf_counter()
    with pytest.raises(InputError, match="the hub is not reachable"):
        check_base("Qwen/Qwen3-4B")
    assert time.perf_counter() - start < 3


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=24))
def test_any_base_text_is_loadable_or_one_line(text):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"  # conftest sets it too; the probe must never run here
    try:
        check_base(text)
    except InputError as err:
        one_line(err)


# --- every CLI goes through it, before any work --------------------------------------------------


def cli_refused(capsys, main, argv, contains) -> str:
    capsys.readouterr()
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("note:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert contains in lines[0], lines[0]
    assert time.perf_counter() - start < 10
    return lines[0]


CLI_CASES = [
    ("--device", "potato", "'potato'"),
    ("--device", "cuda:99", "'cuda:99'"),
    ("--device", "meta", "'meta'"),
    ("--base", "/nonexistent", "/nonexistent"),
    ("--base", "Qwen/Qwen3-4B", "hf download"),
    ("--base_path", "/nonexistent", "/nonexistent"),
]


@pytest.mark.parametrize("flag, value, contains", CLI_CASES)
def test_infer_checks_device_and_base_before_work(tmp_path, capsys, no_cached_weights, flag, value, contains):
    cli_refused(capsys, infer.main, [XML, "--out", tmp_path / "out", flag, value], contains)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["potato", "cuda:99", "meta", "tpu"])
def test_score_cv_checks_the_device_before_work(tmp_path, capsys, value):
    cli_refused(
        capsys, score.main, ["cv", "--xml", XML, "--key", KEY, "--out", tmp_path / "cv", "--device", value], repr(value)
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value, contains", [c for c in CLI_CASES if c[0] != "--device"])
def test_train_checks_the_base_before_work(tmp_path, capsys, no_cached_weights, flag, value, contains):
    cli_refused(
        capsys,
        train.main,
        ["--stage", "domain", "--data", EMRQA, "--out", tmp_path / "run", "--progress", "false", flag, value],
        contains,
    )
    assert list(tmp_path.iterdir()) == []


def test_base_is_one_spelling_and_base_path_a_deprecated_alias(tmp_path, capsys):
    assert parse_overrides(["--base", "/m"]) == {"base": "/m"}
    assert parse_overrides(["--base_path", "/m"]) == {"base": "/m"}
    assert "--base_path is deprecated; use --base" in capsys.readouterr().err
    assert parse_overrides(["--base-path=/m"]) == {"base": "/m"}
    # A run saved before the rename (config.json holds base_path) still resumes.
    old = build_config({}, base={"stage": "domain", "preset": "tiny", "base_path": ""})
    assert old.base == ""
    toml = tmp_path / "c.toml"
    toml.write_text('stage = "domain"\nbase_path = ""\n')
    assert build_config({}, config_file=toml).base == ""
    help_text = infer.build_parser().format_help()
    assert "--base BASE" in help_text and "--base_path" not in help_text
    from training.config_docs import config_keys_help

    keys = [line.split()[0] for line in config_keys_help().splitlines()]
    assert "--base" in keys and "--base_path" not in keys
    json.dumps(keys)


@pytest.mark.parametrize(
    "error",
    [
        OSError(
            "Qwen/Qwen3-4C is not a local folder and is not a valid model identifier listed on "
            "'https://huggingface.co/models'\nIf this is a private repository, make sure to pass a token"
        ),
        OSError("[Errno 28] No space left on device"),
        OSError(""),
    ],
)
def test_a_base_that_fails_to_load_is_one_line(monkeypatch, error):
    """Past the checks (e.g. online, the id mistyped): the loader's error is one line, not a traceback."""
    import transformers

    from model.backbone import load_base_model, load_tokenizer

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    for load in (
        lambda: load_base_model("qwen3-4b", base_path="Qwen/Qwen3-4C", load_in_4bit=False, device="cpu"),
        lambda: load_tokenizer("Qwen/Qwen3-4C"),
    ):
        with pytest.raises(InputError) as err:
            load()
        line = one_line(err.value)
        assert "--base Qwen/Qwen3-4C: cannot load the model" in line and "hf download" in line
