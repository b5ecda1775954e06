"""Checks on an export folder, in full, before any model is built from it.

An export folder is untrusted input (it may come from anyone). ``load_export`` calls
:func:`check_export` first, the one place every file is checked: the manifest's fields and
types (through its one reader, :class:`model.manifest.ExportManifest`), a known preset, every
file present, ``head_config.json`` and ``adapter_config.json`` field by field, every tensor of
``head.safetensors`` and ``adapter_model.safetensors`` with the shape and dtype the configs
imply and only finite numbers, and a hub base model cached or reachable. Anything wrong is one
:class:`InputError` line (exit 2) naming the file and the field, in well under a second,
instead of a traceback after minutes of building a model or retrying DNS.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from plumbing.errors import InputError

from .export_folder import MANIFEST, read_manifest
from .locate import check_base
from .manifest import ExportManifest, is_kind, kind_text
from .presets import PRESETS

WEIGHT_FILES = ("adapter_model.safetensors", "head.safetensors")
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "head_config.json")
# head_config.json: field -> kind (model.manifest.KINDS); hidden_size is required.
HEAD_FIELDS = {
    "hidden_size": "positive",
    "proj_dim": "positive",
    "mlp_dim": "positive",
    "pooling": "str",
    "relevance": "bool",
    "dropout": "probability",
    "layer": "int",
}
# adapter_config.json: the fields the loader relies on -> kind (None-able ones are optional).
ADAPTER_FIELDS = {"r": "positive", "lora_alpha": "number", "lora_dropout": "probability", "peft_type": "str"}
LORA_KEY = re.compile(r"layers\.(\d+)\..*?(\w+_proj)\.lora_([AB])\.weight$")


def _field_error(path: Path, name: str, what: str, value: object) -> InputError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return InputError(f"field {name!r} must be {what}, got {shown}", path)


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InputError(f"{path.name} is not valid JSON", path) from None
    if not isinstance(data, dict):
        raise InputError(f"{path.name} must be a JSON object", path)
    return data


def check_manifest(manifest: ExportManifest, path: Path) -> None:
    """What the typed reader cannot know: the preset is one of this version's."""
    if manifest.preset not in PRESETS:
        raise InputError(f"manifest preset {manifest.preset!r} is unknown (known: {', '.join(sorted(PRESETS))})", path)


def check_head_config(root: Path, layers: int | None, arch_hidden_size: int | None = None) -> dict[str, Any]:
    """``head_config.json`` field by field; returns it."""
    from heads.config import POOLINGS

    path = root / "head_config.json"
    config = read_json_object(path)
    unknown = sorted(set(config) - set(HEAD_FIELDS))
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r} (known: {', '.join(HEAD_FIELDS)})", path)
    if "hidden_size" not in config:
        raise InputError("field 'hidden_size' is missing", path)
    for name, kind in HEAD_FIELDS.items():
        if name in config and not is_kind(config[name], kind):
            raise _field_error(path, name, kind_text(kind), config[name])
    if config.get("pooling", "mean") not in POOLINGS:
        raise _field_error(path, "pooling", f"one of {', '.join(POOLINGS)}", config["pooling"])
    hidden = arch_hidden_size
    if hidden is not None and config["hidden_size"] != hidden:
        raise InputError(f"field 'hidden_size' is {config['hidden_size']!r}; the base model's is {hidden}", path)
    layer = config.get("layer", -1)
    if layer < -1 or (layers is not None and layer > layers):
        span = f"0..{layers}" if layers is not None else "a layer number"
        raise InputError(f"head layer must be -1 or {span}, got {layer!r}", path)
    return config


def check_adapter_config(root: Path, manifest: ExportManifest) -> dict[str, Any]:
    """``adapter_config.json``: a LoRA adapter with a sane rank, scale, dropout and targets; returns it."""
    path = root / "adapter_config.json"
    config = read_json_object(path)
    for name, kind in ADAPTER_FIELDS.items():
        if name not in config:
            raise InputError(f"field {name!r} is missing", path)
        if not is_kind(config[name], kind):
            raise _field_error(path, name, kind_text(kind), config[name])
    if config["peft_type"] != "LORA":
        raise _field_error(path, "peft_type", "'LORA'", config["peft_type"])
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or is_kind(targets, "str_list")) or not targets:
        raise _field_error(path, "target_modules", "a non-empty list of module names", targets)
    for name in ("rank_pattern", "alpha_pattern"):
        if config.get(name) not in (None, {}):
            raise _field_error(path, name, "empty (one rank for every module)", config[name])
    if manifest.lora is not None and manifest.lora.r != config["r"]:
        raise InputError(f"field 'r' is {config['r']!r} but the manifest records LoRA r={manifest.lora.r}", path)
    return config


def _lora_dims(arch: dict[str, Any], module: str) -> tuple[int, int] | None:
    """(in, out) features of a Qwen3 projection, or None when the shape is not known here."""
    try:
        hidden, heads = int(arch["hidden_size"]), int(arch["num_attention_heads"])
        kv = int(arch.get("num_key_value_heads", heads))
        head_dim = int(arch.get("head_dim") or hidden // heads)
        inter = int(arch["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return None
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }.get(module)


def check_adapter_tensors(root: Path, rank: int, arch: dict[str, Any]) -> None:
    """Every LoRA tensor: floating point, rank ``rank``, and the in/out features of its layer."""
    from safetensors import safe_open

    path = root / "adapter_model.safetensors"
    layers = arch.get("num_hidden_layers")
    found = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            dtype, shape = t.get_dtype(), tuple(t.get_shape())
            if dtype not in ("F32", "F16", "BF16", "F64"):
                raise InputError(f"tensor {key} has dtype {dtype}, not a floating-point type", path)
            match = LORA_KEY.search(key)
            if match is None:
                continue
            found += 1
            layer, module, side = int(match.group(1)), match.group(2), match.group(3)
            if len(shape) != 2:
                raise InputError(f"tensor {key} has shape {list(shape)}, not a matrix", path)
            if isinstance(layers, int) and layer >= layers:
                raise InputError(f"tensor {key} is for layer {layer}; the base has {layers} layers", path)
            dims = _lora_dims(arch, module)
            expected = ((rank, dims[0]) if side == "A" else (dims[1], rank)) if dims else None
            if expected is None:
                expected_rank_ok = shape[0] == rank if side == "A" else shape[1] == rank
                if not expected_rank_ok:
                    raise InputError(f"tensor {key} has shape {list(shape)}, not rank {rank}", path)
            elif shape != expected:
                raise InputError(f"tensor {key} has shape {list(shape)}, expected {list(expected)}", path)
    if not found:
        raise InputError("no LoRA tensors (lora_A / lora_B weights) in the adapter", path)


def check_head_tensors(root: Path, config: dict[str, Any]) -> None:
    """``head.safetensors`` holds exactly the head's tensors, with its shapes and floating dtypes."""
    from safetensors import safe_open

    from heads.alignment import NotePairHead
    from heads.config import HeadConfig

    path = root / "head.safetensors"
    expected = {k: tuple(v.shape) for k, v in NotePairHead(HeadConfig.from_dict(config)).state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for key in sorted(set(expected) - keys):
            raise InputError(f"tensor {key} is missing", path)
        for key in sorted(keys - set(expected)):
            raise InputError(f"tensor {key} is not part of the head", path)
        for key in sorted(keys):
            t = f.get_slice(key)
            if t.get_dtype() not in ("F32", "F16", "BF16", "F64"):
                raise InputError(f"tensor {key} has dtype {t.get_dtype()}, not a floating-point type", path)
            if tuple(t.get_shape()) != expected[key]:
                raise InputError(f"tensor {key} has shape {list(t.get_shape())}, expected {list(expected[key])}", path)


def check_weights(root: Path) -> None:
    """Every weight file reads as safetensors and holds only finite numbers."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in WEIGHT_FILES:
        path = root / name
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise InputError(f"unreadable weights ({str(err).splitlines()[0][:80]})", path) from None
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InputError(f"weight {key} holds non-finite values (a diverged run?)", path)


def check_base_available(source: str | None, flag: str = "--base") -> None:
    """A hub id must be cached or downloadable now, a folder a whole model (:func:`model.locate.check_base`)."""
    check_base(source, flag)


def check_export(root: Path, base: str | None) -> ExportManifest:
    """The export folder in full, before anything is built; returns its typed manifest."""
    manifest = read_manifest(root)
    check_manifest(manifest, root / MANIFEST)
    for required in REQUIRED_FILES:
        if not (root / required).is_file():
            raise InputError(f"export is missing {required}", root)
    preset = PRESETS[manifest.preset]
    if preset.source is not None:  # first: a missing hub model is the likeliest problem on a new machine
        check_base_available(base or manifest.base_model.path or preset.source)
    random_init = manifest.base_model.random_init
    arch = dict(random_init.arch) if random_init is not None else dict(preset.arch)
    head_config = check_head_config(root, arch.get("num_hidden_layers"), arch.get("hidden_size"))
    adapter_config = check_adapter_config(root, manifest)
    check_weights(root)
    check_head_tensors(root, head_config)
    check_adapter_tensors(root, adapter_config["r"], arch)
    return manifest
