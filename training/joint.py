"""The joint objective: LM loss on answer tokens + alignment BCE, from one forward pass.

One forward of the backbone over a padded batch gives the final hidden states; the
LM loss projects only the answer positions through the (tied) LM head, so the full
[tokens x vocabulary] logits are never built. The alignment head pools the chosen
layer's states over the note and answer sentence spans and scores every pair of each
example; examples without gold citations contribute the LM loss only.

:func:`joint_losses` is the pure computation (what a faster implementation replaces);
:class:`JointModel` wraps backbone + head as one ``nn.Module`` so that ``accelerate``
(DDP) sees a single forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from data.prompts import IGNORE_INDEX
from model.backbone import backbone_hidden, lm_head

from .config import TrainConfig


@dataclass
class LossSettings:
    # Defaults are TrainConfig's (one source); training passes the run's values.
    align_weight: float = TrainConfig.align_weight
    pos_weight: float = TrainConfig.pos_weight
    relevance_weight: float = TrainConfig.relevance_weight


LM_CHUNK_TOKENS = 1024


def _chunk_ce_sum(states: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = F.linear(states.to(weight.dtype), weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def answer_token_loss(
    backbone,
    final_hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk: int | None = None,
    positions: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Mean next-token CE over label positions, projecting only those positions to the vocabulary.

    ``positions``/``targets`` (training.batching.collate): the flat [B*(T-1)] positions with a
    label and their labels, found on the host, so no boolean mask makes the host wait here.
    The projection runs in chunks under activation checkpointing, so at most one chunk
    of [chunk x vocabulary] fp32 logits exists at a time (forward and backward): at
    Qwen3's 152k vocabulary a batch with 4k answer tokens would otherwise hold 2.5 GB
    of logits and as much again for their gradient.
    """
    chunk = LM_CHUNK_TOKENS if chunk is None else chunk
    if positions is None:
        keep = (labels[:, 1:] != IGNORE_INDEX).reshape(-1)
        positions = keep.nonzero().reshape(-1)
        targets = labels[:, 1:].reshape(-1)[positions]
    n = positions.shape[0]
    if n == 0:
        return final_hidden.sum() * 0.0, 0
    states = final_hidden[:, :-1].reshape(-1, final_hidden.shape[-1]).index_select(0, positions)
    weight = lm_head(backbone).weight
    if n <= chunk or not torch.is_grad_enabled():
        return _chunk_ce_sum(states, targets, weight) / n, n
    total = final_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_ce_sum, states[i : i + chunk], targets[i : i + chunk], weight, use_reentrant=False
        )
    return total / n, n


def alignment_losses(head, hidden: torch.Tensor, batch: dict, settings: LossSettings) -> dict[str, torch.Tensor]:
    """Pair BCE over the pairs of examples with citations and relevance BCE over labelled notes,
    gathered by collate's index tensors (no per-example loop, no host sync)."""
    pair_logits, rel_logits = head(hidden, batch["note_spans"], batch["answer_spans"], pair_index=batch["pair_index"])
    # Zero-weighted terms keep every head parameter in the graph (DDP needs identical graphs):
    # with no pair to score, the pair MLP still ran (on no rows).
    anchor = pair_logits.sum() * 0.0
    if pair_logits.shape[0] > 0:
        pos_weight = torch.tensor(settings.pos_weight, device=pair_logits.device)
        align = F.binary_cross_entropy_with_logits(
            pair_logits, batch["pair_targets"].to(pair_logits), pos_weight=pos_weight
        )
    else:
        align = anchor
    relevance = anchor
    if rel_logits is not None:
        labelled = batch["relevance_index"]
        relevance = rel_logits.sum() * 0.0
        if labelled.shape[0] > 0:
            relevance = F.binary_cross_entropy_with_logits(
                rel_logits.index_select(0, labelled), batch["relevance_labels"].to(rel_logits)
            )
    return {"align": align, "relevance": relevance}


def joint_losses(backbone, head, batch: dict, settings: LossSettings, head_layer: int = -1) -> dict[str, torch.Tensor]:
    """Total loss and its parts for one (micro-)batch, from a single backbone forward.

    A batch from ``collate`` (``right_padded``) reaches the attention without its padding mask:
    each row is padded on the right, so the causal mask alone keeps every real token from the
    pads, and nothing reads a pad's output. With the mask, SDPA could only take a masked kernel;
    causal alone takes the flash kernel, which also skips the masked half (with
    :func:`model.backbone.training_attention`; BENCHMARKS.md, issue 21, fifth pass). Any other
    batch (left padding, a hand-built one) keeps its mask."""
    mask = None if batch.get("right_padded") is True else batch["attention_mask"]
    final, tapped = backbone_hidden(backbone, batch["input_ids"], mask, head_layer)
    lm, n_answer = answer_token_loss(
        backbone, final, batch["labels"], positions=batch.get("answer_positions"), targets=batch.get("answer_targets")
    )
    out = {"lm": lm}
    total = lm
    if head is not None and batch["note_spans"].shape[0] > 0:
        parts = alignment_losses(head, tapped, batch, settings)
        total = total + settings.align_weight * parts["align"] + settings.relevance_weight * parts["relevance"]
        out.update(parts)
    out["loss"] = total
    out["answer_tokens"] = torch.tensor(n_answer)
    return out


class JointModel(nn.Module):
    """Backbone (PEFT) + optional alignment head as one module; forward returns the losses."""

    def __init__(self, backbone, head: nn.Module | None, settings: LossSettings):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.settings = settings

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        layer = self.head.config.layer if self.head is not None else -1
        return joint_losses(self.backbone, self.head, batch, self.settings, layer)
