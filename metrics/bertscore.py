"""BERTScore F1 for Subtask 3: the organizers' settings, or clearly another metric.

Official: ``bert_score`` with ``distilbert-base-uncased``, ``num_layers=4``,
``idf=False``, ``rescale_with_baseline=True`` (the baseline table ships inside the
``bert-score`` package). Nothing is downloaded here: the user points
``--bertscore-model`` at a local folder. A folder that holds distilbert-base-uncased
(recognised by its config: DistilBERT masked LM, 6 layers, hidden size 768, the
30522-token uncased vocabulary) gives the official ``bertscore``; any other model is
scored under the name ``bertscore_unofficial`` (its last layer, no rescaling) and never
counts towards the official overall. ``bert-score`` is an optional dependency.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

OFFICIAL_NAME = "bertscore"
UNOFFICIAL_NAME = "bertscore_unofficial"
OFFICIAL_MODEL = "distilbert-base-uncased"
OFFICIAL_LAYERS = 4
NO_MODEL = f"pass --bertscore-model with a local copy of {OFFICIAL_MODEL} (no downloads at scoring time)"


@dataclass
class BertScoreResult:
    name: str  # OFFICIAL_NAME or UNOFFICIAL_NAME
    values: list[float] | None  # per case x100, None = not computed
    reason: str = ""  # why not computed, or what makes it unofficial
    model: str | None = None


def _config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def is_official_model(folder: str | Path) -> bool:
    """True when ``folder`` holds distilbert-base-uncased (judged from its config.json)."""
    cfg = _config(Path(folder))
    return (
        cfg.get("model_type") == "distilbert"
        and cfg.get("vocab_size") == 30522
        and cfg.get("n_layers") == 6
        and cfg.get("dim") == 768
        and "DistilBertForMaskedLM" in (cfg.get("architectures") or ["DistilBertForMaskedLM"])
    )


def _baseline_file(bert_score_module: ModuleType) -> Path:
    origin = bert_score_module.__file__
    assert origin is not None, "bert_score is an installed package with a file"
    return Path(origin).parent / "rescale_baseline" / "en" / f"{OFFICIAL_MODEL}.tsv"


def bertscore_f1(predictions: list[str], references: list[str], model: str | Path | None) -> BertScoreResult:
    """Per-case BERTScore F1 x100 under the official or the unofficial name (or not computed)."""
    if model is None:
        return BertScoreResult(OFFICIAL_NAME, None, NO_MODEL)
    folder = Path(model)
    official = is_official_model(folder)
    name = OFFICIAL_NAME if official else UNOFFICIAL_NAME
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return BertScoreResult(name, None, f"{folder} is not a local model folder (no downloads at scoring time)")
    try:
        import bert_score
    except ImportError:
        return BertScoreResult(name, None, "package bert-score is not installed (pip install bert-score)")
    if official:
        kwargs = dict(
            num_layers=OFFICIAL_LAYERS, rescale_with_baseline=True, baseline_path=str(_baseline_file(bert_score))
        )
        note = f"official settings ({OFFICIAL_MODEL}, {OFFICIAL_LAYERS} layers, idf off, rescaled)"
    else:
        cfg = _config(folder)
        layers = cfg.get("num_hidden_layers") or cfg.get("n_layers") or cfg.get("num_layers")
        kwargs = dict(num_layers=layers, rescale_with_baseline=False)
        note = f"NOT OFFICIAL: model {folder} is not {OFFICIAL_MODEL} (last layer, no baseline rescaling)"
    try:
        _, _, f1 = bert_score.score(
            predictions, references, model_type=str(folder), idf=False, lang="en", verbose=False, **kwargs
        )
    except Exception as err:  # any load failure means "not computed", never a made-up number
        return BertScoreResult(name, None, f"could not run BERTScore with {folder}: {type(err).__name__}")
    return BertScoreResult(name, [100 * float(v) for v in f1], note, str(folder))
