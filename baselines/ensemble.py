"""The retrieval ensemble's settings, their JSON file, and their tuning on keyed cases.

An :class:`EnsembleConfig` says which component scorers to mix (weights over
per-answer min-max normalised scores), how to cut the mix into links (threshold,
absolute or relative to each answer's best, per-answer cap, top-1 fallback) and
where a fine-tuned cross-encoder lives, if one is used. :func:`fit_ensemble` picks
all of that by grid search for pooled micro F1 over (answer, evidence) pairs.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from plumbing.atomic import write_json_atomic
from plumbing.errors import InputError
from data.records import Case
from model.calibration import pooled_micro_f1

from .aligners import COMPONENTS, EnsembleAligner, combine_scores, make_component
from .linking import MODES, link_pairs

FORMAT = "archehr-retrieval-ensemble/1"
DEFAULT_COMPONENTS = ("bm25", "tfidf", "minilm")
HAND_SET_LABEL = "hand-set defaults, not tuned on any data"
RELATIVE_GRID = tuple(round(0.40 + 0.05 * i, 2) for i in range(13))  # 0.40 .. 1.00
ABSOLUTE_GRID = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))  # 0.30 .. 0.95
CAP_GRID = (None, 1, 2, 3)

ComponentScores = dict[str, dict[str, np.ndarray]]  # component name -> case_id -> [n_answer, n_note]


@dataclass
class EnsembleConfig:
    # Hand-set defaults: the neural cosine carries paraphrase, the lexical scores carry
    # exact doses and names; link what is close to each answer's best, at most three.
    weights: dict[str, float] = field(default_factory=lambda: {"bm25": 0.3, "tfidf": 0.2, "minilm": 0.5})
    threshold: float = 0.75
    mode: str = "relative"
    max_per_answer: int | None = 3
    top1_fallback: bool = False
    # Folder of a fine-tuned cross-encoder (component "cross"); relative paths are
    # resolved against the JSON file's folder.
    cross_encoder: str | None = None
    tuned_on: str = HAND_SET_LABEL
    train_micro_f1: float | None = None

    def __post_init__(self) -> None:
        unknown = [n for n in self.weights if n not in COMPONENTS]
        if unknown:
            raise ValueError(f"unknown ensemble component(s) {unknown}; choose from {list(COMPONENTS)}")
        if not any(w > 0 for w in self.weights.values()) or any(w < 0 for w in self.weights.values()):
            raise ValueError("ensemble weights must be >= 0 with at least one > 0")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if not math.isfinite(self.threshold):
            raise ValueError("threshold must be a finite number")
        if self.max_per_answer is not None and self.max_per_answer < 1:
            raise ValueError("max_per_answer must be >= 1 or null")
        if self.weights.get("cross", 0) > 0 and not self.cross_encoder:
            raise ValueError("weight on 'cross' needs a cross_encoder folder")

    @property
    def active_components(self) -> list[str]:
        return [n for n, w in self.weights.items() if w > 0]

    def link(
        self, scores: np.ndarray, max_per_answer: int | None = None, top1_fallback: bool | None = None
    ) -> list[list[int]]:
        """Links from ensemble scores; the optional arguments override the stored cap and fallback."""
        return link_pairs(
            scores,
            self.threshold,
            self.mode,  # type: ignore[arg-type]
            max_per_answer=self.max_per_answer if max_per_answer is None else max_per_answer,
            top1_fallback=self.top1_fallback if top1_fallback is None else top1_fallback,
        )

    def build(self, bi_encoder: str | Path | None = None) -> EnsembleAligner:
        """The scorer these settings describe (component models load lazily, once per process)."""
        parts = {
            n: make_component(n, cross_encoder_dir=self.cross_encoder, bi_encoder=bi_encoder)
            for n in self.active_components
        }
        return EnsembleAligner(self.weights, parts)

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_json_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EnsembleConfig":
        path = Path(path)
        if not path.is_file():
            raise InputError("ensemble file not found", path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, RecursionError, UnicodeDecodeError):
            raise InputError("invalid JSON", path) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f'not an ensemble file (expected "format": "{FORMAT}")', path)
        known = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(data) - known - {"format", "comment"})
        if extra:
            raise InputError(f"unknown ensemble field(s) {extra}", path)
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            weights = kwargs.get("weights", {})
            if not isinstance(weights, dict) or not all(isinstance(w, (int, float)) for w in weights.values()):
                raise ValueError("weights must map component names to numbers")
            if "threshold" in kwargs and not isinstance(kwargs["threshold"], (int, float)):
                raise ValueError("threshold must be a number")
            config = cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise InputError(f"bad ensemble settings: {err}", path) from None
        if config.cross_encoder:
            cross = Path(config.cross_encoder)
            config.cross_encoder = str(cross if cross.is_absolute() else (path.parent / cross).resolve())
            if not Path(config.cross_encoder).is_dir():
                raise InputError(f"cross-encoder folder not found: {config.cross_encoder}", path)
        return config


def gold_matrix(case: Case) -> np.ndarray:
    """[n_answer, n_note] booleans: True where the key links the pair."""
    col = {nid: j for j, nid in enumerate(case.note_ids)}
    out = np.zeros((len(case.answer_sentences), len(case.note_sentences)), dtype=bool)
    for i, a in enumerate(case.answer_sentences):
        for e in a.citations:
            out[i, col[e]] = True
    return out


def links_matrix(links: list[list[int]], shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for i, cols in enumerate(links):
        out[i, cols] = True
    return out


class _RankedScores:
    """One score matrix with what every linking rule needs precomputed, so that the grid
    search applies a rule with a few array operations. Gives the same links as
    :func:`link_pairs` (checked in the tests)."""

    def __init__(self, scores: np.ndarray):
        self.scores = scores
        order = np.argsort(-scores, axis=1, kind="stable")
        self.rank = np.empty_like(order)
        np.put_along_axis(self.rank, order, np.arange(scores.shape[1])[None, :].repeat(len(scores), 0), axis=1)
        self.best = scores.max(axis=1, keepdims=True) if scores.size else np.zeros((len(scores), 1))
        self.varies = (self.best > scores.min(axis=1, keepdims=True)) if scores.size else self.best > 0

    def links(self, threshold: float, mode: str, cap: int | None, fallback: bool) -> np.ndarray:
        if mode == "absolute":
            passed = self.scores >= threshold
        else:
            passed = (self.scores >= threshold * self.best) & (self.best > 0)
        if fallback:
            empty = ~passed.any(axis=1, keepdims=True) & self.varies
            passed = passed | (empty & (self.rank == 0))
        if cap is not None:
            passed = passed & (self.rank < cap)
        return passed


def score_components(
    cases: Sequence[Case],
    names: Sequence[str] = DEFAULT_COMPONENTS,
    cross_encoder_dir: str | Path | None = None,
    bi_encoder: str | Path | None = None,
) -> ComponentScores:
    """Every named component's score matrix for every case (computed once, reused by tuning)."""
    out: ComponentScores = {}
    for name in names:
        scorer = make_component(name, cross_encoder_dir=cross_encoder_dir, bi_encoder=bi_encoder)
        out[name] = {c.case_id: scorer.score(c) for c in cases}
    return out


def weight_grid(names: Sequence[str], step: float) -> list[dict[str, float]]:
    """All weightings of ``names`` in multiples of ``step`` that sum to 1."""
    n_steps = round(1 / step)
    grid = []
    for combo in itertools.product(range(n_steps + 1), repeat=len(names)):
        if sum(combo) == n_steps:
            grid.append({n: round(k / n_steps, 6) for n, k in zip(names, combo)})
    # Fewer components first, so that tuning ties go to the simpler ensemble.
    return sorted(grid, key=lambda w: sum(1 for v in w.values() if v > 0))


def _keyed_cases(cases: Sequence[Case]) -> list[Case]:
    usable = [c for c in cases if c.answer_sentences]
    if not usable or not any(c.has_citations() for c in usable):
        raise InputError("tuning needs keyed cases with answer sentences and at least one citation")
    return usable


def fit_ensemble(
    cases: Sequence[Case],
    components: Sequence[str] = DEFAULT_COMPONENTS,
    *,
    component_scores: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    cross_encoder_dir: str | Path | None = None,
    weight_step: float = 0.25,
    tuned_on: str | None = None,
) -> EnsembleConfig:
    """Grid-search weights, threshold mode/value, cap and fallback for pooled micro F1.

    ``component_scores`` (name -> case_id -> matrix) skips re-scoring, so that
    cross-validation scores each case once; it must cover every case and component.
    Ties keep the earliest grid point: fewer components, then relative before absolute
    rules, lower thresholds, no cap before caps.
    """
    usable = _keyed_cases(cases)
    if component_scores is None:
        component_scores = score_components(usable, components, cross_encoder_dir=cross_encoder_dir)
    golds = [gold_matrix(c) for c in usable]
    rules = [("relative", t, cap, False) for t in RELATIVE_GRID for cap in CAP_GRID]
    rules += [("absolute", t, cap, fb) for t in ABSOLUTE_GRID for cap in CAP_GRID for fb in (False, True)]
    best: tuple[float, dict[str, float], tuple] | None = None
    for weights in weight_grid(components, weight_step):
        combined = [
            _RankedScores(combine_scores({n: component_scores[n][c.case_id] for n in components}, weights))
            for c in usable
        ]
        for mode, threshold, cap, fallback in rules:
            f1 = pooled_micro_f1((s.links(threshold, mode, cap, fallback) for s in combined), golds)
            if best is None or f1 > best[0] + 1e-12:
                best = (f1, weights, (mode, threshold, cap, fallback))
    assert best is not None
    f1, weights, (mode, threshold, cap, fallback) = best
    return EnsembleConfig(
        weights={n: w for n, w in weights.items() if w > 0},
        threshold=threshold,
        mode=mode,
        max_per_answer=cap,
        top1_fallback=fallback,
        cross_encoder=str(cross_encoder_dir) if cross_encoder_dir and weights.get("cross", 0) > 0 else None,
        tuned_on=tuned_on or f"{len(usable)} keyed cases",
        train_micro_f1=round(100 * f1, 2),
    )
