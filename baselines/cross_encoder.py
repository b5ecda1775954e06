"""A MiniLM cross-encoder fine-tuned on keyed cases' (answer sentence, note sentence) pairs.

Starts from the bundled all-MiniLM-L6-v2 encoder (or any BERT-style model id/folder)
with a fresh one-logit head, trained with class-weighted binary cross-entropy on every
pair of the training cases (linked = 1). Plain transformers + torch on CPU: a few
epochs over a dozen cases take about a minute. Saved as safetensors.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from data.records import Case
from plumbing.hf_loading import local_code_only

from .models import minilm_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def training_pairs(cases: Sequence[Case]) -> tuple[list[tuple[str, str]], list[float]]:
    pairs, labels = [], []
    for case in cases:
        gold = case.gold_pairs()
        for a in case.answer_sentences:
            for n in case.note_sentences:
                pairs.append((a.text, n.text))
                labels.append(1.0 if (a.sentence_id, n.sentence_id) in gold else 0.0)
    return pairs, labels


def train_cross_encoder(
    cases: Sequence[Case],
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    epochs: int = 6,
    batch_size: int = 16,
    learning_rate: float = 1e-4,
    max_length: int = 160,
    negatives_per_positive: int | None = 4,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Fine-tune a cross-encoder on the cases' pairs and save it (safetensors) to ``out_dir``."""
    from tqdm.auto import tqdm

    pairs, labels = training_pairs(cases)
    if not pairs or sum(labels) == 0:
        raise ValueError("cross-encoder training needs keyed cases with at least one linked pair")
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer, model = _fresh_cross_encoder(str(base) if base is not None else str(minilm_path()))
    model.train()
    positive_idx = [i for i, y in enumerate(labels) if y > 0]
    negative_idx = [i for i, y in enumerate(labels) if y == 0]
    # Links are rare (~1 pair in 10). Each epoch sees every positive and a fresh sample of
    # negatives (CPU time), and the loss weights positives by what remains of the imbalance.
    n_neg = (
        len(negative_idx)
        if negatives_per_positive is None
        else min(len(negative_idx), negatives_per_positive * len(positive_idx))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(max(1.0, n_neg / len(positive_idx))))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    per_epoch = len(positive_idx) + n_neg
    steps = epochs * ((per_epoch + batch_size - 1) // batch_size)
    # Short warm-up, then constant: with ~100 steps in all, a decaying rate stops the new
    # head before it has separated the classes (measured: it then predicts 0.5 everywhere).
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    bar = tqdm(total=steps, desc="cross-encoder", unit="step", disable=not progress)
    for _ in range(epochs):
        order = positive_idx + random.sample(negative_idx, n_neg)
        random.shuffle(order)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [pairs[i][0] for i in idx],
                [pairs[i][1] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            logits = model(**batch).logits.squeeze(-1)
            loss = loss_fn(logits, torch.tensor([labels[i] for i in idx]))
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return _save_cross_encoder(tokenizer, model, Path(out_dir))


def _fresh_cross_encoder(source: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, encoder with a new one-logit head) from a BERT-style model id or folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(source)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, use_safetensors=True, **local_code_only()
        )
    finally:
        hf_logging.set_verbosity(previous)
    return tokenizer, model


def _save_cross_encoder(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, out: Path) -> Path:
    from plumbing.atomic import fsync_tree

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    fsync_tree(out)  # the umask's permissions (safetensors writes 0600)
    return out


@torch.no_grad()
def predict_pairs(loaded, pairs: Sequence[tuple[str, str]], batch_size: int = 64, max_length: int = 160) -> np.ndarray:
    """Link probabilities for (answer text, note text) pairs from a loaded (tokenizer, model)."""
    tokenizer, model = loaded
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = tokenizer(
            [a for a, _ in chunk],
            [n for _, n in chunk],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out.append(torch.sigmoid(model(**batch).logits.squeeze(-1).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
