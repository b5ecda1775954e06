"""A small, predictable sentence splitter for contexts that come without sentence ids.

ArchEHR-QA notes arrive already split; emrQA contexts (and ROUGE-Lsum inputs) do not.
The rule, kept simple on purpose so that every stage numbers sentences the same way:

* a line break always ends a sentence;
* otherwise a sentence ends at ``.``, ``!`` or ``?`` (optionally followed by closing
  quotes or brackets) when whitespace and then an upper-case letter, a digit or an
  opening quote/bracket follow;
* except after a short list of common abbreviations (``Dr.``, ``e.g.``, ``vs.`` ...)
  and single-letter initials, which rarely end a sentence.

Decimals (``1.2``) never split because no whitespace follows the dot. Empty pieces are
dropped and whitespace inside a sentence is kept as written (stripped at the ends).
"""

from __future__ import annotations

import re

# Lower-cased, without the final dot.
ABBREVIATIONS = frozenset({"dr", "mr", "mrs", "ms", "prof", "st", "vs", "e.g", "i.e", "approx", "fig"})

_BOUNDARY = re.compile(r"""[.!?]["')\]]*\s+(?=["'(\[]?[A-Z0-9])""")


def _ends_with_abbreviation(piece: str) -> bool:
    words = piece.rstrip().split()
    if not words:
        return False
    last = words[-1].rstrip("\"')]").lower()
    if not last.endswith("."):
        return False
    stem = last[:-1].lstrip("(\"'[")
    return stem in ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences by the rule in the module docstring."""
    sentences: list[str] = []
    for line in text.splitlines():
        start = 0
        for match in _BOUNDARY.finditer(line):
            piece = line[start : match.end()]
            # The boundary match includes the punctuation; check the abbreviation on the
            # text up to and including it.
            if _ends_with_abbreviation(line[start : match.start() + 1]):
                continue
            sentences.append(piece.strip())
            start = match.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]
