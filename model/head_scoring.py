"""Backbone + alignment head over encoded examples, two ways:

* padded batches through the model's own forward: the plain path's pair scorer
  (:meth:`model.loaded_export.LoadedExport.score_all`) and cross-validation;
* packed forwards without padding (:func:`packed_head_pass`, :mod:`model.packed`): the fast
  engine's alignment and relevance (:mod:`inference.fast`) and export calibration.

It lives in ``model/`` because it runs the backbone: ``model`` may use ``heads``, never the reverse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, TypeVar

import numpy as np
import torch
from torch import nn

from data.prompts import EncodedExample, encode_examples, example_from_case
from data.records import Case
from heads.alignment import HeadOutput, NotePairHead, pair_rows

from .backbone import backbone_hidden
from .packed import pack, packed_forward, to_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """``modules`` in eval mode (no dropout) for the block, each back in its own mode after,
    also when the block raises: scoring in the middle of training leaves training as it was."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@torch.no_grad()
def head_outputs(backbone: nn.Module, head: NotePairHead, enc: EncodedExample) -> HeadOutput:
    """Raw head logits for one encoded example (prompt + its answer sentences)."""
    device = next(head.parameters()).device
    ids = torch.tensor([enc.input_ids], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    _, hidden = backbone_hidden(backbone, ids, mask, head.config.layer)
    return head(hidden[0], enc.note_spans, enc.answer_spans)


def encode_for_scoring(
    tokenizer: PreTrainedTokenizerBase, cases: Sequence[Case]
) -> tuple[list[np.ndarray | None], list[tuple[int, EncodedExample]]]:
    """What the pair scorers start from: a case without answer sentences already has its empty
    [0, n_note] result; every other case is encoded (prompt + answer sentences), with its index."""
    out: list[np.ndarray | None] = [None] * len(cases)
    scored = [i for i, case in enumerate(cases) if case.answer_sentences]
    for i, case in enumerate(cases):
        if not case.answer_sentences:
            out[i] = np.zeros((0, len(case.note_sentences)), dtype=np.float32)
    examples = [example_from_case(cases[i], with_answer=True) for i in scored]
    return out, list(zip(scored, encode_examples(tokenizer, examples)))


@torch.no_grad()
def group_head_outputs(
    backbone: nn.Module,
    head: NotePairHead,
    group: Sequence[EncodedExample],
    pad_id: int,
    device: torch.device,
    width: int | None = None,
) -> list[HeadOutput]:
    """One forward over ``group``, right-padded to ``width`` (default: its longest example):
    the head's raw outputs per example. Causal attention keeps every real token's state
    independent of the padding after it. Callers choose the groups and the mode."""
    width = width or max(len(enc.input_ids) for enc in group)
    ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for row, enc in enumerate(group):
        ids[row, : len(enc.input_ids)] = torch.tensor(enc.input_ids)
        mask[row, : len(enc.input_ids)] = 1
    _, hidden = backbone_hidden(backbone, ids.to(device), mask.to(device), head.config.layer)
    return [head(hidden[row], enc.note_spans, enc.answer_spans) for row, enc in enumerate(group)]


ArrayOrTensor = TypeVar("ArrayOrTensor", torch.Tensor, np.ndarray)


@dataclass
class PackedHeadPass:
    """One head pass over a packed forward's examples, flat: pair logits [sum of n_a * n_n]
    (each example's [n_a, n_n] row-major, one after another) and relevance logits [sum of n_n]
    (None without a relevance output). Flat, so that reading a pack costs one copy."""

    output: HeadOutput
    shapes: list[tuple[int, int]]  # (answer sentences, note sentences) of each example

    def split(
        self, pairs: ArrayOrTensor, relevance: ArrayOrTensor | None
    ) -> list[tuple[ArrayOrTensor, ArrayOrTensor | None]]:
        """Each example's (pairs [n_a, n_n], relevance [n_n] or None), as views of ``pairs`` and
        ``relevance``: this pass's outputs, or anything computed from them element by element
        (probabilities, on the device or copied to the host)."""
        parts: list[tuple[ArrayOrTensor, ArrayOrTensor | None]] = []
        pair_at = note_at = 0
        for n_answers, n_notes in self.shapes:
            pair = pairs[pair_at : pair_at + n_answers * n_notes].reshape(n_answers, n_notes)
            parts.append((pair, None if relevance is None else relevance[note_at : note_at + n_notes]))
            pair_at, note_at = pair_at + n_answers * n_notes, note_at + n_notes
        return parts


@torch.no_grad()
def packed_head_pass(
    model: nn.Module, head: NotePairHead, group: Sequence[EncodedExample], attention: str
) -> PackedHeadPass:
    """One packed forward over ``group`` (no padding, stopping at the head's layer) and one head
    pass over all of its examples. Nothing here waits for the GPU: the host can queue the next
    pack while this one runs. One pass, not one a case: a case's head call was ~25 kernel
    launches and two host syncs (issue 22)."""
    device = next(head.parameters()).device
    packed = pack([enc.input_ids for enc in group], device)
    hidden, _ = packed_forward(model, packed, tap=head.config.layer, attention=attention)
    note_spans: list[tuple[int, int, int]] = []
    answer_spans: list[tuple[int, int, int]] = []
    pairs: list[tuple[int, int]] = []
    for start, enc in zip(packed.starts, group):  # spans into the packed stream, pairs within each case
        pairs += pair_rows(len(answer_spans), len(note_spans), len(enc.answer_spans), len(enc.note_spans))
        note_spans += [(0, start + a, start + b) for a, b in enc.note_spans]
        answer_spans += [(0, start + a, start + b) for a, b in enc.answer_spans]
    note_t, answer_t, pair_index = (
        to_device(torch.tensor(x, dtype=torch.long).reshape(-1, w), device)
        for x, w in ((note_spans, 3), (answer_spans, 3), (pairs, 2))
    )
    out = head(hidden, note_t, answer_t, pair_index=pair_index)
    return PackedHeadPass(out, [(len(enc.answer_spans), len(enc.note_spans)) for enc in group])


@torch.no_grad()
def packed_head_outputs(
    model: nn.Module, head: NotePairHead, group: Sequence[EncodedExample], attention: str
) -> list[HeadOutput]:
    """:func:`packed_head_pass`'s outputs per example (views of the pass's): export calibration's
    packed forwards."""
    run = packed_head_pass(model, head, group, attention)
    return [HeadOutput(p, r) for p, r in run.split(run.output.pair_logits, run.output.relevance_logits)]


@torch.no_grad()
def group_pair_probabilities(
    backbone: nn.Module,
    head: NotePairHead,
    group: Sequence[EncodedExample],
    pad_id: int,
    device: torch.device,
    width: int | None = None,
) -> list[np.ndarray]:
    """[n_answer, n_note] sigmoid probabilities per example of one padded forward
    (:func:`group_head_outputs`)."""
    return [
        torch.sigmoid(out.pair_logits.float()).cpu().numpy()
        for out in group_head_outputs(backbone, head, group, pad_id, device, width)
    ]


@torch.no_grad()
def pair_probabilities(
    backbone: nn.Module, head: NotePairHead, examples: Sequence[EncodedExample], batch_size: int = 8, pad_id: int = 0
) -> list[np.ndarray]:
    """[n_answer, n_note] sigmoid probabilities per example, in eval mode (restored after).

    Several examples share a forward, longest first and right-padded: causal attention keeps
    every real token's state independent of the padding (and of the pad id).
    """
    out: list[np.ndarray | None] = [None] * len(examples)
    todo = []
    for i, enc in enumerate(examples):
        if enc.answer_spans:
            todo.append((i, enc))
        else:
            out[i] = np.zeros((0, len(enc.note_spans)), dtype=np.float32)
    todo.sort(key=lambda item: -len(item[1].input_ids))
    device = next(head.parameters()).device
    with eval_mode(backbone, head):
        for start in range(0, len(todo), batch_size):
            group = todo[start : start + batch_size]
            probs = group_pair_probabilities(backbone, head, [enc for _, enc in group], pad_id, device)
            for (i, _), p in zip(group, probs):
                out[i] = p
    return out  # type: ignore[return-value]


@torch.no_grad()
def relevance_probabilities(
    backbone: nn.Module, head: NotePairHead, examples: Sequence[EncodedExample]
) -> list[np.ndarray] | None:
    """[n_note] sigmoid relevance probabilities per example (None if the head has no relevance output).

    Only the note sentences' states feed the relevance logit, and the backbone is causal,
    so whether the example holds the answer sentences after the note does not matter.
    """
    if getattr(head, "relevance_mlp", None) is None:
        return None
    probs = []
    with eval_mode(backbone, head):
        for enc in examples:
            logits = head_outputs(backbone, head, enc).relevance_logits
            assert logits is not None  # the head has a relevance output (checked above)
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
    return probs
