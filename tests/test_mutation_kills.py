"""Tests written to kill mutants that survived the suite (docs/mutation.md lists them).

Each test names the rule it pins with hand-computed expectations, never by calling the code
under test a second time.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.calibration import GRID, calibrate_threshold, pair_f1, pooled_micro_f1
from plumbing.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


# --- training/validation.py: log_every = 0 would divide by zero (or log never) -----------------
@pytest.mark.parametrize("value", [0, -1])
def test_log_every_below_one_is_rejected(value):
    from training.config import build_config

    with pytest.raises(InputError, match="--log_every must be"):
        build_config(dict(stage="domain", preset="tiny", log_every=value))
    assert build_config(dict(stage="domain", preset="tiny", log_every=1)).log_every == 1


# --- model/calibration.py: best F1 first, then the threshold nearest 0.5 ------------------------
def test_calibration_tie_goes_to_the_threshold_nearest_half():
    # F1 = 1 for every threshold in (0.1, 0.9]: 0.15 .. 0.9 tie; 0.5 is the nearest to 0.5.
    assert calibrate_threshold([np.array([0.9, 0.1])], [np.array([1.0, 0.0])]) == (0.5, 1.0)
    # F1 = 1 for thresholds in (0.02, 0.3]: the nearest to 0.5 among them is 0.3, not 0.05.
    assert calibrate_threshold([np.array([0.3, 0.02])], [np.array([1.0, 0.0])]) == (0.3, 1.0)
    # F1 = 1 for thresholds in (0.72, 0.95]: 0.75 is the nearest to 0.5, not 0.95.
    assert calibrate_threshold([np.array([0.97, 0.72])], [np.array([1.0, 0.0])]) == (0.75, 1.0)


def test_calibration_prefers_higher_f1_over_nearness():
    # Predicting both (threshold <= 0.2): P = 1/2, R = 1, F1 = 2/3. Only the positive
    # (0.2 < threshold <= 0.3): F1 = 1. Nothing (> 0.3): F1 = 0. Best: 0.3 (nearest 0.5 of (0.2, 0.3]).
    threshold, f1 = calibrate_threshold([np.array([0.3, 0.2])], [np.array([1.0, 0.0])])
    assert (threshold, f1) == (0.3, 1.0)
    assert pair_f1([np.array([0.3, 0.2])], [np.array([1.0, 0.0])], 0.2) == pytest.approx(2 / 3)
    assert pair_f1([np.array([0.3, 0.2])], [np.array([1.0, 0.0])], 0.3) == 1.0  # p >= threshold counts


def test_calibration_without_gold_pairs_is_the_default():
    assert calibrate_threshold([np.array([0.9, 0.1])], [np.array([0.0, 0.0])]) == (0.5, 0.0)


def test_calibration_grid_and_pooled_f1_by_hand():
    assert GRID[0] == 0.05 and GRID[-1] == 0.95 and len(GRID) == 19
    assert all(round(b - a, 2) == 0.05 for a, b in zip(GRID, GRID[1:]))
    # Pooled over two examples: tp = 1 + 1, predicted 2 + 1, gold 1 + 2 -> P = 2/3, R = 2/3.
    pred = [np.array([True, True, False]), np.array([True, False])]
    gold = [np.array([True, False, False]), np.array([True, True])]
    assert pooled_micro_f1(pred, gold) == pytest.approx(2 / 3)
    # P = 1/2, R = 1 -> F1 = 2/3 (not the arithmetic mean 3/4).
    assert pooled_micro_f1([np.array([True, True])], [np.array([True, False])]) == pytest.approx(2 / 3)
    assert pooled_micro_f1([np.array([False, True])], [np.array([True, False])]) == 0.0
    assert pooled_micro_f1([], []) == 0.0


# --- training/joint.py: the alignment BCE weighs positive pairs by pos_weight --------------------
class _FixedHead:
    """Stands in for the head: returns fixed pair logits (one [answers x notes] matrix per example)."""

    def __init__(self, pair_logits, rel_logits=None):
        self.pair_logits, self.rel_logits = pair_logits, rel_logits

    def __call__(self, hidden, note_spans, answer_spans, note_counts=None, answer_counts=None):
        return self.pair_logits, self.rel_logits


def _bce(logit: float, target: float, pos_weight: float = 1.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(pos_weight * target * math.log(p) + (1 - target) * math.log(1 - p))


def _batch(targets, has_pairs, rel_targets=None, rel_mask=None):
    n_notes = 2
    return {
        "note_spans": torch.zeros((1, n_notes, 2), dtype=torch.long), "answer_spans": torch.zeros((1, 1, 2)),
        "note_counts": [n_notes], "answer_counts": [1], "has_pairs": torch.tensor(has_pairs),
        "pair_targets": torch.tensor(targets, dtype=torch.float32),
        "relevance_mask": torch.tensor(rel_mask if rel_mask is not None else [False] * n_notes),
        "relevance_targets": torch.tensor(rel_targets if rel_targets is not None else [0.0] * n_notes),
    }


@pytest.mark.parametrize("pos_weight", [1.0, 5.0, 0.25])
def test_alignment_loss_weighs_positive_pairs(pos_weight):
    from training.joint import LossSettings, alignment_losses

    logits = [0.5, -1.0, 2.0]
    head = _FixedHead([torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0]])])
    batch = _batch([1.0, 0.0, 0.0], [True, True])
    out = alignment_losses(head, torch.zeros(1), batch, LossSettings(pos_weight=pos_weight))
    expected = sum(_bce(x, t, pos_weight) for x, t in zip(logits, [1.0, 0.0, 0.0])) / 3
    assert float(out["align"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["relevance"]) == 0.0


def test_alignment_loss_skips_examples_without_pairs_and_scores_relevance():
    from training.joint import LossSettings, alignment_losses

    head = _FixedHead([torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 3.0]])],
                      rel_logits=torch.tensor([1.0, -2.0, 0.5]))
    batch = _batch([1.0, 0.0], [True, False], rel_targets=[1.0, 0.0, 1.0], rel_mask=[True, True, False])
    out = alignment_losses(head, torch.zeros(1), batch, LossSettings(pos_weight=2.0))
    # Only the first example's two pairs count; relevance averages the two masked-in notes, unweighted.
    assert float(out["align"]) == pytest.approx((_bce(0.5, 1, 2.0) + _bce(-1.0, 0, 2.0)) / 2, rel=1e-5)
    assert float(out["relevance"]) == pytest.approx((_bce(1.0, 1) + _bce(-2.0, 0)) / 2, rel=1e-5)


def test_alignment_loss_without_any_pairs_is_zero_and_keeps_the_graph():
    from training.joint import LossSettings, alignment_losses

    logits = torch.tensor([[0.5, -1.0]], requires_grad=True)
    out = alignment_losses(_FixedHead([logits]), torch.zeros(1), _batch([], [False]), LossSettings())
    assert float(out["align"]) == 0.0 and out["align"].requires_grad


# --- Subtask 2: the threshold is calibrated on the essential sentences only ----------------------
def _key_with_supplementary(tmp_path: Path) -> Path:
    """The shipped key with the second essential sentence of every case made supplementary."""
    key = json.loads((EXAMPLES / "archehr-qa_key.json").read_text(encoding="utf-8"))
    for case in key:
        essential = [a for a in case["answers"] if a["relevance"] == "essential"]
        if len(essential) > 1:
            essential[1]["relevance"] = "supplementary"
    path = tmp_path / "key.json"
    path.write_text(json.dumps(key), encoding="utf-8")
    return path


def test_training_items_carry_essential_targets_not_relevant_ones(tmp_path, qwen_tokenizer):
    from training.config import build_config
    from training.loop import stage_data

    key = _key_with_supplementary(tmp_path)
    cfg = build_config(dict(stage="task", joint=True, preset="tiny", xml=str(EXAMPLES / "archehr-qa.xml"),
                            key=str(key), max_length=100_000))
    items, _ = stage_data(cfg, qwen_tokenizer)
    labels = {c["case_id"]: [a["relevance"] for a in c["answers"]] for c in json.loads(key.read_text())}
    by_case = list(labels.values())
    assert len(items) == len(by_case)
    n_supplementary = 0
    for item, case_labels in zip(items, by_case):
        assert item.essential == [1.0 if lab == "essential" else 0.0 for lab in case_labels]
        assert item.relevance == [0.0 if lab == "not-relevant" else 1.0 for lab in case_labels]
        n_supplementary += case_labels.count("supplementary")
    assert n_supplementary > 0


def test_baseline_threshold_is_fit_on_essential_only():
    from baselines.relevance import fit_threshold
    from data.records import Case, NoteSentence

    # Essential s1 scores 0.9, supplementary s2 0.6, not-relevant s3 0.1. On the essential
    # set the best threshold keeps s1 only (0.65 .. 0.9 -> F1 1; nearest 0.5: 0.65); on the
    # relevant set (s1 + s2) it would be 0.15 .. 0.6 (nearest 0.5: 0.5).
    case = Case(case_id="1", patient_narrative="", clinician_question="", note_sentences=[
        NoteSentence("1", "a"), NoteSentence("2", "b"), NoteSentence("3", "c")], relevance={"1": "essential", "2": "supplementary", "3": "not-relevant"})
    assert fit_threshold([case], [np.array([0.9, 0.6, 0.1])]) == (0.65, 1.0)
