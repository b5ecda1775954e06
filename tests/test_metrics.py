"""Subtask 4 scores on hand-computed cases; SARI reference vector; Subtask 3 metric report."""

from __future__ import annotations

import importlib.util

import pytest

from metrics.alignment import SCORE_KEYS, pairs_from_submission, score_alignment
from metrics.generation import METRICS, OVERALL_METRICS, score_generation
from metrics.sari import corpus_sari, sentence_sari

SARI_SOURCE = "About 95 species are currently accepted ."
SARI_PREDICTION = "About 95 you now get in ."
SARI_REFERENCES = [
    "About 95 species are currently known .",
    "About 95 species are now accepted .",
    "95 species are now accepted .",
]


def test_sari_reference_vector():
    assert corpus_sari([SARI_SOURCE], [SARI_PREDICTION], [SARI_REFERENCES]) == 26.953601953601954
    assert sentence_sari(SARI_SOURCE, SARI_PREDICTION, SARI_REFERENCES) == pytest.approx(26.953601953601954, abs=1e-12)


@pytest.mark.parametrize(
    "source, prediction, references, expected",
    [
        # n=1: keep F1(1, 1/2) = 2/3, delete 1/2 (b is in the reference, c is not), add 1 (d);
        # n=2: keep F1(1, 0) = 0, delete 1/2, add 0; n=3: keep 1, delete 1, add F1(1, 0) = 0; n=4: all 1.
        # keep 2/3, delete 3/4, add 1/2 -> 100 * (23/12) / 3.
        ("a b c", "a d", ["a b d"], 100 * 23 / 36),
        # Two references: source/candidate counts doubled. n=1: keep F1(1/2, 1) = 2/3, delete 1/2,
        # add F1(1, 0) = 0 (b never added); n=2..4: 1 each -> keep 11/12, delete 7/8, add 3/4.
        ("a a", "a", ["a", "b"], 100 * 61 / 72),
        ("x y", "x y", ["x y"], 100.0),  # an exact copy of source and reference: nothing to punish
    ],
)
def test_sari_hand_computed(source, prediction, references, expected):
    assert sentence_sari(source, prediction, references) == pytest.approx(expected, abs=1e-9)
    assert corpus_sari([source], [prediction], [references]) == pytest.approx(expected, abs=1e-9)


def test_sari_corpus_is_mean_and_copying_reference_scores_high():
    s2 = ("the cat sat on the mat .", "a cat sat on a mat .", ["a cat sat on a mat ."])
    total = corpus_sari([SARI_SOURCE, s2[0]], [SARI_PREDICTION, s2[1]], [SARI_REFERENCES, s2[2]])
    assert total == pytest.approx(
        (sentence_sari(SARI_SOURCE, SARI_PREDICTION, SARI_REFERENCES) + sentence_sari(*s2)) / 2
    )
    # Copying the source when the reference simplifies it is worse than matching the reference.
    assert sentence_sari(s2[0], s2[0], s2[2]) < sentence_sari(*s2)


def _pct(x: float) -> float:
    return 100 * x


def test_alignment_hand_computed_with_corners():
    gold = {
        "A": {("1", "a"), ("1", "b"), ("2", "c")},
        "B": {("1", "x")},  # nothing predicted: P = 0, R = 0
        "C": set(),  # no gold, one wrong prediction: P = 0, R = 0
        "D": set(),  # nothing predicted, nothing gold: everything 0
    }
    predicted = {
        "A": {("1", "a"), ("2", "c"), ("2", "d"), ("3", "e")},  # tp 2 of 4 predicted, 3 gold
        "B": set(),
        "C": {("1", "y")},
        "D": set(),
    }
    s = score_alignment(predicted, gold)
    assert list(s) == list(SCORE_KEYS)
    # Micro: tp 2, predicted 5, gold 4.
    assert s["micro_precision"] == pytest.approx(_pct(2 / 5), abs=1e-9)
    assert s["micro_recall"] == pytest.approx(_pct(2 / 4), abs=1e-9)
    assert s["micro_f1"] == pytest.approx(_pct(4 / 9), abs=1e-9)  # 2 * .4 * .5 / .9
    # Macro: case A has P 1/2, R 2/3, F1 4/7; B, C, D are all zeros.
    assert s["macro_precision"] == pytest.approx(_pct(0.5 / 4), abs=1e-9)
    assert s["macro_recall"] == pytest.approx(_pct((2 / 3) / 4), abs=1e-9)
    assert s["macro_f1"] == pytest.approx(_pct((4 / 7) / 4), abs=1e-9)
    assert s["overall_score"] == s["micro_f1"]


def test_alignment_macro_differs_from_micro():
    # One big perfect case and one small empty-prediction case.
    gold = {"big": {("1", str(i)) for i in range(9)}, "small": {("1", "0")}}
    predicted = {"big": set(gold["big"]), "small": set()}
    s = score_alignment(predicted, gold)
    assert s["micro_precision"] == pytest.approx(100.0, abs=1e-9)
    assert s["micro_recall"] == pytest.approx(90.0, abs=1e-9)
    assert s["micro_f1"] == pytest.approx(_pct(2 * 0.9 / 1.9), abs=1e-9)
    assert s["macro_precision"] == pytest.approx(50.0, abs=1e-9)
    assert s["macro_recall"] == pytest.approx(50.0, abs=1e-9)
    assert s["macro_f1"] == pytest.approx(50.0, abs=1e-9)


def test_alignment_perfect_and_case_set_mismatch():
    gold = {"1": {("1", "3")}, "2": {("2", "4"), ("1", "5")}}
    assert set(score_alignment(gold, gold).values()) == {100.0}
    with pytest.raises(ValueError, match="case sets differ"):
        score_alignment({"1": set()}, gold)


def test_pairs_from_submission_collapses_duplicates():
    entries = [
        {
            "case_id": "1",
            "prediction": [
                {"answer_id": "1", "evidence_id": ["3", "3"]},
                {"answer_id": "1", "evidence_id": ["3", "4"]},
                {"answer_id": "2", "evidence_id": []},
            ],
        },
        {"case_id": "2", "prediction": []},
    ]
    assert pairs_from_submission(entries) == {"1": {("1", "3"), ("1", "4")}, "2": set()}


def test_generation_report():
    refs = {"a": "Two blood thinners keep the stent open. Take both for a year.", "b": "Your kidney was blocked."}
    preds = {"a": "Take both blood thinners for a year. They keep the stent open.", "b": "Your kidney was blocked."}
    srcs = {"a": "Why two blood thinners?", "b": "Why the tube?"}
    r = score_generation(preds, refs, srcs)
    assert set(r.scores) == set(METRICS)
    assert r.scores["alignscore"] is None and r.scores["medcon"] is None  # never reported as 0
    assert {"alignscore", "medcon"} <= set(r.not_computed) and r.reasons["medcon"]
    if importlib.util.find_spec("bert_score") is None:
        assert r.scores["bertscore"] is None and "bertscore" in r.not_computed
    assert r.per_case["b"]["bleu"] == pytest.approx(100.0)
    for m in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert r.per_case["b"][m] == pytest.approx(100.0)
        assert r.scores[m] == pytest.approx((r.per_case["a"][m] + 100.0) / 2)
    # One-line texts: official ROUGE-Lsum splits only on newlines already there, so it equals ROUGE-L.
    assert r.per_case["a"]["rougeLsum"] == pytest.approx(r.per_case["a"]["rougeL"])
    # 12 unigrams each, 11 shared ("two" vs "they" differ).
    assert r.per_case["a"]["rouge1"] == pytest.approx(100 * 11 / 12, abs=1e-9)
    assert r.computed == [m for m in METRICS if r.scores[m] is not None]
    six = [m for m in OVERALL_METRICS if r.scores[m] is not None]
    assert r.overall_mean == pytest.approx(sum(r.scores[m] for m in six) / len(six))
    assert f"mean of {len(six)} of 6 metrics" in r.overall_name and "not the official" in r.overall_name
    out = r.to_json()
    assert out["alignscore"] is None and "overall_score" not in out
    assert out["per_case"]["b"]["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        score_generation(preds, {"a": "x"}, srcs)
