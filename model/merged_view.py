"""A dense merged view of a training backbone (base + LoRA) for no-grad packed forwards.

Export calibration scores the training cases with the backbone it has just trained. Through
the training modules each projection dequantises its NF4 weight and adds PEFT's LoRA branch,
which outside autocast runs in fp32 with a clone, an upcast of the input and a [tokens, out]
fp32 product: on an H200 that made calibration about as slow as training (issue 21).
:func:`merged_view` builds, once, what ``infer.py``'s merged load computes: each LoRA-wrapped
projection of the decoder layers as one dense Linear holding its effective weight (the base
weight as the training forward dequantises it, :func:`model.backbone.dense_from_4bit`, plus
the LoRA fold, :func:`model.lora_merge.fold_lora`). Everything else (embeddings, norms, rotary
embedding) is shared with the backbone, which is left untouched.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn

from .backbone import decoder, dense_from_4bit
from .locate import GB, room_bytes
from .lora_merge import fold_lora

BLOCKS = ("self_attn", "mlp")  # the parts of a decoder layer that hold its projections


class MergedView(nn.Module):
    """What :func:`model.backbone.decoder` and the packed forwards read: ``.model`` (the decoder stack)."""

    def __init__(self, stack: nn.Module) -> None:
        super().__init__()
        self.model = stack


def _projections(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """A block's projections (``q_proj`` ... ``down_proj``), by name."""
    return [(name, child) for name, child in block.named_children() if name.endswith("_proj")]


def _lora_parts(module: Any) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float] | None:
    """(base layer, A, B, scale) of a PEFT LoRA Linear with one plain active adapter; None for
    any other module, any LoRA variant the fold does not reproduce (DoRA, a LoRA bias), and an
    adapter already merged into its base or switched off (its forward is not base + fold)."""
    base = getattr(module, "base_layer", None)
    adapters = getattr(module, "active_adapters", None)
    if base is None or not isinstance(adapters, list) or len(adapters) != 1:
        return None
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None
    name = adapters[0]
    if getattr(module, "use_dora", {}).get(name) or getattr(module, "lora_bias", {}).get(name):
        return None
    try:
        a, b, scale = module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]
    except (AttributeError, KeyError, TypeError):
        return None
    return base, a, b, float(scale)


@torch.no_grad()
def _dense(module: nn.Module, dtype: torch.dtype) -> nn.Linear | None:
    parts = _lora_parts(module)
    if parts is None:
        return None
    base, a, b, scale = parts
    if type(base).__name__ == "Linear4bit":  # bitsandbytes' (an nn.Linear), without importing it here
        dense = dense_from_4bit(cast(nn.Linear, base))
    elif type(base) is nn.Linear:  # exactly: other Linear subclasses (8-bit, ...) compute differently
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        dense.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        if base.bias is not None:
            dense.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    else:
        return None
    fold_lora(dense.weight, a, b, scale)
    return dense.to(dtype).requires_grad_(False)


def merged_view(backbone: nn.Module) -> MergedView | None:
    """The dense merged view of ``backbone``'s decoder, or None where a projection is not a plain
    LoRA Linear over a Linear or an NF4 Linear (the caller keeps the backbone's own modules)."""
    stack = decoder(backbone)
    dtype = stack.embed_tokens.weight.dtype
    layers = []
    for layer in cast(list[nn.Module], stack.layers):
        view = copy.copy(layer)  # the same attributes; its own child table, so the layer is untouched
        view._modules = dict(layer._modules)
        for part in BLOCKS:
            block: nn.Module = copy.copy(getattr(layer, part))
            block._modules = dict(block._modules)
            for name, child in _projections(block):
                dense = _dense(child, dtype)
                if dense is None:
                    return None
                block._modules[name] = dense
            view._modules[part] = block
        layers.append(view)
    top = copy.copy(cast(nn.Module, stack))
    top._modules = dict(top._modules)
    top._modules["layers"] = nn.ModuleList(layers)
    return MergedView(top)


def merged_view_bytes(backbone: nn.Module) -> int:
    """Bytes the view's dense projections take (in the backbone's compute dtype)."""
    stack = decoder(backbone)
    size = stack.embed_tokens.weight.element_size()
    total = 0
    for layer in stack.layers:
        for part in BLOCKS:
            for _, child in _projections(getattr(layer, part)):
                base: Any = getattr(child, "base_layer", child)
                total += int(base.in_features) * int(base.out_features) * size
    return total


def merged_view_within_memory(backbone: nn.Module, working_bytes: int) -> tuple[MergedView | None, str | None]:
    """(the view, None) where its dense weights and ``working_bytes`` fit what this process may
    still allocate on the backbone's device (always off CUDA); else (None, why not)."""
    need = merged_view_bytes(backbone)
    room = room_bytes(decoder(backbone).embed_tokens.weight.device)
    if room is not None and need + working_bytes > room:
        return None, (
            f"its dense weights ({need / GB:.1f} GB) and a forward's working set ({working_bytes / GB:.1f} GB) "
            f"do not fit the {room / GB:.1f} GB this process may still allocate"
        )
    view = merged_view(backbone)
    if view is None:
        return None, "a projection is not a plain LoRA Linear over a Linear or an NF4 Linear"
    return view, None
