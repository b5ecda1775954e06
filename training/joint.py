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


def answer_token_loss(backbone, final_hidden: torch.Tensor, labels: torch.Tensor,
                      chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """Mean next-token CE over label positions, projecting only those positions to the vocabulary.

    The projection runs in chunks under activation checkpointing, so at most one chunk
    of [chunk x vocabulary] fp32 logits exists at a time (forward and backward): at
    Qwen3's 152k vocabulary a batch with 4k answer tokens would otherwise hold 2.5 GB
    of logits and as much again for their gradient.
    """
    chunk = LM_CHUNK_TOKENS if chunk is None else chunk
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return final_hidden.sum() * 0.0, 0
    states = final_hidden[:, :-1][keep]
    targets = targets[keep]
    weight = lm_head(backbone).weight
    if n <= chunk or not torch.is_grad_enabled():
        return _chunk_ce_sum(states, targets, weight) / n, n
    total = final_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_ce_sum, states[i:i + chunk], targets[i:i + chunk], weight, use_reentrant=False
        )
    return total / n, n


def alignment_losses(head, hidden: torch.Tensor, batch: dict, settings: LossSettings) -> dict[str, torch.Tensor]:
    """Pair BCE over examples with citations and relevance BCE over labelled notes."""
    pair_logits, rel_logits = head(
        hidden, batch["note_spans"], batch["answer_spans"], note_counts=batch["note_counts"],
        answer_counts=batch["answer_counts"],
    )
    # Zero-weighted terms keep every head parameter in the graph (DDP needs identical graphs).
    anchor = sum(p.sum() for p in pair_logits) * 0.0
    has_pairs = batch["has_pairs"].tolist()
    scored = [lg.reshape(-1) for lg, keep in zip(pair_logits, has_pairs) if keep and lg.numel() > 0]
    if scored:
        logits = torch.cat(scored)
        pos_weight = torch.tensor(settings.pos_weight, device=logits.device)
        align = F.binary_cross_entropy_with_logits(logits, batch["pair_targets"].to(logits), pos_weight=pos_weight)
    else:
        align = anchor
    relevance = anchor
    if rel_logits is not None:
        mask = batch["relevance_mask"]
        relevance = rel_logits.sum() * 0.0
        if bool(mask.any()):
            relevance = F.binary_cross_entropy_with_logits(rel_logits[mask], batch["relevance_targets"][mask].to(rel_logits))
    return {"align": align, "relevance": relevance}


def joint_losses(backbone, head, batch: dict, settings: LossSettings, head_layer: int = -1) -> dict[str, torch.Tensor]:
    """Total loss and its parts for one (micro-)batch, from a single backbone forward."""
    final, tapped = backbone_hidden(backbone, batch["input_ids"], batch["attention_mask"], head_layer)
    lm, n_answer = answer_token_loss(backbone, final, batch["labels"])
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
