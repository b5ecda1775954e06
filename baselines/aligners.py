"""Subtask 4 scorers behind one protocol: ``score(case) -> [n_answer, n_note]``.

Every aligner scores each (answer sentence, note sentence) pair of a case; turning
scores into links is :func:`baselines.linking.link_pairs`' job, so the same scorer can
be cut by an absolute threshold, a fraction of each answer's best score, a per-answer
cap or a top-1 rule. Rows follow ``case.answer_sentences``, columns
``case.note_sentences``.

Scorers: BM25 (rank-bm25), TF-IDF cosine (scikit-learn), MiniLM bi-encoder cosine,
a fine-tuned MiniLM cross-encoder, raw word overlap (a trivial reference), and a
weighted ensemble of per-answer min-max normalised scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import numpy as np
from rank_bm25 import BM25Okapi

from data.records import Case

from .models import load_bi_encoder, load_cross_encoder
from .text import content_tokens


@runtime_checkable
class Aligner(Protocol):
    """Scores every (answer sentence, note sentence) pair of a case; higher = more likely linked."""

    name: str

    def score(self, case: Case) -> np.ndarray:
        """Float array of shape ``[len(case.answer_sentences), len(case.note_sentences)]``."""
        ...


def _empty(case: Case) -> np.ndarray:
    return np.zeros((len(case.answer_sentences), len(case.note_sentences)), dtype=np.float64)


class BM25Aligner:
    """BM25 (Okapi) with the case's note sentences as the collection, each answer sentence as a query."""

    name = "bm25"

    def __init__(self, k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b

    def score(self, case: Case) -> np.ndarray:
        out = _empty(case)
        docs = [content_tokens(s.text) for s in case.note_sentences]
        if not out.size or not any(docs):
            return out  # no words to match (BM25Okapi would divide by a zero average length)
        bm25 = BM25Okapi(docs, k1=self.k1, b=self.b)
        for i, answer in enumerate(case.answer_sentences):
            query = content_tokens(answer.text)
            if query:
                out[i] = bm25.get_scores(query)
        return out


class TfidfAligner:
    """Cosine of TF-IDF vectors (unigrams + bigrams, sublinear tf), fitted on the case's own sentences."""

    name = "tfidf"

    def score(self, case: Case) -> np.ndarray:
        out = _empty(case)
        if not out.size:
            return out
        notes = [s.text for s in case.note_sentences]
        answers = [a.text for a in case.answer_sentences]
        from sklearn.feature_extraction.text import TfidfVectorizer  # here: ~1 s of imports, for this aligner only

        vectorizer = TfidfVectorizer(
            tokenizer=content_tokens, lowercase=False, token_pattern=None, ngram_range=(1, 2), sublinear_tf=True
        )
        try:
            matrix = vectorizer.fit_transform(notes + answers)
        except ValueError:  # empty vocabulary: nothing but stop words and punctuation
            return out
        note_m, answer_m = matrix[: len(notes)], matrix[len(notes) :]
        # Rows are L2-normalised by the vectorizer, so the dot product is the cosine.
        return np.asarray((answer_m @ note_m.T).todense(), dtype=np.float64)


class WordOverlapAligner:
    """Number of distinct content words an answer sentence shares with a note sentence (trivial reference)."""

    name = "overlap"

    def score(self, case: Case) -> np.ndarray:
        out = _empty(case)
        notes = [set(content_tokens(s.text)) for s in case.note_sentences]
        for i, answer in enumerate(case.answer_sentences):
            words = set(content_tokens(answer.text))
            out[i] = [len(words & n) for n in notes]
        return out


class BiEncoderAligner:
    """Cosine of sentence embeddings (all-MiniLM-L6-v2 from its package by default; any ST model id or path)."""

    name = "minilm"

    def __init__(self, model: str | Path | None = None, batch_size: int = 64):
        self.model = model
        self.batch_size = batch_size

    def score(self, case: Case) -> np.ndarray:
        out = _empty(case)
        if not out.size:
            return out
        encoder = load_bi_encoder(self.model)
        notes = encoder.encode(
            [s.text for s in case.note_sentences],
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        answers = encoder.encode(
            [a.text for a in case.answer_sentences],
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return (answers @ notes.T).astype(np.float64)


class CrossEncoderAligner:
    """Probability from a cross-encoder fine-tuned on linked pairs (see :mod:`baselines.cross_encoder`)."""

    name = "cross"

    def __init__(self, model_dir: str | Path, batch_size: int = 64):
        self.model_dir = str(model_dir)
        self.batch_size = batch_size

    def score(self, case: Case) -> np.ndarray:
        from .cross_encoder import predict_pairs

        out = _empty(case)
        if not out.size:
            return out
        pairs = [(a.text, n.text) for a in case.answer_sentences for n in case.note_sentences]
        probs = predict_pairs(load_cross_encoder(self.model_dir), pairs, batch_size=self.batch_size)
        return probs.reshape(out.shape).astype(np.float64)


def normalise_rows(scores: np.ndarray) -> np.ndarray:
    """Min-max normalise each answer's row to [0, 1]; a constant row carries no preference and becomes 0."""
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0)
    if scores.size == 0:
        return scores.copy()
    low = scores.min(axis=1, keepdims=True)
    span = scores.max(axis=1, keepdims=True) - low
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(span > 1e-12, (scores - low) / np.where(span > 1e-12, span, 1.0), 0.0)
    return out


def combine_scores(component_scores: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted mean of row-normalised component scores (components with weight 0 are ignored)."""
    used = {name: w for name, w in weights.items() if w > 0}
    if not used:
        raise ValueError("an ensemble needs at least one component with a positive weight")
    total = sum(used.values())
    combined = None
    for name, w in used.items():
        part = normalise_rows(component_scores[name]) * (w / total)
        combined = part if combined is None else combined + part
    return combined


def make_component(
    name: str, cross_encoder_dir: str | Path | None = None, bi_encoder: str | Path | None = None
) -> Aligner:
    """A component scorer by its ensemble name."""
    if name == "bm25":
        return BM25Aligner()
    if name == "tfidf":
        return TfidfAligner()
    if name == "minilm":
        return BiEncoderAligner(bi_encoder)
    if name == "overlap":
        return WordOverlapAligner()
    if name == "cross":
        if cross_encoder_dir is None:
            raise ValueError("the 'cross' component needs a fine-tuned cross-encoder folder")
        return CrossEncoderAligner(cross_encoder_dir)
    raise ValueError(f"unknown aligner component {name!r}; choose from {sorted(COMPONENTS)}")


COMPONENTS = ("bm25", "tfidf", "minilm", "overlap", "cross")


class EnsembleAligner:
    """Weighted mean of per-answer min-max normalised component scores."""

    name = "ensemble"

    def __init__(self, weights: Mapping[str, float], components: Mapping[str, Aligner]):
        missing = [n for n, w in weights.items() if w > 0 and n not in components]
        if missing:
            raise ValueError(f"no scorer for ensemble component(s) {missing}")
        self.weights = dict(weights)
        self.components = dict(components)

    def component_scores(self, case: Case) -> dict[str, np.ndarray]:
        return {n: self.components[n].score(case) for n, w in self.weights.items() if w > 0}

    def score(self, case: Case) -> np.ndarray:
        if not case.answer_sentences:
            return _empty(case)
        return combine_scores(self.component_scores(case), self.weights)
