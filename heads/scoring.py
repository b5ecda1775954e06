"""Run backbone + head over encoded examples: pair probabilities, one forward per example."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from data.prompts import EncodedExample
from model.backbone import backbone_hidden

from .alignment import HeadOutput, NotePairHead


@torch.no_grad()
def head_outputs(backbone, head: NotePairHead, enc: EncodedExample) -> HeadOutput:
    """Raw head logits for one encoded example (prompt + its answer sentences)."""
    device = next(head.parameters()).device
    ids = torch.tensor([enc.input_ids], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    _, hidden = backbone_hidden(backbone, ids, mask, head.config.layer)
    return head(hidden[0], enc.note_spans, enc.answer_spans)


def pair_probabilities(backbone, head: NotePairHead, examples: Iterable[EncodedExample]) -> list[np.ndarray]:
    """[n_answer, n_note] sigmoid probabilities per example, in eval mode (restored after)."""
    was_training = (backbone.training, head.training)
    backbone.eval()
    head.eval()
    try:
        out = []
        for enc in examples:
            if not enc.answer_spans:
                out.append(np.zeros((0, len(enc.note_spans)), dtype=np.float32))
                continue
            logits = head_outputs(backbone, head, enc).pair_logits
            out.append(torch.sigmoid(logits.float()).cpu().numpy())
        return out
    finally:
        backbone.train(was_training[0])
        head.train(was_training[1])


def relevance_probabilities(backbone, head: NotePairHead,
                            examples: Iterable[EncodedExample]) -> list[np.ndarray] | None:
    """[n_note] sigmoid relevance probabilities per example (None if the head has no relevance output).

    Only the note sentences' states feed the relevance logit, and the backbone is causal,
    so whether the example holds the answer sentences after the note does not matter.
    """
    if getattr(head, "relevance_mlp", None) is None:
        return None
    was_training = (backbone.training, head.training)
    backbone.eval()
    head.eval()
    try:
        return [torch.sigmoid(head_outputs(backbone, head, enc).relevance_logits.float()).cpu().numpy()
                for enc in examples]
    finally:
        backbone.train(was_training[0])
        head.train(was_training[1])
