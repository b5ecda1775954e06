"""Model FLOPs per token for MFU, stated once so both benchmark columns use the same count.

Counted: the forward matmuls of every decoder layer (q, k, v, o, gate, up, down),
the attention score and value products (causal: a token at position p attends to p
keys, so the mean over a row of length s is s/2), and the lm_head only for the tokens
that carry a label (the task needs no logits elsewhere). Training counts 2x forward:
the backward of a LoRA model needs activation gradients through the frozen weights
but no frozen-weight gradients; LoRA's own matmuls are negligible (r=16) and left
out; the recompute of gradient checkpointing is not counted (it is overhead, not
model work).
"""

from __future__ import annotations


def linear_params_per_layer(arch: dict) -> int:
    h = arch["hidden_size"]
    q = arch["num_attention_heads"] * arch["head_dim"]
    kv = arch["num_key_value_heads"] * arch["head_dim"]
    i = arch["intermediate_size"]
    return h * q + 2 * h * kv + q * h + 3 * h * i


def forward_flops(arch: dict, lengths: list[int], supervised_tokens: int) -> float:
    """Forward FLOPs for a batch of sequences with the given real lengths."""
    n_layers = arch["num_hidden_layers"]
    d_attn = arch["num_attention_heads"] * arch["head_dim"]
    tokens = sum(lengths)
    dense = 2 * linear_params_per_layer(arch) * n_layers * tokens
    # QK^T and AV: 2 products x 2 FLOPs x d_attn per (query, key) pair, causal.
    attention = sum(4 * d_attn * n_layers * (n * (n + 1) / 2) for n in lengths)
    lm_head = 2 * arch["hidden_size"] * arch["vocab_size"] * supervised_tokens
    return dense + attention + lm_head


def training_flops(arch: dict, lengths: list[int], supervised_tokens: int) -> float:
    return 2 * forward_flops(arch, lengths, supervised_tokens)


H100_BF16_PEAK = 790e12  # dense bf16 FLOP/s, the peak the issue names


def mfu(flops: float, seconds: float, peak: float = H100_BF16_PEAK) -> float:
    return flops / seconds / peak
