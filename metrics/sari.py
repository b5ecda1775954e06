"""SARI (Xu et al., 2016), the variant of the widely used tensor2tensor/EASSE-style code.

For each n in 1..4, with source S, candidate C and references R (n-gram counts; the
source and candidate counts are multiplied by the number of references so that they
compare with the pooled reference counts):

* keep: F1 of precision = mean over kept n-grams (S & C) of min(kept, R) / kept, and
  recall = sum of min(kept, R) over kept n-grams / total count of (S & R);
* delete: precision only = mean over deleted n-grams (S - C) of ((S - C) - R) / (S - C);
* add: F1 over n-gram *types*: added = C - S (as sets), good = added & R, all = R - S.

Empty denominators give 1 (a candidate that matches exactly is not punished). The
score is the mean of the keep, delete and add scores, each averaged over n, x100.
"""

from __future__ import annotations

from collections import Counter

MAX_N = 4


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _scale(counter: Counter[tuple[str, ...]], factor: int) -> Counter[tuple[str, ...]]:
    return Counter({k: v * factor for k, v in counter.items()})


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _sari_n(
    source: Counter[tuple[str, ...]], candidate: Counter[tuple[str, ...]], refs: Counter[tuple[str, ...]], num_refs: int
) -> tuple[float, float, float]:
    src = _scale(source, num_refs)
    cand = _scale(candidate, num_refs)

    kept = src & cand
    kept_good = kept & refs
    keep_all = src & refs
    keep_p = sum(kept_good[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
    keep_r = sum(kept_good[g] for g in kept) / sum(keep_all.values()) if keep_all else 1.0

    deleted = src - cand
    deleted_good = deleted - refs
    del_p = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0

    added = set(candidate) - set(source)
    added_good = added & set(refs)
    add_all = set(refs) - set(source)
    add_p = len(added_good) / len(added) if added else 1.0
    add_r = len(added_good) / len(add_all) if add_all else 1.0

    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def _sari_fraction(keeps: list[float], deletes: list[float], adds: list[float]) -> float:
    return (sum(keeps) / len(keeps) + sum(deletes) / len(deletes) + sum(adds) / len(adds)) / 3


def _sentence_fraction(source: str, prediction: str, references: list[str]) -> float:
    if not references:
        raise ValueError("SARI needs at least one reference")
    src_tokens, cand_tokens = source.split(), prediction.split()
    ref_tokens = [r.split() for r in references]
    keeps, deletes, adds = [], [], []
    for n in range(1, MAX_N + 1):
        pooled_refs: Counter[tuple[str, ...]] = Counter()
        for tokens in ref_tokens:
            pooled_refs.update(_ngrams(tokens, n))
        k, d, a = _sari_n(_ngrams(src_tokens, n), _ngrams(cand_tokens, n), pooled_refs, len(references))
        keeps.append(k)
        deletes.append(d)
        adds.append(a)
    # Average each operation over n first, then the three operations, then scale: the
    # order of the reference code, so results agree to the last bit.
    return _sari_fraction(keeps, deletes, adds)


def sentence_sari(source: str, prediction: str, references: list[str]) -> float:
    """SARI of one prediction (whitespace tokens, as given), x100."""
    return 100 * _sentence_fraction(source, prediction, references)


def corpus_sari(sources: list[str], predictions: list[str], references: list[list[str]]) -> float:
    """Mean sentence SARI over a corpus, x100."""
    if not (len(sources) == len(predictions) == len(references)):
        raise ValueError("sources, predictions and references must have the same length")
    if not predictions:
        raise ValueError("no predictions")
    total = sum(_sentence_fraction(s, p, r) for s, p, r in zip(sources, predictions, references))
    return 100 * total / len(predictions)
