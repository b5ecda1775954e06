"""Word tokenisation shared by the lexical scorers (BM25, TF-IDF, word overlap).

Lower-cased alphanumeric runs (numbers kept: doses and lab values carry evidence),
English stop words dropped, and a light plural/suffix fold so that "stents" meets
"stent". Deliberately simple: the scorers are baselines, and their behaviour must be
easy to predict from the text.
"""

from __future__ import annotations

import re
from functools import cache

_TOKEN = re.compile(r"[a-z0-9]+")


def _fold(token: str) -> str:
    # Only the commonest English inflections; anything cleverer belongs to a stemmer.
    if len(token) > 4 and token.endswith("ies"):
        return token[:-3] + "y"
    if len(token) > 3 and token.endswith("s") and not token.endswith("ss") and not token.isdigit():
        return token[:-1]
    return token


@cache
def _stop_words() -> frozenset[str]:
    # scikit-learn's list, imported when first needed: importing scikit-learn (and the scipy and
    # pandas it brings) costs ~1 s, which infer.py with a checkpoint should not pay at load.
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def content_tokens(text: str) -> list[str]:
    """Lower-cased, stop-word-free, lightly folded word tokens of ``text``."""
    stop = _stop_words()
    return [_fold(t) for t in _TOKEN.findall(text.lower()) if t not in stop]
