"""Packed forwards: several token sequences in one forward, concatenated, no padding.

The fast engine's one forward (:mod:`inference.fast`): alignment and relevance forwards,
and the prefill of generation (which may run a case's answer sentences after its prompt,
so that one pass serves Subtasks 2, 3 and 4). The sequences are concatenated into one
``[tokens, hidden]`` stream; attention is causal within each sequence (``cu_seqlens``):

* on CUDA in bf16/fp16, FlashAttention's variable-length kernel (``VARLEN_FLASH``), with
  grouped-query attention native (no repeated K/V);
* elsewhere (CPU, fp32, or the kernel refusing, said and recorded) one causal SDPA per
  sequence (``PER_SEQUENCE``): the same arithmetic, more kernel launches.

The layers run with the model's own modules (dense, merged or NF4 + LoRA), as
:mod:`model.decoding` does. The forward stops at the layer the head reads unless logits
are asked for, and the LM head runs only on the positions asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import decoder, head_dim_of, lm_head
from .fused_ops import LayerOps, choose_layer_ops
from .kernel_probe import kernel_mismatch

VARLEN_FLASH, PER_SEQUENCE = "flash-varlen", "per-sequence"


@dataclass
class Packed:
    """Sequences concatenated: ``ids``/``positions`` [T], ``cu`` [n + 1] int32 starts."""

    ids: torch.Tensor
    positions: torch.Tensor
    cu: torch.Tensor
    starts: list[int]
    lengths: list[int]
    max_len: int

    @property
    def tokens(self) -> int:
        return int(sum(self.lengths))


def pack(seqs: list[list[int]], device: torch.device) -> Packed:
    lengths = [len(s) for s in seqs]
    if not lengths or min(lengths) < 1:
        raise ValueError("every packed sequence needs at least one token")
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor(starts, dtype=torch.int32)
    return Packed(
        to_device(ids, device), to_device(positions, device), to_device(cu, device), starts, lengths, max(lengths)
    )


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor ``t`` on ``device``; to a GPU through pinned memory, without waiting. A copy
    from pageable memory first waits for all the work already queued on the GPU, so the host
    could not queue the next packed forward while the GPU runs this one."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed, scale: float, impl: str
) -> torch.Tensor:
    """Causal attention within each packed sequence: q [T, heads, d], k/v [T, kv, d] -> [T, heads, d]."""
    if impl == VARLEN_FLASH:
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, packed.cu, packed.cu, packed.max_len, packed.max_len, 0.0, True, False, scale=scale
        )
        return out[0]
    parts = []
    for a, n in zip(packed.starts, packed.lengths):
        qs, ks, vs = (x[a : a + n].transpose(0, 1)[None] for x in (q, k, v))
        parts.append(
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1)
        )
    return torch.cat(parts)


_PROBES: dict[tuple[str, torch.dtype, int, int, int], str | None] = {}


def attention_shape(model: nn.Module) -> tuple[torch.device, torch.dtype, int, int, int]:
    """(device, dtype, heads, KV heads, head size) of ``model``'s attention: what the kernel
    choices (:func:`choose_packed_attention`, ``model.decoding.choose_decode_attention``) key on."""
    dec = decoder(model)
    cfg, weight = dec.config, dec.embed_tokens.weight
    return weight.device, weight.dtype, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim_of(cfg)


def packed_attention(model: nn.Module) -> tuple[str, str | None]:
    """The packed forwards' attention for ``model`` and why not the varlen kernel (None when it
    runs; the fallback is one causal SDPA per sequence, the same arithmetic)."""
    return choose_packed_attention(*attention_shape(model))


def choose_packed_attention(
    device: torch.device, dtype: torch.dtype, heads: int, n_kv: int, head_dim: int
) -> tuple[str, str | None]:
    """(implementation, why not the varlen kernel): FlashAttention's varlen kernel where it runs
    here and agrees with per-sequence SDPA on a small probe (cached per shape)."""
    if device.type != "cuda":
        return PER_SEQUENCE, None
    if dtype not in (torch.bfloat16, torch.float16):
        return PER_SEQUENCE, f"varlen flash attention takes bf16 or fp16, the model runs in {dtype}"
    key = (str(device), dtype, heads, n_kv, head_dim)
    if key not in _PROBES:
        gen = torch.Generator(device=device).manual_seed(0)
        packed = pack([[1] * 37, [1] * 5, [1] * 90], device)
        q = torch.randn(packed.tokens, heads, head_dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(packed.tokens, n_kv, head_dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(packed.tokens, n_kv, head_dim, device=device, dtype=dtype, generator=gen)
        _PROBES[key] = kernel_mismatch(
            "varlen flash attention",
            lambda: causal_attention(q, k, v, packed, head_dim**-0.5, VARLEN_FLASH),
            "SDPA",
            lambda: causal_attention(q, k, v, packed, head_dim**-0.5, PER_SEQUENCE),
        )
    why_not = _PROBES[key]
    return (PER_SEQUENCE, why_not) if why_not else (VARLEN_FLASH, None)


def layer_ops(model: nn.Module) -> tuple[LayerOps, str | None]:
    """The element-wise ops the forwards of ``model`` run (:mod:`model.fused_ops`) and why not
    the fused kernels (None when they run, or off CUDA where the eager ops are the choice)."""
    dec = decoder(model)
    weight = dec.embed_tokens.weight
    return choose_layer_ops(weight.device, weight.dtype, dec.config, dec.norm)


def tap_index(n_layers: int, layer: int) -> int:
    """A head layer in ``output_hidden_states`` numbering as 0..n (n = the final normed state)."""
    if layer in (-1, n_layers):
        return n_layers
    index = n_layers + 1 + layer if layer < 0 else layer
    if not 0 <= index < n_layers:
        raise ValueError(f"head layer {layer} out of range for a {n_layers}-layer model")
    return index


WriteKV = Callable[[int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def packed_forward(
    model: nn.Module,
    packed: Packed,
    *,
    tap: int = -1,
    attention: str = PER_SEQUENCE,
    write_kv: WriteKV | None = None,
    logits_at: torch.Tensor | None = None,
    ops: LayerOps | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden state ``tap`` [T, H], greedy next token at ``logits_at`` or None).

    ``tap`` as the head counts layers (0 = embeddings, k = output of layer k, -1 = final
    normed). Without ``logits_at`` the forward stops at ``tap``. ``write_kv(layer, k, v)``
    receives every layer's rotated keys and values [T, kv, d] (for a decode cache). ``ops``:
    the element-wise ops (default: :func:`layer_ops`'s choice for ``model``)."""
    dec = decoder(model)
    layers = dec.layers
    n_layers = len(layers)
    tap_at = tap_index(n_layers, tap)
    last = n_layers if (logits_at is not None or write_kv is not None) else tap_at
    ops = ops if ops is not None else layer_ops(model)[0]
    h: torch.Tensor = dec.embed_tokens(packed.ids)
    cos, sin = dec.rotary_emb(h[None], packed.positions[None])
    cos, sin = cos[0], sin[0]  # [T, d]
    tapped: torch.Tensor | None = h if tap_at == 0 else None
    t = h.shape[0]
    run = layers[: min(last, n_layers)]
    # Each residual add is fused with the norm after it: the next layer's input norm, or the
    # final norm after the last layer (x holds the normed state the next matmuls read).
    x = ops.norm(run[0].input_layernorm if len(run) else dec.norm, h)
    for layer_i, layer in enumerate(run):
        attn = layer.self_attn
        head_dim = attn.head_dim
        q = ops.norm(attn.q_norm, attn.q_proj(x).view(t, -1, head_dim))
        k = ops.norm(attn.k_norm, attn.k_proj(x).view(t, -1, head_dim))
        v = attn.v_proj(x).view(t, -1, head_dim)
        q, k = ops.rope(q, k, cos, sin)
        if write_kv is not None:
            write_kv(layer_i, k, v)
        o = causal_attention(q, k, v, packed, attn.scaling, attention)
        x, h = ops.add_norm(h, attn.o_proj(o.reshape(t, -1)), layer.post_attention_layernorm)
        mlp_out = ops.mlp(layer.mlp, x)
        if layer_i + 1 < n_layers and layer_i + 1 == len(run):  # stops here: no norm after
            h = h + mlp_out
        else:
            x, h = ops.add_norm(h, mlp_out, layers[layer_i + 1].input_layernorm if layer_i + 1 < n_layers else dec.norm)
        if layer_i + 1 == tap_at and tap_at < n_layers:
            tapped = h
    if tap_at == n_layers:
        tapped = x  # the final norm, applied by the last layer's add
    assert tapped is not None  # the layers ran at least up to tap_at
    next_tokens = None
    if logits_at is not None:  # all layers ran: x is the final normed state
        next_tokens = lm_head(model)(x[logits_at]).argmax(-1)
    return tapped, next_tokens


def token_budget_packs(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices longest first, packed so that each pack's real tokens sum to at most
    ``max_tokens`` (a longer sequence goes alone). No padding: the budget is real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    packs: list[list[int]] = []
    used = 0
    for i in order:
        if packs and used + lengths[i] <= max_tokens:
            packs[-1].append(i)
            used += lengths[i]
        else:
            packs.append([i])
            used = lengths[i]
    return packs
