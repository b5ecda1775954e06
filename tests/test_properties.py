"""Property tests (hypothesis) for the round trips: submission write -> read -> score, the
training config through TOML, and character spans -> token spans with the real Qwen3 tokenizer.

(The XML reader/writer round trip lives with the reader's tests.) Examples are few and the
deadline off: these run in the default suite on 2 busy cores.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.archehr import load_cases
from data.submission import read_submission, subtask2_entries, subtask4_entries, write_submission

ROOT = Path(__file__).resolve().parents[1]
XML = ROOT / "examples" / "archehr-qa.xml"
KEY = ROOT / "examples" / "archehr-qa_key.json"
CASES = load_cases(XML, KEY)
KEY_JSON = json.loads(KEY.read_text(encoding="utf-8"))
LABELS = ("essential", "supplementary", "not-relevant")
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _subset(items: list[str]) -> st.SearchStrategy[list[str]]:
    """A sub-list of ``items``, order kept."""
    return st.lists(st.booleans(), min_size=len(items), max_size=len(items)).map(
        lambda keep: [x for x, k in zip(items, keep) if k]
    )


# ---------------------------------------------------------------------- Subtask 2
@st.composite
def relevance_labels_and_prediction(draw):
    labels = {
        c.case_id: dict(
            zip(c.note_ids, draw(st.lists(st.sampled_from(LABELS), min_size=len(c.note_ids), max_size=len(c.note_ids))))
        )
        for c in CASES
    }
    predicted = {c.case_id: draw(_subset(c.note_ids)) for c in CASES}
    return labels, predicted


def _write_key(folder: Path, labels: dict[str, dict[str, str]]) -> Path:
    key = json.loads(json.dumps(KEY_JSON))
    for case in key:
        case["answers"] = [{"sentence_id": sid, "relevance": rel} for sid, rel in labels[case["case_id"]].items()]
    path = folder / "key.json"
    path.write_text(json.dumps(key), encoding="utf-8")
    return path


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    if n_pred == n_gold == 0:
        return 100.0, 100.0, 100.0
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return 100 * p, 100 * r, (200 * p * r / (p + r) if p + r else 0.0)


@FAST
@given(relevance_labels_and_prediction())
def test_subtask2_write_read_score(drawn):
    from metrics.subtask2 import score_subtask2

    labels, predicted = drawn
    entries = subtask2_entries(predicted)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        key = _write_key(folder, labels)
        json_path, zip_path = write_submission(entries, folder / "out", 2, CASES)
        assert read_submission(json_path, 2) == entries == read_submission(zip_path, 2)
        scores = score_subtask2(zip_path, key)
        # Strict micro: counted by hand over all cases.
        essential = {(cid, s) for cid, lab in labels.items() for s, rel in lab.items() if rel == "essential"}
        supplementary = {(cid, s) for cid, lab in labels.items() for s, rel in lab.items() if rel == "supplementary"}
        pred = {(cid, s) for cid, ids in predicted.items() for s in ids}
        strict = _prf(len(pred & essential), len(pred), len(essential))
        lenient_pred = pred - supplementary  # supplementary predictions are neither right nor wrong
        lenient = _prf(len(lenient_pred & essential), len(lenient_pred), len(essential))
        assert (
            scores["strict_micro_precision"],
            scores["strict_micro_recall"],
            scores["strict_micro_f1"],
        ) == pytest.approx(strict)
        assert (
            scores["lenient_micro_precision"],
            scores["lenient_micro_recall"],
            scores["lenient_micro_f1"],
        ) == pytest.approx(lenient)
        assert scores["overall_score"] == scores["strict_micro_f1"]
        # The perfect submission (the essential sentences) scores 100 on every strict and lenient number.
        perfect = subtask2_entries(
            {cid: [s for s, rel in lab.items() if rel == "essential"] for cid, lab in labels.items()}
        )
        _, perfect_zip = write_submission(perfect, folder / "perfect", 2, CASES)
        assert set(score_subtask2(perfect_zip, key).values()) == {100.0}


# ---------------------------------------------------------------------- Subtask 4
@st.composite
def alignment_prediction(draw):
    """Per case: answer id -> a subset of the note ids (every answer listed, some empty)."""
    return {c.case_id: {a: draw(_subset(c.note_ids)) for a in c.answer_ids} for c in CASES}


@FAST
@given(alignment_prediction())
def test_subtask4_write_read_score(links):
    from metrics.subtask4 import score_subtask4

    entries = subtask4_entries(links)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        json_path, zip_path = write_submission(entries, folder / "out", 4, CASES)
        assert read_submission(json_path, 4) == entries == read_submission(zip_path, 4)
        scores = score_subtask4(json_path, KEY)
        gold = {(c.case_id, a, e) for c in CASES for a, e in c.gold_pairs()}
        pred = {(cid, a, e) for cid, per in links.items() for a, ids in per.items() for e in ids}
        tp = len(pred & gold)
        p = 100 * tp / len(pred) if pred else 0.0
        r = 100 * tp / len(gold)
        assert scores["micro_precision"] == pytest.approx(p) and scores["micro_recall"] == pytest.approx(r)
        assert scores["micro_f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
        perfect = subtask4_entries(
            {c.case_id: {a.sentence_id: list(a.citations) for a in c.answer_sentences} for c in CASES}
        )
        _, perfect_zip = write_submission(perfect, folder / "perfect", 4, CASES)
        assert set(score_subtask4(perfect_zip, KEY).values()) == {100.0}


# ---------------------------------------------------------------------- config TOML
def _field_values():
    """A strategy per TrainConfig field that stays inside its validation rule."""
    from training.config import TrainConfig

    cfg = TrainConfig()
    special = {
        "stage": st.sampled_from(["domain", "task"]),
        "preset": st.just("tiny"),
        "load_in_4bit": st.sampled_from(["auto", "true", "false"]),
        "quant_storage": st.sampled_from(["uint8", "bfloat16", "float16", "float32"]),
        "schedule": st.sampled_from(["cosine", "linear", "constant"]),
        "head_pooling": st.sampled_from(["mean", "attention"]),
        "unanswerable": st.just(cfg.unanswerable),
        "warmup_ratio": st.floats(0, 1),
        "lora_dropout": st.floats(0, 0.99),
        "head_dropout": st.floats(0, 0.99),
        "head_layer": st.integers(-1, 2),
        "max_length": st.integers(16, 8192),
        "batch_tokens": st.just(0),
        "lr": st.floats(1e-8, 1),
        "head_lr": st.floats(1e-8, 1),
        "pos_weight": st.floats(1e-3, 100),
        "lora_alpha": st.integers(1, 256),
        "out": st.just(""),
        "init": st.just(""),
        "report_to": st.sampled_from(["none", "tensorboard"]),
    }
    text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
    strategies = {}
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in special:
            strategies[f.name] = special[f.name]
        elif isinstance(value, bool):
            strategies[f.name] = st.booleans()
        elif isinstance(value, int):
            strategies[f.name] = st.integers(1 if value >= 1 else 0, 1000)
        elif isinstance(value, float):
            strategies[f.name] = st.floats(0, 1)
        else:
            strategies[f.name] = text
    return st.fixed_dictionaries(strategies)


@settings(max_examples=40, deadline=None)
@given(_field_values())
def test_config_toml_round_trip(values):
    import tomllib

    from training.config import TrainConfig, build_config, to_toml

    from hypothesis import assume

    from plumbing.errors import InputError

    try:
        cfg = TrainConfig(**values).validate()
    except InputError:  # a combination outside the rules (e.g. batch_tokens < max_length): not a round trip
        assume(False)
    text = to_toml(cfg.to_dict())
    assert tomllib.loads(text) == cfg.to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(text, encoding="utf-8")
        assert build_config({}, config_file=path) == cfg


# ---------------------------------------------------------------------- token spans
sentence_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=40
).filter(lambda t: t.split())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    notes=st.lists(sentence_text, min_size=1, max_size=5),
    answers=st.lists(sentence_text, max_size=3),
    question=sentence_text,
)
def test_token_spans_cover_each_sentence(qwen_tokenizer, notes, answers, question):
    """Every note and answer sentence's token span decodes to text holding the sentence (its
    whitespace normalised, and in NFC: the Qwen tokenizer NFC-normalises its input, so a
    compatibility character such as U+F900 comes back as its canonical twin), and spans come in
    order without overlap."""
    import unicodedata

    from data.prompts import PromptExample, encode_example

    ex = PromptExample(
        "x",
        question,
        [str(i + 1) for i in range(len(notes))],
        notes,
        answer_ids=[f"a{i}" for i in range(len(answers))],
        answer_texts=answers,
    )
    enc = encode_example(qwen_tokenizer, ex)
    assert len(enc.note_spans) == len(notes) and len(enc.answer_spans) == len(answers)
    spans = enc.note_spans + enc.answer_spans
    for (start, end), sentence in zip(spans, notes + answers):
        assert 0 <= start < end <= len(enc.input_ids)
        decoded = qwen_tokenizer.decode(enc.input_ids[start:end])
        expected = unicodedata.normalize("NFC", " ".join(sentence.split()))
        assert expected in unicodedata.normalize("NFC", decoded), (sentence, decoded)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    if answers:  # the answer spans lie in the labelled (trained) part, the notes in the prompt
        assert enc.answer_spans[0][0] >= enc.prompt_length > enc.note_spans[-1][0]
