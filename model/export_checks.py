"""Checks on an export folder before any model is built from it.

``load_export`` calls :func:`check_export` first: a manifest with an unknown preset, a
threshold that is not a finite probability, a head layer the backbone does not have,
a torn or non-finite weight file, or a hub base model that is neither cached nor
reachable is one :class:`InputError` line (exit 2) in well under a second, instead of
a traceback after minutes of building a default 12B model or retrying DNS.
"""
from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

from plumbing.errors import InputError

from .export_folder import MANIFEST, manifest_preset_name
from .presets import PRESETS

WEIGHT_FILES = ("adapter_model.safetensors", "head.safetensors")
HUB_HOST = ("huggingface.co", 443)


def _finite_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_manifest(manifest: object, path: Path) -> None:
    """The manifest fields ``load_export`` relies on."""
    if not isinstance(manifest, dict):
        raise InputError("manifest.json must be a JSON object", path)
    base = manifest.get("base_model", {})
    if not isinstance(base, dict):
        raise InputError("manifest 'base_model' must be an object", path)
    name = manifest_preset_name(manifest)
    if name not in PRESETS:
        raise InputError(f"manifest preset {name!r} is unknown (known: {', '.join(sorted(PRESETS))})", path)
    alignment = manifest.get("alignment", {})
    if not isinstance(alignment, dict):
        raise InputError("manifest 'alignment' must be an object", path)
    threshold = alignment.get("threshold", 0.5)
    if not _finite_number(threshold) or not 0.0 <= threshold <= 1.0:
        raise InputError(f"manifest alignment threshold must be a finite number in [0, 1], got {threshold!r}", path)


def check_head_config(root: Path, layers: int | None) -> None:
    path = root / "head_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InputError("head_config.json is not valid JSON", path) from None
    if not isinstance(config, dict):
        raise InputError("head_config.json must be a JSON object", path)
    layer = config.get("layer", -1)
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < -1 or (layers is not None and layer > layers):
        span = f"0..{layers}" if layers is not None else "a layer number"
        raise InputError(f"head layer must be -1 or {span}, got {layer!r}", path)


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
    """A hub id must be in the local cache or the hub reachable in seconds; a folder must exist."""
    if not source:
        return
    if os.path.isdir(source):
        return
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_like_path:
        raise InputError(f"base model folder not found; pass {flag} /local/folder", source)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    if isinstance(cached, str):
        return
    how = (f"base model {source} is not in the local Hugging Face cache; pass {flag} /local/folder "
           f"or download it first (huggingface-cli download {source})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise InputError(how + " (HF_HUB_OFFLINE is set)")
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
    except OSError:
        raise InputError(how + " (the hub is not reachable)") from None


def check_export(root: Path, manifest: object, base: str | None) -> None:
    check_manifest(manifest, root / MANIFEST)
    preset = PRESETS[manifest_preset_name(manifest)]  # type: ignore[arg-type,index]
    random_init = manifest.get("base_model", {}).get("random_init") or {}  # type: ignore[union-attr]
    arch = random_init.get("arch") or preset.arch
    check_head_config(root, arch.get("num_hidden_layers"))
    check_weights(root)
    if preset.source is not None:
        check_base_available(base or manifest.get("base_model", {}).get("path") or preset.source)  # type: ignore[union-attr]
