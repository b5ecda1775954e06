"""Official Subtask 3 BLEU: Hugging Face ``evaluate`` "bleu" with its defaults, per case.

The organizers score each case as one prediction against one reference with
``evaluate.load("bleu")`` (``evaluate==0.4.0``) and average over cases. Its defaults:

* tokenizer 13a (the sacrebleu / mteval-v13a rules; sacrebleu's implementation is used
  here, split on whitespace, which is what ``evaluate``'s copy returns);
* ``max_order=4``, ``smooth=False``: modified n-gram precisions, geometric mean 0 as
  soon as any precision is 0 (so a prediction shorter than 4 tokens scores 0), and the
  brevity penalty ``exp(1 - ref_len / pred_len)`` when the prediction is shorter.

A prediction or reference whose 13a tokenization is empty makes the official code
divide by zero; :func:`case_bleu` raises :class:`EmptyTokenization` instead.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache
from typing import Callable

MAX_ORDER = 4


class EmptyTokenization(ValueError):
    """A text with no 13a tokens (e.g. ``"<skipped>"``): the official BLEU cannot score it."""


@lru_cache(maxsize=1)
def _tokenizer_13a() -> Callable[[str], str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()  # type: ignore[no-untyped-call]  # sacrebleu is untyped


def tokenize_13a(text: str) -> list[str]:
    """The 13a tokens of ``text`` (``<skipped>`` removed, punctuation split off)."""
    return _tokenizer_13a()(text).split()


def _ngram_counts(tokens: list[str], max_order: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_order + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def bleu_from_tokens(prediction: list[str], reference: list[str], max_order: int = MAX_ORDER) -> float:
    """BLEU (0..1) of one tokenized prediction against one tokenized reference, unsmoothed."""
    if not prediction or not reference:
        raise EmptyTokenization("BLEU needs a prediction and a reference with at least one token")
    overlap = _ngram_counts(prediction, max_order) & _ngram_counts(reference, max_order)
    matches = [0] * max_order
    for ngram, count in overlap.items():
        matches[len(ngram) - 1] += count
    precisions = []
    for n in range(1, max_order + 1):
        possible = len(prediction) - n + 1
        precisions.append(matches[n - 1] / possible if possible > 0 else 0.0)
    if min(precisions) <= 0:
        return 0.0
    geo_mean = math.exp(sum(math.log(p) / max_order for p in precisions))
    ratio = len(prediction) / len(reference)
    brevity = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return geo_mean * brevity


def case_bleu(prediction: str, reference: str) -> float:
    """Official per-case BLEU x100 (13a tokens, 4-grams, no smoothing)."""
    return 100 * bleu_from_tokens(tokenize_13a(prediction), tokenize_13a(reference))
