"""Official Subtask 3 ROUGE: Hugging Face ``evaluate`` "rouge" defaults, per case.

``rouge_score.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)``
with its default tokenizer (lower-case, every run of characters outside ``a-z0-9`` is a
separator, so "café" gives "caf"). ROUGE-Lsum splits the texts only on the newline
characters already in them: no sentence splitter is added, so a one-line answer has
ROUGE-Lsum = ROUGE-L. Values are F-measures x100.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@lru_cache(maxsize=1)
def _scorer() -> Any:  # rouge_score.rouge_scorer.RougeScorer (untyped)
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def case_rouge(prediction: str, reference: str) -> dict[str, float]:
    """The four official ROUGE F-measures x100 of one prediction against its reference."""
    scores = _scorer().score(reference, prediction)  # rouge_score's order: (target, prediction)
    return {name: 100 * scores[name].fmeasure for name in ROUGE_TYPES}
