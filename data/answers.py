"""Subtask 3 answer post-processing: what a generated text must become before submission
(used by inference and cross-validation alike, so it lives below both)."""

from __future__ import annotations

import re

from .submission import CITATION_MARKER, MAX_WORDS, has_13a_tokens, truncate_words

_THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_SPECIAL_TOKEN = re.compile(r"<\|[^|>]*\|>")


def clean_generated_answer(text: str, max_words: int = MAX_WORDS) -> str:
    """Plain answer text: no reasoning block, special tokens or citation markers; at most
    ``max_words`` words, cut at a sentence end when one is within the limit. Empty when
    nothing is left, or nothing the official BLEU can tokenize (e.g. ``"<skipped>"``)."""
    text = _THINK_BLOCK.sub(" ", text)
    text = _SPECIAL_TOKEN.sub(" ", text)
    # The validator rejects "[3]" / "|3|" markers, and Subtask 3 answers carry no citations.
    text = CITATION_MARKER.sub(" ", text)
    text = " ".join(text.split())
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    text = truncate_words(text, max_words) if text else ""
    return text if has_13a_tokens(text) else ""
