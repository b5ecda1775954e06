"""Full (unsharded) trainable weights under FSDP, with every rank taking part.

Under FSDP each rank holds a slice of every parameter, so reading the LoRA or head
weights on the main process alone would save its slice (or hang in a collective the
other ranks never enter). :func:`full_parameters` is entered by *every* rank; inside
it the main process's modules hold the full parameters (``summon_full_params``,
gathered to CPU on global rank 0 only). :func:`trainable_state` then copies the LoRA
parameters under the names ``PeftModel.state_dict()`` gives them (FSDP's wrapper
segments removed) and :func:`save_adapter` writes them as PEFT's ``save_pretrained``
does (``adapter_model.safetensors`` without the adapter name + ``adapter_config.json``;
PEFT's own state-dict filter finds no LoRA layer behind FSDP's wrapper names), an
adapter that plain ``PeftModel.from_pretrained`` loads. :func:`load_trainable_state` is the way back on resume
(inside ``full_parameters(..., writeback=True)``, every rank).

Only FSDP1 (``fsdp_version: 1``, what configs/accelerate/fsdp_qlora.yaml uses) is
handled: FSDP2 keeps DTensors and is refused up front (:func:`check_fsdp_version`).
Without FSDP all of this is a no-op and the live modules are read as before.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from plumbing.errors import InputError

_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp_version(accelerator) -> None:
    if is_fsdp(accelerator) and getattr(accelerator, "is_fsdp2", False):
        raise InputError(
            "FSDP2 (fsdp_version: 2) is not supported; use configs/accelerate/fsdp_qlora.yaml "
            "(fsdp_version: 1) or DDP (configs/accelerate/ddp.yaml)"
        )


@contextlib.contextmanager
def full_parameters(accelerator, wrapped_model, writeback: bool = False) -> Iterator[None]:
    """Every rank must enter. FSDP: inside, parameters are full; read-only (``writeback``
    False) they are gathered to CPU on the main process only; with ``writeback`` every rank
    holds them and changes go back to the shards. Otherwise: nothing happens."""
    if not is_fsdp(accelerator):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # CPU offload of the gathered copy only from an accelerator (on CPU tensors it is unsupported).
    offload = getattr(getattr(accelerator, "device", None), "type", "cpu") != "cpu"
    kwargs = dict(writeback=True) if writeback else dict(writeback=False, rank0_only=True, offload_to_cpu=offload)
    with FSDP.summon_full_params(wrapped_model, recurse=True, **kwargs):
        yield


def trainable_state(backbone, head) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """CPU copies of the LoRA weights (``PeftModel.state_dict()`` names) and the head's state."""
    lora = {clean_name(n): p.detach().to("cpu").clone() for n, p in backbone.named_parameters() if "lora_" in n}
    if head is None:
        return lora, None
    state = {clean_name(n): t.detach().to("cpu").clone() for n, t in [*head.named_parameters(), *head.named_buffers()]}
    return lora, state


def save_adapter(backbone, out_dir, lora: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` from gathered LoRA weights."""
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k.replace(f".{adapter_name}.", "."): v.contiguous() for k, v in lora.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    backbone.peft_config[adapter_name].save_pretrained(str(out))


def head_from_state(head, state: dict[str, torch.Tensor]):
    """A CPU copy of ``head`` (same config) holding ``state`` (for ``save_head``)."""
    from heads.alignment import NotePairHead

    fresh = NotePairHead(head.config)
    fresh.load_state_dict(state, strict=True)
    return fresh


def load_trainable_state(
    backbone,
    head,
    adapter: dict[str, torch.Tensor],
    head_state: dict[str, torch.Tensor] | None,
    adapter_name: str = "default",
) -> None:
    """Copy a saved adapter (PEFT file names, no adapter name) and head state into the live
    parameters; every LoRA parameter must be found."""
    missing = []
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_" not in name:
                continue
            key = clean_name(name).replace(f".{adapter_name}.", ".")
            if key not in adapter:
                missing.append(key)
                continue
            p.copy_(adapter[key].to(p.device, p.dtype).reshape(p.shape))
        if missing:
            raise RuntimeError(f"checkpoint adapter lacks {len(missing)} LoRA weights, e.g. {missing[0]}")
        if head is not None and head_state is not None:
            for name, t in [*head.named_parameters(), *head.named_buffers()]:
                t.copy_(head_state[clean_name(name)].to(t.device, t.dtype).reshape(t.shape))
