"""Retrieval aligners, linking rules, the ensemble file, tuning, cross-validation, extractive answers."""

from __future__ import annotations

import json
import numpy as np
import pytest

from baselines.aligners import (
    Aligner,
    BiEncoderAligner,
    BM25Aligner,
    EnsembleAligner,
    TfidfAligner,
    WordOverlapAligner,
    combine_scores,
    normalise_rows,
)
from baselines.crossval import case_folds
from baselines.ensemble import (
    HAND_SET_LABEL,
    EnsembleConfig,
    fit_ensemble,
    gold_matrix,
    links_matrix,
    score_components,
)
from baselines.extractive import extractive_answer
from baselines.models import load_bi_encoder, minilm_path
from baselines.linking import link_pairs, links_to_pairs
from data.archehr import load_cases
from plumbing.errors import InputError
from data.records import AnswerSentence, Case, NoteSentence, QuestionPhrase
from data.submission import count_words
from model.calibration import pooled_micro_f1
from metrics.alignment import score_alignment

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def make_case(notes: list[str], answers: list[str], question: str = "", cites: list[list[str]] | None = None) -> Case:
    cites = cites or [[] for _ in answers]
    return Case(
        case_id="c1",
        patient_narrative=question,
        clinician_question="",
        note_sentences=[NoteSentence(str(i + 1), t) for i, t in enumerate(notes)],
        patient_question=[QuestionPhrase("0", question)] if question else [],
        answer_sentences=[AnswerSentence(str(i + 1), t, tuple(c)) for i, (t, c) in enumerate(zip(answers, cites))],
        has_key=True,
    )


NOTES = [
    "Patient admitted with chest pain radiating to the left arm.",
    "Cardiac catheterization showed a blocked artery and a stent was placed.",
    "Aspirin and ticagrelor should be continued for twelve months.",
    "Diet was advanced as tolerated.",
]
ANSWERS = ["A stent was placed in the blocked artery.", "Keep taking aspirin and ticagrelor for twelve months."]


@pytest.fixture(scope="module")
def set_a(shared_fixtures):
    d = shared_fixtures / "setA"
    return load_cases(d / "archehr-qa.xml", d / "archehr-qa_key.json")


# ---------------------------------------------------------------- linking rules


def test_link_pairs_absolute_relative_cap_and_fallback():
    scores = np.array([[0.9, 0.5, 0.8, 0.1], [0.2, 0.3, 0.1, 0.25], [0.4, 0.4, 0.4, 0.4]])
    assert link_pairs(scores, 0.5) == [[0, 1, 2], [], []]
    assert link_pairs(scores, 0.5, max_per_answer=2) == [[0, 2], [], []]
    # relative: >= 0.8 x row best (0.72, 0.24, 0.32)
    assert link_pairs(scores, 0.8, mode="relative") == [[0, 2], [1, 3], [0, 1, 2, 3]]
    # fallback links the best of a row where nothing passed, never of a constant row
    assert link_pairs(scores, 0.5, top1_fallback=True) == [[0, 1, 2], [1], []]
    # cap ties go to the earlier note sentence
    assert link_pairs(scores, 0.0, mode="absolute", max_per_answer=1) == [[0], [1], [0]]


def test_link_pairs_edge_cases():
    assert link_pairs(np.zeros((2, 0)), 0.5) == [[], []]
    assert link_pairs(np.zeros((0, 3)), 0.5) == []
    # relative threshold of a non-positive best links nothing (a fraction of nothing)
    assert link_pairs(np.array([[-0.5, -0.1, -0.9]]), 0.5, mode="relative") == [[]]
    assert link_pairs(np.array([[np.nan, 0.7]]), 0.5) == [[1]]
    with pytest.raises(ValueError, match="mode"):
        link_pairs(np.ones((1, 2)), 0.5, mode="fraction")
    with pytest.raises(ValueError, match="max_per_answer"):
        link_pairs(np.ones((1, 2)), 0.5, max_per_answer=0)
    with pytest.raises(ValueError, match="2-D"):
        link_pairs(np.ones(3), 0.5)
    assert links_to_pairs(["a", "b"], ["n1", "n2"], [[1], [0, 1]]) == {("a", "n2"), ("b", "n1"), ("b", "n2")}


def test_normalise_and_combine():
    m = np.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    np.testing.assert_allclose(normalise_rows(m), [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    a, b = np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]])
    np.testing.assert_allclose(combine_scores({"x": a, "y": b}, {"x": 3, "y": 1}), [[0.25, 0.75]])
    np.testing.assert_allclose(combine_scores({"x": a, "y": b}, {"x": 1, "y": 0}), a)
    with pytest.raises(ValueError, match="positive weight"):
        combine_scores({"x": a}, {"x": 0})


# ---------------------------------------------------------------- scorers


@pytest.mark.parametrize("aligner", [BM25Aligner(), TfidfAligner(), WordOverlapAligner()], ids=lambda a: a.name)
def test_lexical_scorers_rank_the_sentence_that_shares_the_words(aligner):
    case = make_case(NOTES, ANSWERS)
    assert isinstance(aligner, Aligner)
    scores = aligner.score(case)
    assert scores.shape == (2, 4)
    assert scores[0].argmax() == 1 and scores[1].argmax() == 2
    assert scores[0, 3] == 0 and scores[1, 3] == 0  # "diet" shares no content word with either answer


@pytest.mark.parametrize("aligner", [BM25Aligner(), TfidfAligner(), WordOverlapAligner()], ids=lambda a: a.name)
def test_lexical_scorers_without_words_score_zero(aligner):
    case = make_case(["...", "the and of"], ["It is.", "!!"])
    np.testing.assert_array_equal(aligner.score(case), np.zeros((2, 2)))
    assert aligner.score(make_case(NOTES, [])).shape == (0, 4)


def test_bi_encoder_prefers_the_paraphrase():
    case = make_case(
        ["The patient had a myocardial infarction.", "Her potassium was replaced orally.", "Discharged home."],
        ["He had a heart attack."],
    )
    scores = BiEncoderAligner().score(case)
    assert scores.shape == (1, 3)
    assert scores[0].argmax() == 0  # no shared word: only the embedding can know
    assert np.all(scores <= 1.0 + 1e-5)
    assert load_bi_encoder() is load_bi_encoder(minilm_path())  # loaded once per process


def test_ensemble_aligner_mixes_normalised_components():
    case = make_case(NOTES, ANSWERS)
    ens = EnsembleAligner({"bm25": 0.5, "tfidf": 0.5}, {"bm25": BM25Aligner(), "tfidf": TfidfAligner()})
    expected = 0.5 * normalise_rows(BM25Aligner().score(case)) + 0.5 * normalise_rows(TfidfAligner().score(case))
    np.testing.assert_allclose(ens.score(case), expected)
    with pytest.raises(ValueError, match="no scorer"):
        EnsembleAligner({"minilm": 1.0}, {"bm25": BM25Aligner()})


# ---------------------------------------------------------------- ensemble file


def test_ensemble_config_round_trip(tmp_path):
    cfg = EnsembleConfig(
        weights={"bm25": 0.25, "minilm": 0.75},
        threshold=0.6,
        mode="absolute",
        max_per_answer=None,
        top1_fallback=True,
        tuned_on="x",
        train_micro_f1=55.5,
    )
    path = cfg.save(tmp_path / "e.json")
    assert json.loads(path.read_text())["format"] == "archehr-retrieval-ensemble/1"
    assert EnsembleConfig.load(path) == cfg
    assert cfg.build().weights == {"bm25": 0.25, "minilm": 0.75}


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "invalid JSON"),
        ('{"weights": {"bm25": 1}}', "not an ensemble file"),
        ('{"format": "archehr-retrieval-ensemble/1", "weights": {"bm99": 1}}', "unknown ensemble component"),
        ('{"format": "archehr-retrieval-ensemble/1", "weights": {"bm25": 0}}', "at least one"),
        ('{"format": "archehr-retrieval-ensemble/1", "mode": "fraction"}', "mode"),
        ('{"format": "archehr-retrieval-ensemble/1", "threshold": "high"}', "threshold"),
        ('{"format": "archehr-retrieval-ensemble/1", "colour": 1}', "unknown ensemble field"),
        (
            '{"format": "archehr-retrieval-ensemble/1", "weights": {"cross": 1}, "cross_encoder": "nowhere"}',
            "cross-encoder folder not found",
        ),
    ],
)
def test_ensemble_config_bad_files(tmp_path, content, message):
    path = tmp_path / "e.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        EnsembleConfig.load(path)
    assert str(path) in err.value.one_line()


def test_shipped_default_is_hand_set_and_equals_the_built_in_default():
    shipped = EnsembleConfig.load(ROOT / "configs" / "retrieval.json")
    assert shipped == EnsembleConfig()
    assert shipped.tuned_on == HAND_SET_LABEL
    assert "HAND-SET" in json.loads((ROOT / "configs" / "retrieval.json").read_text())["comment"]


# ---------------------------------------------------------------- tuning and scoring


def test_pooled_micro_f1_matches_the_official_scorer(set_a):
    scores = score_components(set_a, ["overlap"])["overlap"]
    preds, golds, predicted, gold = [], [], {}, {}
    for case in set_a:
        links = link_pairs(scores[case.case_id], 0.5, "relative")
        preds.append(links_matrix(links, scores[case.case_id].shape))
        golds.append(gold_matrix(case))
        predicted[case.case_id] = links_to_pairs(case.answer_ids, case.note_ids, links)
        gold[case.case_id] = case.gold_pairs()
    official = score_alignment(predicted, gold)["micro_f1"]
    assert 0 < official < 100
    assert pooled_micro_f1(preds, golds) * 100 == pytest.approx(official)


def test_grid_search_links_equal_link_pairs():
    from baselines.ensemble import ABSOLUTE_GRID, CAP_GRID, _RankedScores

    rng = np.random.default_rng(0)
    matrices = [normalise_rows(rng.integers(0, 4, size=(5, 7)).astype(float)) for _ in range(20)]
    matrices += [np.zeros((3, 4)), np.zeros((0, 4))]
    for m in matrices:
        ranked = _RankedScores(m)
        for threshold in (0.5, 0.75, 1.0) + ABSOLUTE_GRID[:3]:
            for mode in ("absolute", "relative"):
                for cap in CAP_GRID:
                    for fallback in (False, True):
                        expected = links_matrix(link_pairs(m, threshold, mode, cap, fallback), m.shape)
                        np.testing.assert_array_equal(ranked.links(threshold, mode, cap, fallback), expected)


def test_fit_ensemble_finds_the_informative_component():
    # Component "bm25" is the truth itself, "tfidf" is its reverse: the tuner must weight bm25 only.
    notes = [f"note {i}" for i in range(5)]
    cases, scores = [], {"bm25": {}, "tfidf": {}}
    for k in range(4):
        case = make_case(notes, ["a", "b"], cites=[[str(k % 5 + 1)], [str((k + 2) % 5 + 1)]])
        case.case_id = f"c{k}"
        g = gold_matrix(case).astype(float)
        scores["bm25"][case.case_id], scores["tfidf"][case.case_id] = g, 1 - g
        cases.append(case)
    cfg = fit_ensemble(cases, ["bm25", "tfidf"], component_scores=scores, tuned_on="synthetic")
    assert cfg.weights == {"bm25": 1.0}
    assert cfg.train_micro_f1 == 100.0
    assert cfg.tuned_on == "synthetic"
    with pytest.raises(InputError, match="keyed cases"):
        fit_ensemble([make_case(notes, ["a"])], ["bm25"], component_scores=scores)


def test_case_folds_partition_the_cases():
    ids = [str(i) for i in range(12)]
    folds = case_folds(ids, 4, seed=1)
    assert len(folds) == 4 and all(len(f) == 3 for f in folds)
    assert sorted(sum(folds, [])) == sorted(ids)
    assert case_folds(ids, 4, seed=1) == folds
    with pytest.raises(ValueError):
        case_folds(ids, 13)


def pooled_held_out(cases, fit_predict, n_folds=4, seed=0):
    """Each case predicted by fit_predict(train, test) tuned on the other case-grouped folds only."""
    by_id = {c.case_id: c for c in cases}
    predictions = {}
    for held_out in case_folds(list(by_id), n_folds, seed):
        train = [c for c in cases if c.case_id not in set(held_out)]
        fold_pred = fit_predict(train, [by_id[cid] for cid in held_out])
        predictions.update({cid: set(fold_pred.get(cid, set())) for cid in held_out})
    return predictions


def test_ensemble_beats_trivial_aligners_on_held_out_cases(set_a):
    """Tuned on the other folds only, pooled held-out micro F1 of the ensemble vs two trivial aligners."""
    gold = {c.case_id: c.gold_pairs() for c in set_a}
    scores = score_components(set_a, ["bm25", "tfidf", "minilm", "overlap"])

    def official_f1(pred):
        return score_alignment(pred, gold)["micro_f1"]

    nothing = official_f1({c.case_id: set() for c in set_a})
    overlap_top1 = official_f1(
        {
            c.case_id: links_to_pairs(
                c.answer_ids, c.note_ids, link_pairs(scores["overlap"][c.case_id], 1.0, "relative", max_per_answer=1)
            )
            for c in set_a
        }
    )

    def fit_predict(train, test):
        cfg = fit_ensemble(train, ["bm25", "tfidf", "minilm"], component_scores=scores)
        return {
            c.case_id: links_to_pairs(
                c.answer_ids,
                c.note_ids,
                cfg.link(combine_scores({n: scores[n][c.case_id] for n in cfg.weights}, cfg.weights)),
            )
            for c in test
        }

    ensemble = official_f1(pooled_held_out(set_a, fit_predict, n_folds=4, seed=0))
    print(
        f"\nsetA Subtask 4 micro F1 (held-out, 4 case-grouped folds): link nothing {nothing:.2f}, "
        f"word-overlap top-1 {overlap_top1:.2f}, tuned retrieval ensemble {ensemble:.2f}"
    )
    assert nothing == 0.0
    assert ensemble > overlap_top1 > nothing


# ---------------------------------------------------------------- Subtask 3 extractive baseline


def test_extractive_answer_picks_question_sentences_in_note_order():
    case = make_case(NOTES, [], question="How long should he keep taking aspirin and ticagrelor after the stent?")
    answer = extractive_answer(case)
    assert NOTES[2] in answer and NOTES[1] in answer and "Diet" not in answer
    assert answer.index(NOTES[1]) < answer.index(NOTES[2])  # note order, not score order
    assert extractive_answer(case, max_words=12) == NOTES[2]


def test_extractive_answer_is_never_empty_and_within_the_limit():
    long_sentence = " ".join(["word"] * 120) + "."
    case = make_case([long_sentence], [], question="nothing in common")
    answer = extractive_answer(case)
    assert answer and count_words(answer) == 75
    for case in load_cases(EXAMPLES / "archehr-qa.xml"):
        answer = extractive_answer(case)
        assert 0 < count_words(answer) <= 75


# ---------------------------------------------------------------- tuning CLI and the cross-encoder


def test_fit_cli_writes_an_ensemble_that_infer_reads(tmp_path, capsys):
    from baselines import fit

    out = tmp_path / "ens.json"
    assert (
        fit.main(
            [
                "--xml",
                str(EXAMPLES / "archehr-qa.xml"),
                "--key",
                str(EXAMPLES / "archehr-qa_key.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "optimistic" in capsys.readouterr().out
    cfg = EnsembleConfig.load(out)
    assert cfg.tuned_on == "archehr-qa.xml + archehr-qa_key.json"
    assert 0 < cfg.train_micro_f1 <= 100 and cfg.cross_encoder is None
    assert set(cfg.weights) <= {"bm25", "tfidf", "minilm"}
    import infer

    assert (
        infer.main(
            [
                str(EXAMPLES / "archehr-qa.xml"),
                "--out",
                str(tmp_path / "run"),
                "--ensemble",
                str(out),
                "--subtasks",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["subtask4"]["ensemble_source"] == str(out)
    assert run["subtask4"]["ensemble"]["weights"] == cfg.weights


def test_cross_encoder_trains_saves_and_scores(tmp_path):
    from baselines.aligners import CrossEncoderAligner
    from baselines.cross_encoder import train_cross_encoder, training_pairs

    cases = load_cases(EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json")
    pairs, labels = training_pairs(cases[:1])
    assert len(pairs) == len(cases[0].answer_sentences) * len(cases[0].note_sentences)
    assert sum(labels) == len(cases[0].gold_pairs())
    model_dir = train_cross_encoder(cases[:1], tmp_path / "ce", epochs=1, negatives_per_positive=1, batch_size=32)
    assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("*.bin"))
    scores = CrossEncoderAligner(model_dir).score(cases[1])
    assert scores.shape == (len(cases[1].answer_sentences), len(cases[1].note_sentences))
    assert np.all((scores >= 0) & (scores <= 1))
    # An ensemble file names the folder relative to itself.
    cfg = EnsembleConfig(weights={"bm25": 0.5, "cross": 0.5}, cross_encoder="ce")
    loaded = EnsembleConfig.load(cfg.save(tmp_path / "e.json"))
    assert loaded.cross_encoder == str((tmp_path / "ce").resolve())
    assert loaded.build().score(cases[1]).shape == scores.shape


@pytest.mark.slow
def test_cross_encoder_learns_the_links(set_a):
    """Trained on 8 cases, the cross-encoder ranks gold evidence above the rest on the 4 others."""
    from baselines.aligners import CrossEncoderAligner
    from baselines.cross_encoder import train_cross_encoder
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = train_cross_encoder(set_a[:8], tmp)
        scorer = CrossEncoderAligner(model_dir)
        pos, neg = [], []
        for case in set_a[8:]:
            s, g = scorer.score(case), gold_matrix(case)
            pos += list(s[g])
            neg += list(s[~g])
    print(f"\ncross-encoder held-out mean prob: linked {np.mean(pos):.3f}, not linked {np.mean(neg):.3f}")
    assert np.mean(pos) > np.mean(neg) + 0.2
