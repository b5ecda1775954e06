"""Folding a saved LoRA adapter into a dense model's weights without building PEFT's wrappers.

``PeftModel.from_pretrained(model, folder).merge_and_unload()`` wraps every target Linear,
loads the adapter into the wrappers, folds ``W += (B @ A) * scale`` and unwraps again: about
a second at Qwen3-4B, plus importing PEFT in a fresh process, for 252 small matmuls.
:func:`merge_adapter` does the fold with PEFT's arithmetic (``B @ A`` in fp32, times the
scale, added in place to the dense weight) for the adapters this project writes: plain LoRA
(no DoRA, no bias, no extra saved modules, one rank and alpha for every module). For anything
else it changes nothing and returns False, and the caller merges through PEFT.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SAVED_PREFIX = "base_model.model."  # how PEFT names a causal LM's modules in a saved adapter


def plain_lora_scale(config: dict[str, Any]) -> float | None:
    """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) for a plain LoRA config; None otherwise."""
    if config.get("peft_type") != "LORA" or not isinstance(config.get("r"), int) or config["r"] < 1:
        return None
    unsupported = ("use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern", "lora_bias")
    if any(config.get(name) for name in unsupported) or config.get("bias", "none") != "none":
        return None
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)):
        return None
    r = config["r"]
    return float(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def _adapter_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]] | None:
    """{module path: {"A": lora_A, "B": lora_B}}, or None for a key that is not a LoRA weight."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(SAVED_PREFIX):
            return None
        path, _, kind = key[len(SAVED_PREFIX) :].rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            return None
        pairs.setdefault(path, {})[kind[0]] = tensor
    return pairs


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter_dir: str | Path) -> bool:
    """Fold the LoRA adapter saved in ``adapter_dir`` into ``model``'s dense Linear weights in
    place; False (``model`` untouched) where the adapter is not one this fold reproduces."""
    root = Path(adapter_dir)
    try:
        config = json.loads((root / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    scale = plain_lora_scale(config) if isinstance(config, dict) else None
    if scale is None or not (root / ADAPTER_WEIGHTS).is_file():
        return False
    from safetensors.torch import load_file

    device = next(model.parameters()).device
    pairs = _adapter_pairs(load_file(str(root / ADAPTER_WEIGHTS), device=str(device)))
    if not pairs:
        return False
    folds = []
    for path, ab in pairs.items():  # every pair checked before any weight changes
        module = _submodule(model, path)
        if set(ab) != {"A", "B"} or not isinstance(module, nn.Linear):
            return False
        a, b = ab["A"], ab["B"]
        if (
            a.dim() != 2
            or b.dim() != 2
            or (b.shape[0], a.shape[1]) != tuple(module.weight.shape)
            or a.shape[0] != b.shape[1]
        ):
            return False
        folds.append((module, a, b))
    for module, a, b in folds:
        fold_lora(module.weight, a, b, scale)
    return True


@torch.no_grad()
def fold_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """``weight += (B @ A) * scale`` in place, PEFT's arithmetic: the product in fp32, added to
    the weight in its own dtype (one rounding). The merged load and the export's merged view
    both fold with it, so they hold the same weights."""
    weight.data += (b.float() @ a.float()) * scale


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
