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
