"""Every model load keeps the model's code to what is installed: no remote code, no Hub kernels."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import transformers

from plumbing.hf_loading import local_code_only

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [
    "model",
    "heads",
    "data",
    "training",
    "baselines",
    "metrics",
    "inference",
    "evaluation",
    "bench",
    "plumbing",
]


@pytest.mark.parametrize(
    "version, switch",
    [
        ("4.51.3", False),
        ("4.53.9", False),
        ("4.54.0", True),
        ("4.54.0rc1", True),
        ("5.17.0", True),
        ("5.25.0", True),
        ("6.0.0.dev0", True),
        ("4.9.0", False),
    ],
)
def test_the_kernels_switch_is_passed_where_transformers_reads_it(version, switch):
    kwargs = local_code_only(version)
    assert kwargs["trust_remote_code"] is False
    assert ("use_kernels" in kwargs) is switch
    if switch:
        assert kwargs["use_kernels"] is False


def test_a_base_model_loads_without_hub_kernels(tmp_path, monkeypatch):
    """transformers >= 5.24 kernelizes by default: the flag it acts on must be False."""
    from model.backbone import load_base_model, save_random_base

    flags = []
    original = transformers.PreTrainedModel.set_use_kernels

    def spy(self, use_kernels, *args, **kwargs):
        flags.append(use_kernels)
        return original(self, use_kernels, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "set_use_kernels", spy)
    folder = save_random_base("tiny", tmp_path / "base")
    load_base_model("tiny", base_path=str(folder), device="cpu", load_in_4bit=False)
    assert flags == [False]


def _model_loads(tree: ast.AST):
    """Calls that build a model from a folder or hub id: ``X.from_pretrained(...)`` where X is a
    model class (not a tokenizer, not PEFT's adapter load) and ``SentenceTransformer(...)``."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "from_pretrained" and isinstance(func.value, ast.Name):
            owner = func.value.id
            if "Tokenizer" not in owner and owner != "PeftModel":
                yield node
        elif isinstance(func, ast.Name) and func.id in {"SentenceTransformer", "CrossEncoder"}:
            yield node


def test_every_model_load_in_the_code_passes_local_code_only():
    found = 0
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for call in _model_loads(ast.parse(path.read_text(encoding="utf-8"))):
                found += 1
                text = ast.unparse(call)
                where = f"{path.relative_to(ROOT)}:{call.lineno}"
                assert "local_code_only()" in text, f"{where} loads a model without local_code_only(): {text}"
    assert found >= 5  # the base model, two cross-encoder loads, the bi-encoder, the textbook bench
