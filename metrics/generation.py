"""Subtask 3 answer-quality metrics, per case then averaged over cases (all x100).

* BLEU: sacrebleu sentence BLEU against the single reference.
* ROUGE-1/2/L/Lsum: rouge-score F-measure with ``use_stemmer=True``. ROUGE-Lsum treats
  newlines as sentence breaks, so both texts are first put one sentence per line with
  :func:`data.sentences.split_sentences`.
* SARI (:mod:`metrics.sari`): source = patient narrative; texts lower-cased and
  tokenised with sacrebleu's 13a tokenizer first.
* BERTScore F1: only when the ``bert_score`` package is installed and its model is
  already on disk (never downloaded here); otherwise reported as not computed.
* AlignScore and MEDCON need models / a UMLS licence this project does not ship:
  always reported as not computed (``None``), never as 0.

``overall_mean`` is the mean of the metrics that *were* computed and is named that way
(``overall_name``); it is not the official overall score, which includes the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data.sentences import split_sentences

from .sari import sentence_sari

METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "sari", "bertscore", "alignscore", "medcon")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
DEFAULT_BERTSCORE_MODEL = "roberta-large"
NEVER_COMPUTED = {
    "alignscore": "needs the AlignScore checkpoint, which this project does not ship",
    "medcon": "needs QuickUMLS with a UMLS licence, which this project does not have",
}


@dataclass
class GenerationScores:
    scores: dict[str, float | None]
    per_case: dict[str, dict[str, float]]
    computed: list[str]
    not_computed: list[str]
    reasons: dict[str, str] = field(default_factory=dict)
    overall_mean: float = 0.0

    @property
    def overall_name(self) -> str:
        return f"mean of computed metrics ({', '.join(self.computed)})"

    def to_json(self) -> dict:
        """Per-metric values (``None`` = not computed) plus the honestly named overall."""
        out: dict = {name: self.scores.get(name) for name in METRICS}
        out["overall_mean_of_computed"] = self.overall_mean
        out["computed"] = list(self.computed)
        out["not_computed"] = {name: self.reasons.get(name, "") for name in self.not_computed}
        return out


def _sari_normalise(text: str) -> str:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.lower())


def _lines(text: str) -> str:
    return "\n".join(split_sentences(text)) or text


def _bertscore(predictions: list[str], references: list[str], model: str) -> tuple[list[float] | None, str]:
    """Per-case BERTScore F1 x100, or (None, why not)."""
    try:
        import bert_score
    except ImportError:
        return None, "package bert_score is not installed (pip install bert-score)"
    from pathlib import Path

    if not Path(model).is_dir():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            return None, f"model {model} is not on disk (no downloads at scoring time)"
    try:
        _, _, f1 = bert_score.score(predictions, references, model_type=model, lang="en", verbose=False)
    except Exception as err:  # any load failure means "not computed", never a fake number
        return None, f"could not run BERTScore with {model}: {type(err).__name__}"
    return [100 * float(v) for v in f1], ""


def score_generation(
    predictions: dict[str, str],
    references: dict[str, str],
    sources: dict[str, str],
    bertscore_model: str = DEFAULT_BERTSCORE_MODEL,
) -> GenerationScores:
    """Subtask 3 metrics; the three dicts are keyed by case id and must share their keys."""
    if set(predictions) != set(references) or set(predictions) != set(sources):
        raise ValueError("predictions, references and sources must cover the same cases")
    if not predictions:
        raise ValueError("no cases to score")
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    case_ids = list(predictions)
    per_case: dict[str, dict[str, float]] = {}
    for cid in case_ids:
        pred, ref = predictions[cid], references[cid]
        rouge = scorer.score(ref, pred)
        rouge_lsum = scorer.score(_lines(ref), _lines(pred))["rougeLsum"]
        per_case[cid] = {
            "bleu": sacrebleu.sentence_bleu(pred, [ref]).score,
            "rouge1": 100 * rouge["rouge1"].fmeasure,
            "rouge2": 100 * rouge["rouge2"].fmeasure,
            "rougeL": 100 * rouge["rougeL"].fmeasure,
            "rougeLsum": 100 * rouge_lsum.fmeasure,
            "sari": sentence_sari(
                _sari_normalise(sources[cid]), _sari_normalise(pred), [_sari_normalise(ref)]
            ),
        }
    reasons = dict(NEVER_COMPUTED)
    bert, why = _bertscore([predictions[c] for c in case_ids], [references[c] for c in case_ids], bertscore_model)
    if bert is None:
        reasons["bertscore"] = why
    else:
        for cid, value in zip(case_ids, bert):
            per_case[cid]["bertscore"] = value

    scores: dict[str, float | None] = {}
    for name in METRICS:
        if name in reasons:
            scores[name] = None
        else:
            scores[name] = sum(per_case[c][name] for c in case_ids) / len(case_ids)
    computed = [m for m in METRICS if scores[m] is not None]
    not_computed = [m for m in METRICS if scores[m] is None]
    overall = sum(scores[m] for m in computed) / len(computed)  # type: ignore[misc]
    return GenerationScores(scores, per_case, computed, not_computed, reasons, overall)
