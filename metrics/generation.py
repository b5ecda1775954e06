"""Subtask 3 answer-quality metrics, per case then averaged over cases (all x100).

* BLEU (:mod:`metrics.bleu`) and ROUGE-1/2/L/Lsum (:mod:`metrics.rouge`): the official
  definitions (Hugging Face ``evaluate`` defaults), equal to the organizers' values to 1e-6.
* SARI (:mod:`metrics.sari`): source = patient narrative; texts lower-cased and
  tokenised with sacrebleu's 13a tokenizer first.
* BERTScore (:mod:`metrics.bertscore`): official only with a local distilbert-base-uncased;
  another model is stored as ``bertscore_unofficial``; otherwise not computed.
* AlignScore and MEDCON need models / a UMLS licence this project does not ship:
  always reported as not computed (``None``), never as 0.

The official overall score is the mean of the six metrics in :data:`OVERALL_METRICS`;
it is reported (as ``overall_score``) only when all six were computed. Otherwise the
mean of the k computed ones is reported as "mean of k of 6 metrics", never under the
official name.
"""

from __future__ import annotations

from typing import Any

from dataclasses import dataclass, field

from .bertscore import UNOFFICIAL_NAME, bertscore_f1
from .bleu import case_bleu
from .rouge import case_rouge
from .sari import sentence_sari

METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "sari", "bertscore", "alignscore", "medcon")
OVERALL_METRICS = ("bleu", "rougeLsum", "sari", "bertscore", "alignscore", "medcon")
NEVER_COMPUTED = {
    "alignscore": "not computed: needs the AlignScore checkpoint, which this project does not ship",
    "medcon": "not computed: needs QuickUMLS with a UMLS licence, which this project does not have",
}


@dataclass
class GenerationScores:
    scores: dict[str, float | None]
    per_case: dict[str, dict[str, float]]
    computed: list[str]
    not_computed: list[str]
    reasons: dict[str, str] = field(default_factory=dict)
    overall_mean: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)  # e.g. why a bertscore_unofficial is not official

    @property
    def overall_computed(self) -> list[str]:
        return [m for m in OVERALL_METRICS if self.scores.get(m) is not None]

    @property
    def is_official_overall(self) -> bool:
        return len(self.overall_computed) == len(OVERALL_METRICS)

    @property
    def overall_name(self) -> str:
        if self.is_official_overall:
            return "overall_score (official: mean of the 6 metrics)"
        k = len(self.overall_computed)
        return (
            f"mean of {k} of {len(OVERALL_METRICS)} metrics ({', '.join(self.overall_computed)}); "
            "not the official overall score"
        )

    def to_json(self) -> dict[str, Any]:
        """Per-metric values (``None`` = not computed), the honestly named overall, per-case values."""
        out: dict[str, Any] = {name: self.scores.get(name) for name in METRICS}
        if UNOFFICIAL_NAME in self.scores:
            out[UNOFFICIAL_NAME] = self.scores[UNOFFICIAL_NAME]
        if self.is_official_overall:
            out["overall_score"] = self.overall_mean
        else:
            out["overall_mean_of_computed"] = self.overall_mean
            out["overall_name"] = self.overall_name
        out["computed"] = list(self.computed)
        out["not_computed"] = {name: self.reasons.get(name, "") for name in self.not_computed}
        if self.notes:
            out["notes"] = dict(self.notes)
        out["per_case"] = {cid: dict(values) for cid, values in self.per_case.items()}
        return out


def _sari_normalise(text: str) -> str:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return str(Tokenizer13a()(text.lower()))  # type: ignore[no-untyped-call]  # sacrebleu is untyped


def score_generation(
    predictions: dict[str, str],
    references: dict[str, str],
    sources: dict[str, str],
    bertscore_model: str | None = None,
) -> GenerationScores:
    """Subtask 3 metrics; the three dicts are keyed by case id and must share their keys.

    Raises :class:`metrics.bleu.EmptyTokenization` for a text with no 13a tokens (the
    official scorer would crash on it); callers that read user files check this first.
    """
    if set(predictions) != set(references) or set(predictions) != set(sources):
        raise ValueError("predictions, references and sources must cover the same cases")
    if not predictions:
        raise ValueError("no cases to score")
    case_ids = list(predictions)
    per_case: dict[str, dict[str, float]] = {}
    for cid in case_ids:
        pred, ref = predictions[cid], references[cid]
        per_case[cid] = {
            "bleu": case_bleu(pred, ref),
            **case_rouge(pred, ref),
            "sari": sentence_sari(_sari_normalise(sources[cid]), _sari_normalise(pred), [_sari_normalise(ref)]),
        }
    reasons = dict(NEVER_COMPUTED)
    notes: dict[str, str] = {}
    bert = bertscore_f1([predictions[c] for c in case_ids], [references[c] for c in case_ids], bertscore_model)
    if bert.values is None:
        reasons["bertscore"] = f"not computed: {bert.reason}"
    else:
        if bert.name == UNOFFICIAL_NAME:
            reasons["bertscore"] = f"not computed with the official model; see {UNOFFICIAL_NAME}"
        notes[bert.name] = bert.reason
        for cid, value in zip(case_ids, bert.values):
            per_case[cid][bert.name] = value

    names = list(METRICS) + ([UNOFFICIAL_NAME] if bert.name == UNOFFICIAL_NAME and bert.values else [])
    scores: dict[str, float | None] = {}
    for name in names:
        if name in reasons:
            scores[name] = None
        else:
            scores[name] = sum(per_case[c][name] for c in case_ids) / len(case_ids)
    computed = [m for m in names if scores[m] is not None]
    not_computed = [m for m in METRICS if scores[m] is None]
    in_overall = [m for m in OVERALL_METRICS if scores[m] is not None]
    overall = sum(scores[m] for m in in_overall) / len(in_overall)  # type: ignore[misc]
    return GenerationScores(scores, per_case, computed, not_computed, reasons, overall, notes)
