"""How much GPU memory inference may use, and the batch sizes and weights that fit it.

The budget is the smaller of what the card has free (``torch.cuda.mem_get_info`` plus
what PyTorch holds but does not use) and ``--max-memory-gb`` (also set as the process's
memory fraction, so the allocator itself respects a shared card), less a safety margin.
From it: whether the dense merged weights fit (else NF4 + LoRA, no merge), how many rows
decode together (their KV cache), and how many tokens one prefill or alignment forward
may hold. On CPU nothing is planned: fixed, small defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from model.locate import GB, MARGIN_BYTES, room_bytes

MARGIN_FRACTION = 0.06
MIN_WORKING_BYTES = int(4 * GB)  # below this beside the dense weights, keep NF4 (no merge)
CPU_GEN_ROWS, CPU_ALIGN_TOKENS, CPU_PREFILL_TOKENS = 16, 16384, 8192
PREFILL_MAX_TOKENS = 16384


def apply_memory_cap(max_memory_gb: float | None, device: torch.device | str | None = None) -> float | None:
    """Cap this process's CUDA memory at ``max_memory_gb`` (None: no cap). Returns the cap in GB."""
    if max_memory_gb is None:
        return None
    if max_memory_gb <= 0:
        raise ValueError("--max-memory-gb must be > 0")
    device = torch.device(device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory_gb * GB / total), index)
    return float(max_memory_gb)


def available_bytes(device: torch.device | str | None = None, max_memory_gb: float | None = None) -> int | None:
    """Bytes this process may still allocate on ``device`` (None on CPU), margin taken off."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    room = room_bytes(device)
    if room is None:
        return None
    allocated = torch.cuda.memory_allocated(device)
    if max_memory_gb is not None:
        room = min(room, int(max_memory_gb * GB) - allocated)
    cap = (
        int(max_memory_gb * GB) if max_memory_gb is not None else torch.cuda.get_device_properties(device).total_memory
    )
    return max(0, room - MARGIN_BYTES - int(MARGIN_FRACTION * cap))


def dense_weight_bytes(arch: dict, dtype_bytes: int = 2) -> int:
    """Bytes of a Qwen3-shaped model's weights in bf16 (tied embeddings counted once)."""
    h, layers = arch["hidden_size"], arch["num_hidden_layers"]
    heads, kv = arch["num_attention_heads"], arch["num_key_value_heads"]
    head_dim = arch.get("head_dim") or h // heads
    inter, vocab = arch["intermediate_size"], arch["vocab_size"]
    per_layer = h * head_dim * (2 * heads + 2 * kv) + 3 * h * inter
    embed = vocab * h * (1 if arch.get("tie_word_embeddings", True) else 2)
    return dtype_bytes * (layers * per_layer + embed)


def should_merge(arch: dict, budget_bytes: int | None) -> tuple[bool, str]:
    """Merge the adapter into dense bf16 weights only where they and a working set fit."""
    if budget_bytes is None:
        return True, "no CUDA budget (CPU): default"
    need = dense_weight_bytes(arch) + MIN_WORKING_BYTES
    if budget_bytes >= need:
        return True, f"dense weights + working set ({need / GB:.1f} GB) fit the budget ({budget_bytes / GB:.1f} GB)"
    return False, (
        f"dense weights + working set ({need / GB:.1f} GB) exceed the budget ({budget_bytes / GB:.1f} GB): "
        "NF4 base + LoRA, no merge"
    )


def activation_bytes_per_token(config) -> int:
    """A forward's live activations per token (no cache): residual, attention and MLP
    temporaries in bf16, with room for the mask and the head's captured hidden state."""
    from model.backbone import head_dim_of

    h, inter = config.hidden_size, config.intermediate_size
    head_dim = head_dim_of(config)
    qkv = head_dim * (config.num_attention_heads + 2 * config.num_key_value_heads)
    return int(2 * (6 * h + 3 * inter + 2 * qkv) * 1.5)


@dataclass
class BatchPlan:
    """Batch sizes for one inference run; ``budget_gb`` None on CPU."""

    budget_gb: float | None
    gen_rows: int
    prefill_tokens: int
    align_tokens: int
    kv_bytes_per_token: int
    # The decoding rows' memory: each batch's KV cache at its own width plus row_overhead_bytes a
    # row (logits, activations), so batches of shorter prompts decode more rows than gen_rows.
    decode_budget_bytes: int | None = None
    row_overhead_bytes: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def plan_batches(
    model, *, prompt_tokens: int, max_new_tokens: int, max_rows: int | None = None, max_memory_gb: float | None = None
) -> BatchPlan:
    """Rows per decode batch and tokens per forward that fit the memory left after loading.

    ``prompt_tokens``: the longest prompt (rows are decoded longest first, so it sizes the
    first, biggest batch). A third of the budget goes to prefill/alignment activations,
    the rest to the KV cache of the decoding rows.
    """
    from model.backbone import decoder
    from model.decoding import bucket_width, kv_bytes_per_token

    config = decoder(model).config
    device = decoder(model).embed_tokens.weight.device
    kv = kv_bytes_per_token(config)
    budget = available_bytes(device, max_memory_gb)
    if budget is None:
        rows = CPU_GEN_ROWS if max_rows is None else min(max_rows, CPU_GEN_ROWS)
        return BatchPlan(None, rows, CPU_PREFILL_TOKENS, CPU_ALIGN_TOKENS, kv, note="CPU: fixed sizes")
    per_token = activation_bytes_per_token(config)
    # Alignment forwards run with no cache held: a third of the budget. Prefill runs beside the
    # cache being filled, in packed chunks: an eighth (at most 16k tokens), so that its
    # activations do not set the number of rows; the rest is KV cache for the decoding rows.
    tokens = max(2048, min(65536, budget // 3 // per_token))
    prefill = max(2048, min(PREFILL_MAX_TOKENS, budget // 8 // per_token))
    vocab_bytes = config.vocab_size * 4  # one row of logits (fp32 at worst) per decoding row
    kv_row = kv * (bucket_width(prompt_tokens) + max_new_tokens)
    per_row = kv_row + vocab_bytes + 2 * per_token
    room = max(0, budget - prefill * per_token)
    rows = max(1, room // per_row)
    if max_rows is not None:
        rows = min(rows, max_rows)
    note = (
        f"{budget / GB:.1f} GB free for inference after loading: {rows} rows at the longest prompt "
        f"(more at shorter ones), {prefill} tokens a prefill, {tokens} tokens an alignment forward"
    )
    return BatchPlan(
        round(budget / GB, 2), int(rows), int(prefill), int(tokens), kv, int(room), int(per_row - kv_row), note
    )
