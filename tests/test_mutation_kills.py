"""Tests written to kill mutants that survived the suite (docs/mutation.md lists them).

Each test names the rule it pins with hand-computed expectations, never by calling the code
under test a second time.
"""

from __future__ import annotations

import json
import math
import zipfile
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
    """Stands in for the head: fixed pair logits (one per gathered pair) and relevance logits."""

    def __init__(self, pair_logits, rel_logits=None):
        self.pair_logits, self.rel_logits = pair_logits, rel_logits

    def __call__(self, hidden, note_spans, answer_spans, pair_index=None):
        return self.pair_logits, self.rel_logits


def _bce(logit: float, target: float, pos_weight: float = 1.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(pos_weight * target * math.log(p) + (1 - target) * math.log(1 - p))


def _batch(targets, rel_labels=(), rel_index=()):
    return {
        "note_spans": torch.zeros((2, 3), dtype=torch.long),
        "answer_spans": torch.zeros((1, 3), dtype=torch.long),
        "pair_index": torch.zeros((len(targets), 2), dtype=torch.long),
        "pair_targets": torch.tensor(list(targets), dtype=torch.float32),
        "relevance_index": torch.tensor(list(rel_index), dtype=torch.long),
        "relevance_labels": torch.tensor(list(rel_labels), dtype=torch.float32),
    }


@pytest.mark.parametrize("pos_weight", [1.0, 5.0, 0.25])
def test_alignment_loss_weighs_positive_pairs(pos_weight):
    from training.joint import LossSettings, alignment_losses

    logits = [0.5, -1.0, 2.0]
    out = alignment_losses(
        _FixedHead(torch.tensor(logits)), torch.zeros(1), _batch([1.0, 0.0, 0.0]), LossSettings(pos_weight=pos_weight)
    )
    expected = sum(_bce(x, t, pos_weight) for x, t in zip(logits, [1.0, 0.0, 0.0])) / 3
    assert float(out["align"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["relevance"]) == 0.0


def test_alignment_loss_scores_relevance_of_labelled_notes_only():
    from training.joint import LossSettings, alignment_losses

    head = _FixedHead(torch.tensor([0.5, -1.0]), rel_logits=torch.tensor([1.0, -2.0, 0.5]))
    out = alignment_losses(
        head, torch.zeros(1), _batch([1.0, 0.0], rel_labels=[1.0, 0.0], rel_index=[0, 1]), LossSettings(pos_weight=2.0)
    )
    assert float(out["align"]) == pytest.approx((_bce(0.5, 1, 2.0) + _bce(-1.0, 0, 2.0)) / 2, rel=1e-5)
    # Relevance averages the two labelled notes, unweighted by pos_weight; note 3 is unlabelled.
    assert float(out["relevance"]) == pytest.approx((_bce(1.0, 1) + _bce(-2.0, 0)) / 2, rel=1e-5)


def test_alignment_loss_without_any_pairs_is_zero_and_keeps_the_graph():
    from training.joint import LossSettings, alignment_losses

    logits = torch.zeros(0, requires_grad=True)
    out = alignment_losses(_FixedHead(logits), torch.zeros(1), _batch([]), LossSettings())
    assert float(out["align"].detach()) == 0.0 and out["align"].requires_grad


def test_relevance_loss_is_zero_without_labelled_notes():
    from training.joint import LossSettings, alignment_losses

    head = _FixedHead(torch.tensor([0.5]), rel_logits=torch.tensor([3.0, -2.0], requires_grad=True))
    out = alignment_losses(head, torch.zeros(1), _batch([1.0]), LossSettings())
    assert float(out["relevance"].detach()) == 0.0 and out["relevance"].requires_grad


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
    from training.run import stage_data

    key = _key_with_supplementary(tmp_path)
    cfg = build_config(
        dict(
            stage="task", joint=True, preset="tiny", xml=str(EXAMPLES / "archehr-qa.xml"), key=str(key), max_length=8192
        )
    )
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
    case = Case(
        case_id="1",
        patient_narrative="",
        clinician_question="",
        note_sentences=[NoteSentence("1", "a"), NoteSentence("2", "b"), NoteSentence("3", "c")],
        relevance={"1": "essential", "2": "supplementary", "3": "not-relevant"},
    )
    assert fit_threshold([case], [np.array([0.9, 0.6, 0.1])]) == (0.65, 1.0)


# --- metrics/alignment.py: per-case terms by hand ---------------------------------------------
def test_per_case_alignment_by_hand():
    from metrics.alignment import per_case_alignment

    gold = {"A": {("1", "a"), ("1", "b"), ("2", "c")}, "B": {("1", "x")}, "C": set()}
    predicted = {"A": {("1", "a"), ("2", "z")}, "B": set()}  # "C" absent: nothing predicted
    out = per_case_alignment(predicted, gold)
    assert list(out) == ["A", "B", "C"]
    # A: tp 1 of 2 predicted, 3 gold -> P 50, R 33.3, F1 2*.5*(1/3)/(5/6) = 40.
    assert out["A"] == pytest.approx(
        {"precision": 50.0, "recall": 100 / 3, "f1": 40.0, "tp": 1, "n_predicted": 2, "n_gold": 3}
    )
    assert out["B"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "n_predicted": 0, "n_gold": 1}
    assert out["C"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "n_predicted": 0, "n_gold": 0}


# --- data/submission.py: Subtask 2 validation, each rule with its message ----------------------
def test_validate_subtask2_rules():
    from data.archehr import load_cases
    from data.submission import validate_subtask2

    cases = load_cases(EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json")
    good = [{"case_id": c.case_id, "prediction": c.note_ids[:2]} for c in cases]
    validate_subtask2(good, cases)
    validate_subtask2([{"case_id": c.case_id, "prediction": []} for c in cases], cases)
    first = cases[0]
    dup = [{"case_id": first.case_id, "prediction": [first.note_ids[0]] * 2}] + good[1:]
    with pytest.raises(InputError) as err:
        validate_subtask2(dup, cases, "sub.json")
    assert str(err.value) == f"sub.json: case {first.case_id}: duplicate sentence ids"
    unknown = [{"case_id": first.case_id, "prediction": [first.note_ids[0], "999"]}] + good[1:]
    with pytest.raises(InputError) as err:
        validate_subtask2(unknown, cases, "sub.json")
    assert str(err.value) == f"sub.json: case {first.case_id}: unknown sentence id '999'"
    # An id of another case is unknown here.
    other = [{"case_id": first.case_id, "prediction": ["0"]}] + good[1:]
    with pytest.raises(InputError, match="unknown sentence id '0'"):
        validate_subtask2(other, cases)


# --- metrics/training_cases.py: what run.json says the export trained on -----------------------
@pytest.mark.parametrize(
    "record, expected",
    [
        ({"training_case_ids": ["101", "7"]}, ["101", "7"]),
        ({"training_case_ids": None}, None),
        ({"training_case_ids": []}, []),
        ({"engine": "baseline"}, None),
        ({"export_manifest": None}, None),
        ([1, 2], None),
    ],
)
def test_run_record_training_case_ids(tmp_path, record, expected):
    from metrics.training_cases import run_record_training_case_ids

    path = tmp_path / "run.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    assert run_record_training_case_ids(path) == expected


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "run.json beside the submission is not valid JSON"),
        ('{"training_case_ids": [1, 2]}', "field 'training_case_ids' must be a list of strings"),
        ('{"training_case_ids": "101"}', "field 'training_case_ids' must be a list of strings"),
    ],
)
def test_run_record_training_case_ids_refuses(tmp_path, text, problem):
    from metrics.training_cases import run_record_training_case_ids

    path = tmp_path / "run.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as err:
        run_record_training_case_ids(path)
    assert str(err.value) == f"{path}: {problem}"


def test_run_record_reads_the_manifest_under_either_name(tmp_path):
    from metrics.training_cases import run_record_training_case_ids

    manifest = _a_manifest()
    for name in ("export_manifest", "checkpoint_manifest"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({name: manifest}), encoding="utf-8")
        assert run_record_training_case_ids(path) == ["101", "102"]


def _a_manifest() -> dict:
    return {"preset": "tiny", "base_model": {"preset": "tiny"}, "training_case_ids": ["101", "102"]}


# --- heads/alignment.py: what save_head writes -------------------------------------------------
def test_save_head_files_and_tensors(tmp_path):
    from safetensors import safe_open

    from heads.alignment import HEAD_CONFIG, HEAD_WEIGHTS, NotePairHead, load_head, save_head
    from heads.config import HeadConfig

    assert (HEAD_WEIGHTS, HEAD_CONFIG) == ("head.safetensors", "head_config.json")
    head = NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=4))
    save_head(head, tmp_path / "new" / "folder")  # parents created
    folder = tmp_path / "new" / "folder"
    assert sorted(p.name for p in folder.iterdir()) == ["head.safetensors", "head_config.json"]
    with safe_open(str(folder / HEAD_WEIGHTS), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(head.state_dict())
    assert json.loads((folder / HEAD_CONFIG).read_text())["hidden_size"] == 8
    loaded = load_head(folder)
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# --- training/joint.py: the answer-token LM loss, by hand ---------------------------------------
class _LMStub(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)


def _answer_loss_by_hand(stub: _LMStub, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Mean over label positions t >= 1 of -log softmax(W h[t-1])[labels[t]] (next-token CE)."""
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if int(labels[b, t]) == -100:
                continue
            logits = stub.lm_head.weight @ hidden[b, t - 1]
            total += float(-torch.log_softmax(logits, dim=-1)[int(labels[b, t])])
            n += 1
    return total / n, n


@pytest.mark.parametrize("chunk", [None, 1, 2, 100])
def test_answer_token_loss_by_hand(chunk):
    from training.joint import answer_token_loss

    torch.manual_seed(0)
    stub = _LMStub(vocab=11, hidden=6)
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, 8, 9, 10]])
    loss, n = answer_token_loss(stub, hidden, labels, chunk=chunk)
    expected, expected_n = _answer_loss_by_hand(stub, hidden.detach(), labels)
    assert n == expected_n == 6
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    loss.backward()  # the chunked path keeps the graph
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) > 0
    with torch.no_grad():
        again, _ = answer_token_loss(stub, hidden, labels, chunk=chunk)
    assert float(again) == pytest.approx(expected, rel=1e-5)


def test_answer_token_loss_without_labels_is_zero():
    from training.joint import answer_token_loss

    stub = _LMStub(vocab=5, hidden=3)
    hidden = torch.randn(1, 4, 3, requires_grad=True)
    loss, n = answer_token_loss(stub, hidden, torch.full((1, 4), -100))
    assert n == 0 and float(loss) == 0.0 and loss.requires_grad


# --- heads/alignment.py: span tensors ----------------------------------------------------------
def test_spans_tensor_shapes():
    from heads.alignment import spans_tensor

    cpu = torch.device("cpu")
    assert spans_tensor([(1, 3), (4, 6)], cpu).tolist() == [[0, 1, 3], [0, 4, 6]]
    assert spans_tensor([(2, 1, 3)], cpu).tolist() == [[2, 1, 3]]
    three = spans_tensor(torch.tensor([[1, 0, 2]], dtype=torch.int32), cpu)
    assert three.dtype == torch.long and three.tolist() == [[1, 0, 2]]
    empty = spans_tensor([], cpu)
    assert empty.shape == (0, 3) and empty.dtype == torch.long
    for bad in ([(1, 2, 3, 4)], [1, 2]):
        with pytest.raises(ValueError, match="spans must be"):
            spans_tensor(bad, cpu)


# --- metrics/bertscore.py: which folder holds the official model -------------------------------
@pytest.mark.parametrize(
    "change, official",
    [
        ({}, True),
        ({"model_type": "bert"}, False),
        ({"vocab_size": 30523}, False),
        ({"n_layers": 12}, False),
        ({"dim": 512}, False),
        ({"architectures": ["DistilBertModel"]}, False),
        ({"architectures": None}, True),
    ],
)
def test_is_official_model(tmp_path, change, official):
    from metrics.bertscore import is_official_model

    cfg = {
        "model_type": "distilbert",
        "vocab_size": 30522,
        "n_layers": 6,
        "dim": 768,
        "architectures": ["DistilBertForMaskedLM"],
        **change,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert is_official_model(tmp_path) is official


def test_is_official_model_without_a_readable_config(tmp_path):
    from metrics.bertscore import is_official_model

    assert is_official_model(tmp_path) is False
    (tmp_path / "config.json").write_text("{broken", encoding="utf-8")
    assert is_official_model(tmp_path) is False


# --- data/submission.py: the zip reader's rules, each with its message ---------------------------
def _zip(path: Path, members: dict[str, bytes], compression: int = 8) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_zip_member_rules(tmp_path, monkeypatch):
    import zipfile

    import data.submission as submission
    from data.submission import read_submission

    entries = [{"case_id": "1", "prediction": "An answer."}]
    payload = json.dumps(entries).encode()
    assert read_submission(_zip(tmp_path / "ok.zip", {"submission.json": payload}), 3) == entries
    stored = _zip(tmp_path / "stored.zip", {"submission.json": payload}, compression=0)
    assert read_submission(stored, 3) == entries

    def problem(path: Path) -> str:
        with pytest.raises(InputError) as err:
            read_submission(path, 3)
        assert str(err.value).startswith(f"{path}: ")  # the file is named
        return str(err.value).removeprefix(f"{path}: ")

    assert (
        problem(_zip(tmp_path / "none.zip", {"dir/submission.json": payload}))
        == "zip has no submission.json at its root"
    )
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        zf.writestr("submission.json", payload)
        zf.writestr("submission.json", payload)
    assert problem(two) == "zip holds 2 members named submission.json; keep one"
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really a zip")
    assert problem(tmp_path / "bad.zip").startswith("not a valid zip file")
    monkeypatch.setattr(submission, "MAX_SUBMISSION_BYTES", len(payload))  # exactly the cap: read
    assert read_submission(_zip(tmp_path / "cap.zip", {"submission.json": payload}), 3) == entries
    monkeypatch.setattr(submission, "MAX_SUBMISSION_BYTES", len(payload) - 1)
    assert (
        problem(_zip(tmp_path / "big.zip", {"submission.json": payload}))
        == f"submission.json in the zip is {len(payload)} bytes, more than {len(payload) - 1}"
    )


def test_zip_bomb_ratio(tmp_path, monkeypatch):
    import data.submission as submission
    from data.submission import read_submission

    monkeypatch.setattr(submission, "MAX_SUBMISSION_BYTES", 64 * 2**20)
    # 2 MiB of one repeated byte compresses > 200-fold: refused before reading.
    bomb = _zip(tmp_path / "bomb.zip", {"submission.json": b" " * (2 * 2**20)})
    with pytest.raises(InputError, match=r"expands \d+-fold \(a zip bomb\?\)"):
        read_submission(bomb, 3)
    with pytest.raises(InputError) as err:
        read_submission(bomb, 3)
    assert str(err.value).startswith(f"{bomb}: ")
    # Past 1 MiB, a member that compresses less than 200-fold is read (hex text: about 2-fold).
    import os

    entries = [{"case_id": "1", "prediction": os.urandom(700_000).hex()}]
    plain = _zip(tmp_path / "plain.zip", {"submission.json": json.dumps(entries).encode()})
    assert read_submission(plain, 3) == entries
    # Up to 1 MiB a well-compressing member is read (the ratio rule starts past 1 MiB).
    entries = [{"case_id": "1", "prediction": "x" * (2**20 - 36)}]
    text = json.dumps(entries).encode()
    assert len(text) == 2**20  # exactly 1 MiB, compressing ~1000-fold: still read
    assert read_submission(_zip(tmp_path / "small.zip", {"submission.json": text}), 3) == entries


# --- error messages programmers and users read ---------------------------------------------------
def test_corpus_sari_argument_errors():
    from metrics.sari import corpus_sari

    with pytest.raises(ValueError, match="^sources, predictions and references must have the same length$"):
        corpus_sari(["a"], ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="^no predictions$"):
        corpus_sari([], [], [])


def test_truncate_words_needs_one_word():
    from data.submission import truncate_words

    with pytest.raises(ValueError, match="^max_words must be at least 1$"):
        truncate_words("a b", 0)
    assert truncate_words("a b c", 1) == "a"


@pytest.mark.parametrize("field", ["hidden_size", "proj_dim", "mlp_dim"])
def test_head_config_dimensions_must_be_positive(field):
    from heads.config import HeadConfig

    sizes = dict(hidden_size=8, proj_dim=4, mlp_dim=4)
    with pytest.raises(ValueError, match="^hidden_size, proj_dim and mlp_dim must be positive$"):
        HeadConfig(**{**sizes, field: 0})
    assert getattr(HeadConfig(**{**sizes, field: 1}), field) == 1


def test_check_training_cases_message():
    from metrics.training_cases import TrainingCaseLeak, check_training_cases

    assert check_training_cases(["3", "1"], None, False, "sub.json") == []
    assert check_training_cases(["3", "1", "2"], ["2", "1", "9"], True, "sub.json") == ["1", "2"]
    with pytest.raises(TrainingCaseLeak) as err:
        check_training_cases(["3", "2", "1"], ["2", "1"], False, "sub.json")
    assert str(err.value) == (
        "sub.json: case 1: 2 of the scored cases are training cases of this export (this one "
        "among them); refused (pass --allow-train-cases to get optimistic, labelled numbers)"
    )


def test_score_subtask2_input_errors(tmp_path):
    from metrics.subtask2 import score_subtask2

    key = json.loads((EXAMPLES / "archehr-qa_key.json").read_text(encoding="utf-8"))
    entries = [{"case_id": c["case_id"], "prediction": []} for c in key]
    first = key[0]["case_id"]
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps([{"case_id": first, "prediction": ["1", "998", "999"]}] + entries[1:]))
    with pytest.raises(InputError) as err:
        score_subtask2(sub, EXAMPLES / "archehr-qa_key.json")
    assert str(err.value) == f"{sub}: case {first}: unknown sentence id '998'"
    unlabelled = tmp_path / "key.json"
    unlabelled.write_text(json.dumps([{**key[0], "answers": []}] + key[1:]))
    sub.write_text(json.dumps(entries))
    with pytest.raises(InputError) as err:
        score_subtask2(sub, unlabelled)
    assert (
        str(err.value) == f"{unlabelled}: case {first}: key case has no relevance labels ('answers') to score against"
    )


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_pool_empty_inputs(pooling):
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig

    head = NotePairHead(HeadConfig(hidden_size=4, proj_dim=4, mlp_dim=4, pooling=pooling))
    hidden = torch.randn(1, 6, 4, dtype=torch.float64)
    none = head.pool(hidden, torch.zeros((0, 3), dtype=torch.long))
    assert none.shape == (0, 4) and none.dtype == torch.float32
    pooled = head.pool(hidden, [(0, 2, 2), (0, 1, 3)])  # an empty span pools to zeros
    assert pooled.dtype == torch.float32
    assert torch.equal(pooled[0], torch.zeros(4))
    if pooling == "mean":
        assert torch.allclose(pooled[1], hidden[0, 1:3].float().mean(0))


# --- heads/alignment.py: construction, scoring and batching by hand ------------------------------
def test_head_constructor_arguments_reach_the_config():
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig

    head = NotePairHead(8, proj_dim=4, pooling="attention", relevance=False, mlp_dim=6, dropout=0.25, layer=3)
    assert head.config == HeadConfig(
        hidden_size=8, proj_dim=4, mlp_dim=6, pooling="attention", relevance=False, dropout=0.25, layer=3
    )
    assert NotePairHead(8, proj_dim=4).config.mlp_dim == 4  # mlp_dim defaults to proj_dim here
    assert isinstance(head.token_scorer, torch.nn.Linear) and head.relevance_mlp is None
    assert NotePairHead(8, proj_dim=4).token_scorer is None


def test_head_layers_and_prior():
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig

    head = NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=6, dropout=0.3))
    for mlp, width in ((head.pair_mlp, 16), (head.relevance_mlp, 4)):
        kinds = [type(m).__name__ for m in mlp]
        assert kinds == ["Linear", "GELU", "Dropout", "Linear"]
        assert (mlp[0].in_features, mlp[0].out_features, mlp[-1].out_features) == (width, 6, 1)
        assert mlp[2].p == 0.3
    # The pair logit starts at the prior log-odds of a 10% positive rate: log(0.1 / 0.9).
    assert float(head.pair_mlp[-1].bias) == pytest.approx(math.log(1 / 9))


def test_head_score_features_by_hand():
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig

    torch.manual_seed(0)
    head = NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=6)).eval()
    answers, notes = torch.randn(2, 8), torch.randn(3, 8)
    out = head.score(answers, notes)
    a = head.answer_proj(head.norm(answers))
    n = head.note_proj(head.norm(notes))
    for i in range(2):
        for j in range(3):
            feats = torch.cat([a[i], n[j], a[i] * n[j], torch.abs(a[i] - n[j])])
            assert float(out.pair_logits[i, j]) == pytest.approx(float(head.pair_mlp(feats)[0]), abs=1e-5)
    assert out.relevance_logits.shape == (3,)
    for j in range(3):
        assert float(out.relevance_logits[j]) == pytest.approx(float(head.relevance_mlp(n[j])[0]), abs=1e-5)


def test_head_batch_of_three_equals_one_at_a_time():
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig

    torch.manual_seed(1)
    head = NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=6)).eval()
    hidden = torch.randn(3, 10, 8)
    notes = [[(0, 2), (2, 5)], [(1, 3), (3, 4), (4, 9)], [(0, 1)]]
    answers = [[(6, 8)], [(9, 10), (5, 7)], [(2, 6), (7, 9)]]
    note_spans = torch.tensor([(row, s, e) for row, spans in enumerate(notes) for s, e in spans])
    answer_spans = torch.tensor([(row, s, e) for row, spans in enumerate(answers) for s, e in spans])
    pair_logits, relevance = head(hidden, note_spans, answer_spans, note_counts=[2, 3, 1], answer_counts=[1, 2, 2])
    singles = [head(hidden[row], notes[row], answers[row]) for row in range(3)]
    assert len(pair_logits) == 3
    for got, single in zip(pair_logits, singles):
        assert torch.allclose(got, single.pair_logits, atol=1e-6)
    assert torch.allclose(relevance, torch.cat([s.relevance_logits for s in singles]), atol=1e-6)
    no_rel = NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=6, relevance=False))
    assert no_rel(hidden, note_spans, answer_spans, note_counts=[2, 3, 1], answer_counts=[1, 2, 2])[1] is None


def test_load_head_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    from heads.alignment import HEAD_WEIGHTS, NotePairHead, load_head, save_head
    from heads.config import HeadConfig

    save_head(NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=4)), tmp_path)
    state = load_file(str(tmp_path / HEAD_WEIGHTS))
    state.pop("note_proj.bias")
    save_file(state, str(tmp_path / HEAD_WEIGHTS))
    with pytest.raises(RuntimeError, match="note_proj.bias"):
        load_head(tmp_path)


def test_head_config_file_text(tmp_path):
    from heads.config import HeadConfig

    cfg = HeadConfig(hidden_size=8)
    cfg.save(tmp_path / "head_config.json")
    text = (tmp_path / "head_config.json").read_text(encoding="utf-8")
    assert text.startswith('{\n  "hidden_size": 8,\n  "proj_dim": ') and text.endswith("}\n")
    assert HeadConfig.load(tmp_path / "head_config.json") == cfg


def test_alignment_losses_with_a_real_head():
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from training.joint import LossSettings, alignment_losses

    torch.manual_seed(2)
    head = NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=6)).eval()
    hidden = torch.randn(1, 6, 8)
    batch = {
        "note_spans": torch.tensor([[0, 0, 2], [0, 2, 4]]),
        "answer_spans": torch.tensor([[0, 4, 6]]),
        "pair_index": torch.tensor([[0, 0], [0, 1]]),
        "pair_targets": torch.tensor([1.0, 0.0]),
        "relevance_index": torch.tensor([0, 1]),
        "relevance_labels": torch.tensor([0.0, 1.0]),
    }
    out = alignment_losses(head, hidden, batch, LossSettings(pos_weight=3.0))
    single = head(hidden[0], [(0, 2), (2, 4)], [(4, 6)])
    logits = single.pair_logits.reshape(-1).tolist()
    assert float(out["align"]) == pytest.approx((_bce(logits[0], 1, 3.0) + _bce(logits[1], 0, 3.0)) / 2, rel=1e-5)
    rel = single.relevance_logits.tolist()
    assert float(out["relevance"]) == pytest.approx((_bce(rel[0], 0) + _bce(rel[1], 1)) / 2, rel=1e-5)


# --- metrics/generation.py and metrics/subtask3.py: the report record, by hand --------------------
def test_generation_scores_json_partial_and_official():
    from metrics.generation import GenerationScores

    partial = GenerationScores(
        scores={"bleu": 10.0, "rougeLsum": 20.0, "sari": 30.0, "bertscore_unofficial": 55.0},
        per_case={"1": {"bleu": 10.0}},
        computed=["bleu", "rougeLsum", "sari"],
        not_computed=["bertscore", "alignscore", "medcon"],
        reasons={"bertscore": "no model", "medcon": "no UMLS"},
        overall_mean=20.0,
        notes={"bertscore_unofficial": "another model"},
    )
    assert partial.to_json() == {
        "bleu": 10.0,
        "rouge1": None,
        "rouge2": None,
        "rougeL": None,
        "rougeLsum": 20.0,
        "sari": 30.0,
        "bertscore": None,
        "alignscore": None,
        "medcon": None,
        "bertscore_unofficial": 55.0,
        "overall_mean_of_computed": 20.0,
        "overall_name": "mean of 3 of 6 metrics (bleu, rougeLsum, sari); not the official overall score",
        "computed": ["bleu", "rougeLsum", "sari"],
        "not_computed": {"bertscore": "no model", "alignscore": "", "medcon": "no UMLS"},
        "notes": {"bertscore_unofficial": "another model"},
        "per_case": {"1": {"bleu": 10.0}},
    }
    names = ("bleu", "rougeLsum", "sari", "bertscore", "alignscore", "medcon")
    full = GenerationScores(
        scores={n: 1.0 for n in names}, per_case={}, computed=list(names), not_computed=[], overall_mean=1.0
    )
    out = full.to_json()
    assert out["overall_score"] == 1.0 and "overall_name" not in out and "overall_mean_of_computed" not in out
    assert "notes" not in out and out["not_computed"] == {} and full.overall_name.startswith("overall_score (official")


def test_official_truncation_and_reference_answer():
    from data.records import AnswerSentence, Case, NoteSentence
    from metrics.subtask3 import official_truncation, reference_answer

    words = [f"w{i}" for i in range(80)]
    assert official_truncation(" ".join(words)) == " ".join(words[:75])
    assert official_truncation("  a\\n b  ") == "  a\\n b  "  # 75 words or fewer: unchanged, spacing kept
    exactly = "  ".join(words[:75])
    assert official_truncation(exactly) == exactly
    case = Case(
        "1",
        "",
        "",
        [NoteSentence("1", "n")],
        answer_sentences=[AnswerSentence("1", "One."), AnswerSentence("2", "Two.")],
    )
    assert reference_answer(case) == "One. Two."
    case.clinician_answer_without_citations = "The answer."
    assert reference_answer(case) == "The answer."


def test_score_subtask3_input_errors(tmp_path):
    from metrics.subtask3 import score_subtask3

    xml, key_path = EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json"
    key = json.loads(key_path.read_text(encoding="utf-8"))
    ids = [c["case_id"] for c in key]
    sub = tmp_path / "sub.json"
    sub.write_text(
        json.dumps([{"case_id": cid, "prediction": "An answer." if i else "  "} for i, cid in enumerate(ids)])
    )
    with pytest.raises(InputError) as err:
        score_subtask3(sub, key_path, xml)
    assert str(err.value) == (
        f"{sub}: case {ids[0]}: prediction has no tokens after 13a tokenization (the official BLEU cannot score it)"
    )


def test_score_relevance_needs_cases():
    from metrics.relevance import score_relevance

    with pytest.raises(ValueError, match="^no cases to score$"):
        score_relevance({}, {})


# --- training/joint.py: joint_losses and JointModel on a tiny causal LM, fast on the CPU ---------
def _tiny_causal_lm():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        intermediate_size=16,
        vocab_size=32,
        tie_word_embeddings=True,
        max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(cfg).eval()


def _joint_batch():
    # Two examples of 6 tokens; row 1 is right-padded by one token. Example 0 has two note
    # sentences and one answer sentence, example 1 one of each; notes 0 and 2 carry relevance labels.
    return {
        "input_ids": torch.tensor([[1, 5, 9, 3, 7, 2], [4, 8, 6, 11, 12, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, -100, 3, 7, 2], [-100, -100, 6, 11, 12, -100]]),
        "note_spans": torch.tensor([[0, 0, 2], [0, 2, 3], [1, 0, 2]]),
        "answer_spans": torch.tensor([[0, 3, 5], [1, 2, 4]]),
        "pair_index": torch.tensor([[0, 0], [0, 1], [1, 2]]),
        "pair_targets": torch.tensor([1.0, 0.0, 1.0]),
        "relevance_index": torch.tensor([0, 2]),
        "relevance_labels": torch.tensor([1.0, 0.0]),
    }


def _reference_forward(model, batch):
    """transformers' own forward of ``batch`` with its labels: the shifted CE over the labelled
    tokens (the reference LM loss) and every layer's hidden states."""
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        output_hidden_states=True,
    )


def _expected_alignment(head, hidden_states, pos_weight):
    """Pair and relevance BCE by hand from the head run one example at a time."""
    with torch.no_grad():
        first = head(hidden_states[0], [(0, 2), (2, 3)], [(3, 5)])
        second = head(hidden_states[1], [(0, 2)], [(2, 4)])
    pairs = first.pair_logits.reshape(-1).tolist() + second.pair_logits.reshape(-1).tolist()
    align = sum(_bce(x, t, pos_weight) for x, t in zip(pairs, [1.0, 0.0, 1.0])) / 3
    rel = first.relevance_logits.tolist() + second.relevance_logits.tolist()
    relevance = (_bce(rel[0], 1.0) + _bce(rel[2], 0.0)) / 2
    return align, relevance


@pytest.mark.parametrize("layer", [-1, 1])
def test_joint_losses_by_hand(layer):
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from training.joint import JointModel, LossSettings, joint_losses

    model = _tiny_causal_lm()
    torch.manual_seed(1)
    head = NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=6, layer=layer)).eval()
    batch = _joint_batch()
    settings = LossSettings(align_weight=0.7, pos_weight=3.0, relevance_weight=0.2)
    with torch.no_grad():
        ref = _reference_forward(model, batch)
        out = joint_losses(model, head, batch, settings, head_layer=layer)
        wrapped = JointModel(model, head, settings)(batch)
    align, relevance = _expected_alignment(head, ref.hidden_states[layer], 3.0)
    lm = float(ref.loss)
    assert set(out) == {"lm", "align", "relevance", "loss", "answer_tokens"}
    assert int(out["answer_tokens"]) == 6
    assert float(out["lm"]) == pytest.approx(lm, rel=1e-5)
    assert float(out["align"]) == pytest.approx(align, rel=1e-5)
    assert float(out["relevance"]) == pytest.approx(relevance, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(lm + 0.7 * align + 0.2 * relevance, rel=1e-5)
    # JointModel reads the layer from the head's config: the same numbers.
    assert {k: float(v) for k, v in wrapped.items()} == pytest.approx({k: float(v) for k, v in out.items()})
    # The intermediate layer really is another state than the final one.
    assert (layer == -1) == torch.equal(ref.hidden_states[layer], ref.hidden_states[-1])


def test_joint_losses_use_collates_answer_positions():
    from training.joint import LossSettings, joint_losses

    model = _tiny_causal_lm()
    batch = _joint_batch()
    # Flat positions over [B*(T-1)] = 2 x 5 next-token slots: slot 3 of row 0 (predicts token 5
    # of row 0) and slot 2 of row 1 (predicts token 3 of row 1); the other labels are ignored.
    batch["answer_positions"] = torch.tensor([3, 7])
    batch["answer_targets"] = torch.tensor([7, 11])
    only = torch.full_like(batch["labels"], -100)
    only[0, 4], only[1, 3] = 7, 11
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=only)
        out = joint_losses(model, None, batch, LossSettings())
    assert int(out["answer_tokens"]) == 2
    assert float(out["lm"]) == pytest.approx(float(ref.loss), rel=1e-5)


def test_joint_losses_without_head_or_notes_is_the_lm_loss():
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from training.joint import JointModel, LossSettings, joint_losses

    model = _tiny_causal_lm()
    head = NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=6)).eval()
    batch = _joint_batch()
    with torch.no_grad():
        ref = _reference_forward(model, batch)
        no_head = JointModel(model, None, LossSettings(align_weight=0.5))(batch)
        empty = dict(batch, note_spans=torch.zeros((0, 3), dtype=torch.long))
        no_notes = joint_losses(model, head, empty, LossSettings(align_weight=0.5))
    for out in (no_head, no_notes):
        assert set(out) == {"lm", "loss", "answer_tokens"}
        assert float(out["loss"]) == float(out["lm"]) == pytest.approx(float(ref.loss), rel=1e-5)
        assert int(out["answer_tokens"]) == 6


# --- data/submission.py: citation markers out of generated / extracted text ----------------------
def test_strip_citation_markers():
    from data.submission import strip_citation_markers

    text = "The dose was raised [3]. Then |3, 5a| stopped  [ 7 ]\n now [a] |x| [] ok|3|."
    assert strip_citation_markers(text) == "The dose was raised . Then stopped now [a] |x| [] ok ."
    assert strip_citation_markers("  \t ") == ""
    assert strip_citation_markers("a[1,2]b") == "a b"


# --- metrics/training_cases.py: an export's training cases, read without loading the model -------
def test_export_training_case_ids(tmp_path):
    from metrics.training_cases import export_training_case_ids

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "manifest.json").write_text(json.dumps(_a_manifest()), encoding="utf-8")
    assert export_training_case_ids(run) == ["101", "102"]
    assert export_training_case_ids(run / "export") == ["101", "102"]
    old = dict(_a_manifest())
    del old["training_case_ids"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(old), encoding="utf-8")
    assert export_training_case_ids(tmp_path / "old") is None
    # No export there (the loader reports that itself), or a name the OS refuses: unknown.
    assert export_training_case_ids(tmp_path / "missing") is None
    assert export_training_case_ids(tmp_path / ("x" * 5000)) is None
    # A tampered manifest is refused: an unreadable list must never skip the training-case check.
    bad = dict(_a_manifest(), training_case_ids="101")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(InputError, match="training_case_ids"):
        export_training_case_ids(tmp_path / "bad")


# --- metrics/bertscore.py: the rescaling baseline shipped inside bert-score ----------------------
def test_bertscore_baseline_file(tmp_path):
    import types

    from metrics.bertscore import _baseline_file

    module = types.ModuleType("bert_score")
    module.__file__ = str(tmp_path / "site" / "bert_score" / "__init__.py")
    expected = tmp_path / "site" / "bert_score" / "rescale_baseline" / "en" / "distilbert-base-uncased.tsv"
    assert _baseline_file(module) == expected
    module.__file__ = None
    with pytest.raises(AssertionError, match="^bert_score is an installed package with a file$"):
        _baseline_file(module)


# --- heads/alignment.py: everything the head builds lives on the hidden states' device ----------
@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_head_follows_the_hidden_states_device(pooling):
    # The meta device stands in for a GPU: a tensor left on the CPU cannot meet a meta tensor.
    from heads.alignment import NotePairHead, spans_tensor
    from heads.config import HeadConfig

    meta = torch.device("meta")
    for spans in ([[1, 2]], torch.tensor([[0, 1, 2]]), [], torch.zeros((0, 2), dtype=torch.long)):
        t = spans_tensor(spans, meta)
        assert t.device == meta and t.dtype == torch.long and t.shape[1] == 3
    head = NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=6, pooling=pooling)).to(meta)
    hidden = torch.zeros(2, 6, 8, device=meta)
    pooled = head.pool(hidden, [[0, 0, 2], [1, 2, 5]])
    assert pooled.device == meta and pooled.shape == (2, 8) and pooled.dtype == torch.float32
    out = head(hidden, [[0, 0, 2], [1, 2, 5]], [[0, 3, 4]], pair_index=torch.tensor([[0, 0], [0, 1]], device=meta))
    assert out.pair_logits.device == meta and out.pair_logits.shape == (2,)
    assert out.relevance_logits.device == meta and out.relevance_logits.shape == (2,)


def test_load_head_moves_to_the_given_device(tmp_path):
    from heads.alignment import NotePairHead, load_head, save_head
    from heads.config import HeadConfig

    save_head(NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=6)), tmp_path)
    assert {p.device.type for p in load_head(tmp_path, "meta").parameters()} == {"meta"}
    assert {p.device.type for p in load_head(tmp_path, torch.device("meta")).parameters()} == {"meta"}
    assert {p.device.type for p in load_head(tmp_path).parameters()} == {"cpu"}


def test_head_without_relevance_scores_pairs_only():
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig

    torch.manual_seed(0)
    head = NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=6, relevance=False)).eval()
    hidden = torch.randn(1, 6, 8)
    out = head(hidden, [[0, 0, 2], [0, 2, 4]], [[0, 4, 6]], pair_index=torch.tensor([[0, 1]]))
    assert out.relevance_logits is None
    single = head(hidden[0], [(0, 2), (2, 4)], [(4, 6)])
    assert single.relevance_logits is None
    assert float(out.pair_logits[0]) == pytest.approx(float(single.pair_logits[0, 1]), rel=1e-6)


def test_head_batch_counts_come_together():
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig

    head = NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=6))
    with pytest.raises(AssertionError, match="^note_counts and answer_counts come together$"):
        head(torch.zeros(1, 6, 8), [[0, 0, 2]], [[0, 3, 4]], note_counts=[1])


# --- training/joint.py: one pair / one labelled note still counts; the loss keeps the logits' dtype
def test_alignment_loss_of_a_single_pair_and_a_single_labelled_note():
    from training.joint import LossSettings, alignment_losses

    head = _FixedHead(
        torch.tensor([0.5], dtype=torch.float64), rel_logits=torch.tensor([1.5, -2.0], dtype=torch.float64)
    )
    out = alignment_losses(head, torch.zeros(1), _batch([1.0], rel_labels=[0.0], rel_index=[1]), LossSettings())
    # pos_weight defaults to TrainConfig's; the float32 targets follow the float64 logits.
    from training.config import TrainConfig

    assert out["align"].dtype == torch.float64 and out["relevance"].dtype == torch.float64
    assert float(out["align"]) == pytest.approx(_bce(0.5, 1.0, TrainConfig.pos_weight), rel=1e-9)
    assert float(out["relevance"]) == pytest.approx(_bce(-2.0, 0.0), rel=1e-9)


# --- data/submission.py: truncation edges ---------------------------------------------------------
def test_truncate_words_edges():
    from data.submission import truncate_words

    # Within the limit the text comes back untouched, spacing and all.
    assert truncate_words("a  b\n", 2) == "a  b\n"
    # The first kept word may be the sentence end.
    assert truncate_words("Yes. and more words", 3) == "Yes."
    assert truncate_words("Yes and more words", 3) == "Yes and more"
    assert truncate_words('He said "stop." then left', 3) == 'He said "stop."'


# --- data/submission.py: an encrypted member is named as such ------------------------------------
def test_encrypted_zip_member_is_refused(tmp_path):
    from data.submission import read_submission

    path = _zip(tmp_path / "locked.zip", {"submission.json": b"[]"}, compression=0)
    raw = bytearray(path.read_bytes())
    # Set bit 0 (encrypted) of the general-purpose flags in the local and the central header.
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.index(signature) + offset
        raw[at] |= 0x1
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError) as err:
        read_submission(path, 3)
    assert str(err.value) == f"{path}: submission.json in the zip is encrypted; zip it without a password"


# --- files named in messages ----------------------------------------------------------------------
def test_validate_subtask2_names_the_file():
    from data.archehr import load_cases
    from data.submission import validate_subtask2

    cases = load_cases(EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json")
    with pytest.raises(InputError) as err:
        validate_subtask2({"case_id": "1"}, cases, "sub.json")
    assert str(err.value).startswith("sub.json: ")
    with pytest.raises(InputError) as err:
        validate_subtask2([{"case_id": c.case_id, "prediction": []} for c in cases[1:]], cases, "sub.json")
    assert str(err.value) == f"sub.json: case {cases[0].case_id}: case missing from the submission (1 missing)"


def test_score_subtask2_names_the_key_of_a_case_set_mismatch(tmp_path):
    from metrics.subtask2 import score_subtask2

    key_path = EXAMPLES / "archehr-qa_key.json"
    key = json.loads(key_path.read_text(encoding="utf-8"))
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps([{"case_id": c["case_id"], "prediction": []} for c in key[1:]]))
    with pytest.raises(InputError) as err:
        score_subtask2(sub, key_path)
    assert str(err.value).startswith(f"{sub}: case ids differ from the key {key_path}: 1 of the key's ")


def test_case_set_difference_shows_five_ids_then_dots():
    from metrics.case_sets import case_set_difference

    five = ["1", "2", "3", "4", "5"]
    assert case_set_difference([], five) == "5 of the key's 5 cases missing from the submission (1, 2, 3, 4, 5)"
    assert case_set_difference([], five + ["6"]) == (
        "6 of the key's 6 cases missing from the submission (1, 2, 3, 4, 5, ...)"
    )


def test_manifest_training_case_ids_of_no_manifest():
    from metrics.training_cases import manifest_training_case_ids

    assert manifest_training_case_ids(None) is None


def test_run_record_with_a_bad_manifest_names_the_run_record(tmp_path):
    from metrics.training_cases import run_record_training_case_ids

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"export_manifest": {"preset": 3}}), encoding="utf-8")
    with pytest.raises(InputError) as err:
        run_record_training_case_ids(path)
    assert str(err.value).startswith(f"{path}: ")


def test_a_folder_named_submission_json_is_not_the_member(tmp_path):
    # A folder's entry is "submission.json/": the member is not there at all.
    import zipfile

    from data.submission import read_submission

    path = tmp_path / "folder.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.mkdir("submission.json")
        zf.writestr("submission.json/x.json", b"[]")
    with pytest.raises(InputError) as err:
        read_submission(path, 3)
    assert str(err.value) == f"{path}: zip has no submission.json at its root"


# --- data/submission.py: every Subtask 3 / 4 rule names the file and the case ---------------------
def _example_cases():
    from data.archehr import load_cases

    return load_cases(EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json")


def _subtask3_problem(change) -> str | None:
    from data.submission import validate_subtask3

    cases = _example_cases()
    entries = [{"case_id": c.case_id, "prediction": "An answer."} for c in cases]
    change(entries)
    try:
        validate_subtask3(entries, cases, "sub.json")
    except InputError as err:
        return str(err)
    return None


def test_validate_subtask3_messages():
    first = _example_cases()[0].case_id

    def set_first(text):
        return lambda entries: entries[0].update(prediction=text)

    assert _subtask3_problem(lambda e: None) is None
    assert _subtask3_problem(set_first(" \n ")) == f"sub.json: case {first}: prediction is empty"
    assert _subtask3_problem(set_first("<skipped>")) == (
        f"sub.json: case {first}: prediction has no tokens after 13a tokenization (the official scorer would "
        "crash on it)"
    )
    assert _subtask3_problem(set_first(" ".join(["word"] * 75))) is None  # exactly the limit
    assert _subtask3_problem(set_first(" ".join(["word"] * 76))) == (
        f"sub.json: case {first}: prediction has 76 words, more than 75"
    )
    assert _subtask3_problem(set_first("The stent stays [3, 4].")) == (
        f"sub.json: case {first}: prediction contains a citation marker '[3, 4]'"
    )
    assert _subtask3_problem(lambda e: e.pop()).startswith("sub.json: case ")
    assert _subtask3_problem(lambda e: e.append("x")) == "sub.json: entry 3 is not an object"


def test_validate_subtask4_messages():
    from data.submission import validate_subtask4

    cases = _example_cases()
    first = cases[0]
    a1, a2 = first.answer_ids[:2]
    n1, n2 = first.note_ids[:2]

    def problem(items) -> str | None:
        entries = [
            {
                "case_id": c.case_id,
                "prediction": [{"answer_id": a, "evidence_id": [c.note_ids[0]]} for a in c.answer_ids],
            }
            for c in cases
        ]
        if items is not None:
            entries[0]["prediction"] = items
        try:
            validate_subtask4(entries, cases, "sub.json")
        except InputError as err:
            return str(err)
        return None

    rest = [{"answer_id": a, "evidence_id": []} for a in first.answer_ids[1:]]
    assert problem(None) is None
    assert problem([{"answer_id": a1, "evidence_id": []}] + rest) is None
    case = f"sub.json: case {first.case_id}: "
    assert problem([{"answer_id": "999", "evidence_id": []}] + rest) == case + "unknown answer_id '999'"
    assert problem([{"answer_id": a2, "evidence_id": []}] + rest) == case + f"answer_id '{a2}' listed twice"
    assert problem([{"answer_id": a1, "evidence_id": [n1, n1]}] + rest) == (
        case + f"answer {a1}: duplicate evidence ids"
    )
    assert problem([{"answer_id": a1, "evidence_id": [n2, "999"]}] + rest) == (
        case + f"answer {a1}: unknown evidence id '999'"
    )
    assert problem(rest) == case + f"answer sentence '{a1}' is not listed"
    assert problem("x") == case + "prediction must be a list of {answer_id, evidence_id}"
    with pytest.raises(InputError) as err:
        validate_subtask4([], cases, "sub.json")
    assert str(err.value) == f"sub.json: case {first.case_id}: case missing from the submission (3 missing)"


# --- metrics/subtask4.py and metrics/subtask3.py: the scorers name the file at fault -------------
def _scored_error(tmp_path, scorer, entries, key=None) -> str:
    key_path = EXAMPLES / "archehr-qa_key.json"
    if key is not None:
        key_path = tmp_path / "key.json"
        key_path.write_text(json.dumps(key), encoding="utf-8")
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps(entries), encoding="utf-8")
    with pytest.raises(InputError) as err:
        scorer(sub, key_path)
    return str(err.value).replace(str(sub), "SUB").replace(str(key_path), "KEY")


def test_subtask4_scorer_messages(tmp_path):
    from metrics.subtask4 import score_subtask4

    key = json.loads((EXAMPLES / "archehr-qa_key.json").read_text(encoding="utf-8"))
    first = key[0]["case_id"]
    good = [
        {
            "case_id": c["case_id"],
            "prediction": [{"answer_id": a["id"], "evidence_id": []} for a in c["clinician_answer_sentences"]],
        }
        for c in key
    ]
    assert _scored_error(tmp_path, score_subtask4, good[1:]).startswith(
        "SUB: case ids differ from the key KEY: 1 of the key's 3 cases missing from the submission"
    )
    bad = json.loads(json.dumps(good))
    bad[0]["prediction"][0]["answer_id"] = "999"
    assert _scored_error(tmp_path, score_subtask4, bad) == f"SUB: case {first}: unknown answer_id '999'"
    bad = json.loads(json.dumps(good))
    bad[0]["prediction"][0]["evidence_id"] = ["1", "999"]
    assert _scored_error(tmp_path, score_subtask4, bad) == f"SUB: case {first}: answer 1: unknown evidence id '999'"
    no_answers = [dict(key[0], clinician_answer_sentences=[])] + key[1:]
    assert _scored_error(tmp_path, score_subtask4, good, no_answers) == (
        f"KEY: case {first}: key case has no clinician_answer_sentences to align"
    )


def test_subtask3_scorer_messages(tmp_path):
    from metrics.subtask3 import score_subtask3

    xml = EXAMPLES / "archehr-qa.xml"
    key = json.loads((EXAMPLES / "archehr-qa_key.json").read_text(encoding="utf-8"))
    first = key[0]["case_id"]
    good = [{"case_id": c["case_id"], "prediction": "An answer."} for c in key]

    def score(sub, key_path):
        return score_subtask3(sub, key_path, xml)

    assert _scored_error(tmp_path, score, good[1:]).startswith(
        "SUB: case ids differ from the key KEY: 1 of the key's 3 cases missing from the submission"
    )
    silent = [dict(key[0], clinician_answer_without_citations="<skipped>")] + key[1:]
    assert _scored_error(tmp_path, score, good, silent) == (
        f"KEY: case {first}: key case has no clinician answer to compare with"
    )


# --- metrics/alignment.py and case_sets.py: the edges of the official Subtask 4 scores -----------
def test_score_alignment_edges():
    from metrics.alignment import score_alignment

    with pytest.raises(ValueError, match="^no cases to score$"):
        score_alignment({}, {})
    zeros = {
        "micro_precision": 0.0,
        "micro_recall": 0.0,
        "micro_f1": 0.0,
        "macro_precision": 0.0,
        "macro_recall": 0.0,
        "macro_f1": 0.0,
        "overall_score": 0.0,
    }
    # Nothing predicted: precision 0, not 1 (and no division by zero); no gold pair: recall 0.
    assert score_alignment({"1": set()}, {"1": {("1", "2")}}) == zeros
    assert score_alignment({"1": {("1", "2")}}, {"1": set()}) == zeros


def test_check_same_case_sets_names_five_of_each():
    from metrics.case_sets import check_same_case_sets

    gold = [str(i) for i in range(10, 17)]
    with pytest.raises(ValueError) as err:
        check_same_case_sets(["1", "2", "3", "4", "5", "6", "7"], gold)
    assert str(err.value) == (
        "case sets differ: extra ['1', '2', '3', '4', '5'], missing ['10', '11', '12', '13', '14']"
    )


# --- training/joint.py: the chunked LM projection's contract -------------------------------------
def test_answer_token_loss_projects_in_chunks(monkeypatch):
    import training.joint as joint

    sizes: list[int] = []
    real = joint._chunk_ce_sum

    def spy(states, targets, weight):
        sizes.append(states.shape[0])
        return real(states, targets, weight)

    monkeypatch.setattr(joint, "_chunk_ce_sum", spy)
    torch.manual_seed(0)
    stub = _LMStub(vocab=11, hidden=6)
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, 8, 9, 10]])
    for chunk, grad, expected in [
        (2, True, [2, 2, 2]),
        (4, True, [4, 2]),
        (6, True, [6]),
        (None, True, [6]),
        (2, False, [6]),
    ]:
        sizes.clear()
        with torch.set_grad_enabled(grad):
            joint.answer_token_loss(stub, hidden, labels, chunk=chunk)
        assert sizes == expected, (chunk, grad)


def test_chunked_answer_loss_dtype_and_autograd_grad():
    from training.joint import answer_token_loss

    torch.manual_seed(0)
    stub = _LMStub(vocab=11, hidden=6)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, 8, 9, 10]])
    whole, _ = answer_token_loss(stub, hidden, labels)
    chunked, _ = answer_token_loss(stub, hidden, labels, chunk=2)
    # Hidden states in another dtype than the LM head are cast to it; both paths give fp32.
    assert whole.dtype == chunked.dtype == torch.float32
    assert float(chunked) == pytest.approx(float(whole), rel=1e-6)
    (g_whole,) = torch.autograd.grad(whole, hidden)
    (g_chunked,) = torch.autograd.grad(chunked, hidden)  # non-reentrant checkpointing allows .grad()
    assert torch.allclose(g_whole, g_chunked, rtol=1e-5, atol=1e-7)


def test_case_set_messages_name_the_file():
    first = _example_cases()[0].case_id
    assert _subtask3_problem(lambda e: e.append(dict(e[0]))) == f"sub.json: case {first}: case listed twice"
    assert _subtask3_problem(lambda e: e.__setitem__(0, {"case_id": "77", "prediction": "An answer."})) == (
        "sub.json: case 77: case is not among the cases"
    )


# --- data/submission.py: what write_submission puts on disk --------------------------------------
def test_write_submission_bytes(tmp_path):
    import zipfile

    from data.submission import write_submission

    cases = _example_cases()
    entries = [{"case_id": c.case_id, "prediction": "Fieber ≥ 38 °C."} for c in cases]
    json_path, zip_path = write_submission(entries, tmp_path, 3, cases)
    assert json_path == tmp_path / "subtask3" / "submission.json" and zip_path == tmp_path / "subtask3.zip"
    expected = "[\n" + ",\n".join(
        f'  {{\n    "case_id": "{c.case_id}",\n    "prediction": "Fieber ≥ 38 °C."\n  }}' for c in cases
    )
    expected = (expected + "\n]\n").encode("utf-8")
    assert json_path.read_bytes() == expected
    with zipfile.ZipFile(zip_path) as zf:
        (info,) = zf.infolist()
        assert info.filename == "submission.json" and info.compress_type == zipfile.ZIP_DEFLATED
        assert zf.read(info) == expected
    # Writing again into the same folder replaces both files.
    entries[0]["prediction"] = "Another answer."
    write_submission(entries, tmp_path, 3, cases)
    assert b"Another answer." in json_path.read_bytes()
    with pytest.raises(ValueError, match="^subtask must be 2, 3 or 4, not 5$"):
        write_submission(entries, tmp_path, 5, cases)


# --- metrics/bertscore.py and metrics/generation.py: BERTScore through a stand-in bert_score -----
_DISTILBERT = {
    "model_type": "distilbert",
    "vocab_size": 30522,
    "n_layers": 6,
    "dim": 768,
    "architectures": ["DistilBertForMaskedLM"],
}


class _FakeBertScore:
    """Stands in for the ``bert_score`` package: records the call, returns fixed F1 values."""

    def __init__(self, root: Path, f1=(0.5, 0.25), error: Exception | None = None):
        import types

        self.calls: list[tuple] = []
        self.module = types.ModuleType("bert_score")
        self.module.__file__ = str(root / "bert_score" / "__init__.py")
        self.module.score = self.score
        self.f1, self.error = f1, error

    def score(self, predictions, references, **kwargs):
        self.calls.append((predictions, references, kwargs))
        if self.error is not None:
            raise self.error
        return None, None, torch.tensor(self.f1[: len(predictions)])


def _model_folder(tmp_path: Path, name: str, config: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_bertscore_f1_official_and_not(tmp_path, monkeypatch):
    import sys

    from metrics.bertscore import BertScoreResult, bertscore_f1

    fake = _FakeBertScore(tmp_path)
    monkeypatch.setitem(sys.modules, "bert_score", fake.module)
    no_model = "pass --bertscore-model with a local copy of distilbert-base-uncased (no downloads at scoring time)"
    assert bertscore_f1(["a"], ["b"], None) == BertScoreResult("bertscore", None, no_model, None)
    missing = tmp_path / "missing"
    assert bertscore_f1(["a"], ["b"], str(missing)) == BertScoreResult(
        "bertscore_unofficial", None, f"{missing} is not a local model folder (no downloads at scoring time)"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bertscore_f1(["a"], ["b"], empty) == BertScoreResult(
        "bertscore_unofficial", None, f"{empty} is not a local model folder (no downloads at scoring time)"
    )
    official = _model_folder(tmp_path, "distil", _DISTILBERT)
    out = bertscore_f1(["p1", "p2"], ["r1", "r2"], str(official))
    assert out == BertScoreResult(
        "bertscore",
        [50.0, 25.0],
        "official settings (distilbert-base-uncased, 4 layers, idf off, rescaled)",
        str(official),
    )
    baseline = str(tmp_path / "bert_score" / "rescale_baseline" / "en" / "distilbert-base-uncased.tsv")
    assert fake.calls[-1] == (
        ["p1", "p2"],
        ["r1", "r2"],
        dict(
            model_type=str(official),
            idf=False,
            lang="en",
            verbose=False,
            num_layers=4,
            rescale_with_baseline=True,
            baseline_path=baseline,
        ),
    )
    for key, layers in (("num_hidden_layers", 3), ("n_layers", 5), ("num_layers", 7)):
        other = _model_folder(tmp_path, key, {"model_type": "bert", key: layers})
        out = bertscore_f1(["p"], ["r"], other)
        assert out == BertScoreResult(
            "bertscore_unofficial",
            [50.0],
            f"NOT OFFICIAL: model {other} is not distilbert-base-uncased (last layer, no baseline rescaling)",
            str(other),
        )
        assert fake.calls[-1][2] == dict(
            model_type=str(other), idf=False, lang="en", verbose=False, num_layers=layers, rescale_with_baseline=False
        )
    broken = _FakeBertScore(tmp_path, error=RuntimeError("no weights"))
    monkeypatch.setitem(sys.modules, "bert_score", broken.module)
    assert bertscore_f1(["p"], ["r"], official) == BertScoreResult(
        "bertscore", None, f"could not run BERTScore with {official}: RuntimeError"
    )
    monkeypatch.setitem(sys.modules, "bert_score", None)  # not installed
    assert bertscore_f1(["p"], ["r"], official) == BertScoreResult(
        "bertscore", None, "package bert-score is not installed (pip install bert-score)"
    )


def test_score_generation_with_and_without_bertscore(tmp_path, monkeypatch):
    import sys

    from metrics.generation import score_generation

    fake = _FakeBertScore(tmp_path)
    monkeypatch.setitem(sys.modules, "bert_score", fake.module)
    preds = {"1": "the stent was placed", "2": "fever settled"}
    refs = {"1": "a stent was placed", "2": "the fever settled"}
    srcs = {"1": "why a stent", "2": "fever"}
    with pytest.raises(ValueError, match="^predictions, references and sources must cover the same cases$"):
        score_generation(preds, refs, {"1": "x"})
    with pytest.raises(ValueError, match="^no cases to score$"):
        score_generation({}, {}, {})

    none = score_generation(preds, refs, srcs)
    assert none.scores["bertscore"] is None and "bertscore_unofficial" not in none.scores
    assert none.reasons["bertscore"] == (
        "not computed: pass --bertscore-model with a local copy of distilbert-base-uncased (no downloads at "
        "scoring time)"
    )
    assert none.notes == {} and fake.calls == []

    official = _model_folder(tmp_path, "distil", _DISTILBERT)
    out = score_generation(preds, refs, srcs, str(official))
    assert fake.calls[-1][:2] == (
        ["the stent was placed", "fever settled"],
        ["a stent was placed", "the fever settled"],
    )
    assert out.scores["bertscore"] == 37.5 and "bertscore_unofficial" not in out.scores
    assert out.per_case["1"]["bertscore"] == 50.0 and out.per_case["2"]["bertscore"] == 25.0
    assert "bertscore" not in out.reasons and "bertscore" in out.computed
    assert out.notes == {"bertscore": "official settings (distilbert-base-uncased, 4 layers, idf off, rescaled)"}

    other = _model_folder(tmp_path, "bert", {"model_type": "bert", "num_hidden_layers": 2})
    out = score_generation(preds, refs, srcs, str(other))
    assert out.scores["bertscore"] is None and out.scores["bertscore_unofficial"] == 37.5
    assert out.reasons["bertscore"] == "not computed with the official model; see bertscore_unofficial"
    assert out.per_case["2"]["bertscore_unofficial"] == 25.0 and "bertscore" not in out.per_case["2"]
    assert "bertscore_unofficial" in out.computed and "bertscore" in out.not_computed
    assert out.notes["bertscore_unofficial"].startswith("NOT OFFICIAL: model ")

    # An unofficial model that could not run: neither name gets a value.
    monkeypatch.setitem(sys.modules, "bert_score", _FakeBertScore(tmp_path, error=OSError("x")).module)
    out = score_generation(preds, refs, srcs, str(other))
    assert "bertscore_unofficial" not in out.scores and out.scores["bertscore"] is None


def test_score_subtask3_passes_the_bertscore_model(tmp_path, monkeypatch):
    import sys

    from metrics.subtask3 import score_subtask3

    monkeypatch.setitem(sys.modules, "bert_score", _FakeBertScore(tmp_path, f1=(0.5, 0.5, 0.5)).module)
    key = json.loads((EXAMPLES / "archehr-qa_key.json").read_text(encoding="utf-8"))
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps([{"case_id": c["case_id"], "prediction": "An answer."} for c in key]))
    official = _model_folder(tmp_path, "distil", _DISTILBERT)
    scores, truncated = score_subtask3(sub, EXAMPLES / "archehr-qa_key.json", EXAMPLES / "archehr-qa.xml", official)
    assert scores.scores["bertscore"] == 50.0 and truncated == 0


# --- metrics/bleu.py, sari.py, case_sets.py: messages and edges, by hand --------------------------
def test_bleu_by_hand_and_its_empty_message():
    from metrics.bleu import EmptyTokenization, bleu_from_tokens

    # 5/6, 4/5, 3/4, 2/3 n-gram precisions (product 1/3); 6 vs 7 tokens: brevity exp(1 - 7/6).
    pred, ref = "a b c d e x".split(), "a b c d e f g".split()
    assert bleu_from_tokens(pred, ref) == pytest.approx(3**-0.25 * math.exp(-1 / 6), rel=1e-12)
    # Equal lengths: no brevity penalty; a longer prediction is not rewarded either.
    assert bleu_from_tokens("a b c d".split(), "a b c d".split()) == pytest.approx(1.0, rel=1e-12)
    assert bleu_from_tokens("a b c d e".split(), "a b c d".split()) == pytest.approx(
        (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-12
    )
    for p, r in (([], ["a"]), (["a"], [])):
        with pytest.raises(
            EmptyTokenization, match="^BLEU needs a prediction and a reference with at least one token$"
        ):
            bleu_from_tokens(p, r)


def test_sari_f1_guard_and_reference_message():
    from metrics.sari import _f1, sentence_sari

    assert _f1(0.0, 0.0) == 0.0 and _f1(0.5, 0.0) == 0.0 and _f1(0.0, 0.5) == 0.0
    assert _f1(0.3, 0.3) == pytest.approx(0.3) and _f1(1.0, 0.5) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="^SARI needs at least one reference$"):
        sentence_sari("a b", "a b", [])


def test_scored_submission_with_a_case_twice(tmp_path):
    from metrics.subtask4 import score_subtask4

    key = json.loads((EXAMPLES / "archehr-qa_key.json").read_text(encoding="utf-8"))
    entries = [{"case_id": c["case_id"], "prediction": []} for c in key]
    assert _scored_error(tmp_path, score_subtask4, entries + entries[1:2]) == (
        f"SUB: case {key[1]['case_id']}: case listed twice"
    )


# --- data/submission.py: the zip reader against a zip library that reports what we choose --------
class _Member:
    def __init__(self, file_size: int, compress_size: int):
        self.filename, self.flag_bits = "submission.json", 0
        self.file_size, self.compress_size = file_size, compress_size


class _FakeZipFile:
    """``zipfile.ZipFile`` stand-in: one member with the given header sizes whose stream yields
    ``data`` (a header may lie about the size); records the sizes asked of the stream."""

    def __init__(self, member: _Member, data: bytes = b"", error: Exception | None = None):
        self.member, self.data, self.error = member, data, error
        self.requests: list[int | None] = []

    def __call__(self, path):
        if self.error is not None:
            raise self.error
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def infolist(self):
        return [self.member]

    def open(self, info):
        import io

        fake = self

        class Stream(io.BytesIO):
            def read(self, n=-1):
                fake.requests.append(n)
                return super().read(n)

        return Stream(self.data)


def _zip_problem(tmp_path, monkeypatch, fake: _FakeZipFile) -> str | None:
    import zipfile

    from data.submission import read_submission

    monkeypatch.setattr(zipfile, "ZipFile", fake)
    path = tmp_path / "sub.zip"
    path.write_bytes(b"PK")
    try:
        read_submission(path, 3)
    except InputError as err:
        assert str(err).startswith(f"{path}: ")
        return str(err).removeprefix(f"{path}: ")
    return None


def test_zip_ratio_edge_and_message(tmp_path, monkeypatch):
    ok = json.dumps([{"case_id": "1", "prediction": "An answer."}]).encode()
    # Exactly 200-fold past 1 MiB is still read; one byte more is a bomb.
    assert _zip_problem(tmp_path, monkeypatch, _FakeZipFile(_Member(200 * 6000, 6000), ok)) is None
    assert (
        _zip_problem(tmp_path, monkeypatch, _FakeZipFile(_Member(200 * 6000 + 1, 6000), ok))
        == "submission.json in the zip expands 200-fold (a zip bomb?)"
    )
    # A header claiming 0 compressed bytes: the ratio divides by 1, not by zero.
    assert (
        _zip_problem(tmp_path, monkeypatch, _FakeZipFile(_Member(2**20 + 1, 0), ok))
        == "submission.json in the zip expands 1048577-fold (a zip bomb?)"
    )


def test_zip_stream_longer_than_its_header_is_cut_at_the_cap(tmp_path, monkeypatch):
    import data.submission as submission

    monkeypatch.setattr(submission, "MAX_SUBMISSION_BYTES", 100)
    fake = _FakeZipFile(_Member(50, 50), b" " * 500)
    assert _zip_problem(tmp_path, monkeypatch, fake) == "submission.json in the zip is more than 100 bytes"
    assert fake.requests == [101]  # never more than the cap + 1 byte is read


@pytest.mark.parametrize(
    "error, detail",
    [
        (zipfile.BadZipFile("File is not a zip file"), "File is not a zip file"),
        (ValueError("x" * 100 + "\nsecond line"), "x" * 80),
        (zipfile.BadZipFile(), "BadZipFile"),
        (EOFError(), "EOFError"),
    ],
)
def test_zip_library_errors_in_one_line(tmp_path, monkeypatch, error, detail):
    fake = _FakeZipFile(_Member(1, 1), error=error)
    assert _zip_problem(tmp_path, monkeypatch, fake) == f"not a valid zip file ({detail})"


# --- config.json and run.json are UTF-8 whatever the user's locale --------------------------------
def test_config_json_and_run_json_are_read_as_utf8_in_an_ascii_locale(tmp_path):
    import os
    import subprocess
    import sys

    folder = tmp_path / "distil"
    folder.mkdir()
    config = json.dumps(dict(_DISTILBERT, _name_or_path="/home/josé/distilbert"), ensure_ascii=False)
    (folder / "config.json").write_text(config, encoding="utf-8")
    assert "josé" in config
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"training_case_ids": ["101"], "note": "café"}, ensure_ascii=False), encoding="utf-8")
    # In the suite's own locale (and in this process, so that mutation testing maps the test to both).
    from metrics.bertscore import is_official_model
    from metrics.training_cases import run_record_training_case_ids

    assert is_official_model(folder) and run_record_training_case_ids(run) == ["101"]
    code = (
        "import locale, sys; from pathlib import Path; from metrics.bertscore import is_official_model; "
        "from metrics.training_cases import run_record_training_case_ids as ids; "
        "print(locale.getpreferredencoding(False), is_official_model(sys.argv[1]), ids(Path(sys.argv[2])))"
    )
    # A legacy locale: no UTF-8 mode, no coercion of the C locale to UTF-8.
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(run)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ANSI_X3.4-1968", "True", "['101']"]


# --- data/submission.py: read_submission's messages, each naming the file ------------------------
def test_read_submission_messages(tmp_path, monkeypatch):
    import data.submission as submission
    from data.submission import check_entry_types, read_submission

    def problem(content: bytes, name: str = "sub.json", subtask: int = 3) -> str | None:
        path = tmp_path / name
        if name.endswith(".zip"):
            _zip(path, {"submission.json": content})
        else:
            path.write_bytes(content)
        try:
            read_submission(path, subtask)
        except InputError as err:
            assert str(err).startswith(f"{path}: ")
            return str(err).removeprefix(f"{path}: ")
        return None

    assert problem(b" \n\t") == "file is empty"
    assert problem(b"  ", "sub.zip") == "file is empty"
    assert problem(b'["caf\xe9"]') == "not UTF-8 text"
    assert problem(b'[{"case_id": "1",') == "invalid JSON (Expecting property name enclosed in double quotes at line 1)"
    assert problem(b'{"case_id": "1"}') == "submission must be a JSON list of entries"
    assert problem(b'[{"case_id": "1", "prediction": "a"}, 3]') == "entry 1 is not an object"
    assert problem(b'[{"case_id": ""}]') == "entry 0: case_id must be a non-empty string, got ''"
    assert problem(b'[{"case_id": "7"}]') == "case 7: entry has no 'prediction'"
    one = b'[{"case_id": "1", "prediction": "a"}]'
    monkeypatch.setattr(submission, "MAX_SUBMISSION_BYTES", len(one))
    assert problem(one) is None  # exactly the cap
    monkeypatch.setattr(submission, "MAX_SUBMISSION_BYTES", len(one) - 1)
    assert problem(one) == f"file is more than {len(one) - 1} bytes; not a submission"
    with pytest.raises(ValueError, match="^subtask must be 2, 3 or 4, not 1$"):
        check_entry_types([], 1)


# --- metrics/case_sets.py: how two case sets differ, in words ------------------------------------
def test_case_set_difference_wording():
    from metrics.case_sets import case_set_difference, same_cases

    assert case_set_difference(["2", "1"], ["1", "2"]) is None
    assert case_set_difference(["1"], ["1", "2"]) == "1 of the key's 2 cases missing from the submission (2)"
    assert case_set_difference(["1", "2", "9"], ["1", "2"]) == "1 submitted case not in the key (9)"
    assert case_set_difference(["8", "9"], ["1"]) == (
        "1 of the key's 1 cases missing from the submission (1); 2 submitted cases not in the key (8, 9)"
    )
    with pytest.raises(InputError) as err:
        same_cases(["1"], ["1", "2"], Path("sub.json"))
    assert str(err.value) == (
        "sub.json: case ids differ from the key: 1 of the key's 2 cases missing from the submission (2); "
        "is this the key for these cases?"
    )
    same_cases(["1", "2"], ["2", "1"], Path("sub.json"), "key.json")


@pytest.mark.parametrize(
    "subtask, entries, message",
    [
        (3, [{"case_id": "1", "prediction": "a"}, {"case_id": "2"}], "case 2: entry has no 'prediction'"),
        (3, [{"case_id": "1", "prediction": ["a"]}], "case 1: prediction must be a string"),
        (2, [{"case_id": "1", "prediction": "3"}], "case 1: prediction must be a list of sentence ids"),
        (2, [{"case_id": "1", "prediction": ["3"]}, {"case_id": "2"}], "case 2: entry has no 'prediction'"),
        (2, [{"case_id": "1", "prediction": ["3", 4]}], "case 1: sentence id 4 is not a string id"),
        (2, [{"case_id": "1", "prediction": [""]}], "case 1: sentence id '' is not a string id"),
        (4, [{"case_id": "1", "prediction": {}}], "case 1: prediction must be a list of {answer_id, evidence_id}"),
        (4, [{"case_id": "1", "prediction": [["1"]]}], "case 1: each prediction item must be an object"),
        (
            4,
            [{"case_id": "1", "prediction": [{"answer_id": 5}]}],
            "case 1: answer_id must be a non-empty string, got 5",
        ),
        (
            4,
            [{"case_id": "1", "prediction": [{"answer_id": "", "evidence_id": []}]}],
            "case 1: answer_id must be a non-empty string, got ''",
        ),
        (4, [{"case_id": "1", "prediction": [{"answer_id": "2"}]}], "case 1: answer 2: evidence_id must be a list"),
        (
            4,
            [{"case_id": "1", "prediction": [{"answer_id": "2", "evidence_id": ["3", ""]}]}],
            "case 1: answer 2: evidence id '' is not a string id",
        ),
        (
            4,
            [{"case_id": "1", "prediction": [{"answer_id": "2", "evidence_id": [3]}]}],
            "case 1: answer 2: evidence id 3 is not a string id",
        ),
    ],
)
def test_check_entry_types_messages(subtask, entries, message):
    from data.submission import check_entry_types

    with pytest.raises(InputError) as err:
        check_entry_types(entries, subtask, "sub.json")
    assert str(err.value) == f"sub.json: {message}"


def test_joint_losses_left_padding_and_a_single_note():
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from training.joint import LossSettings, joint_losses

    model = _tiny_causal_lm()
    torch.manual_seed(3)
    head = NotePairHead(HeadConfig(hidden_size=8, proj_dim=4, mlp_dim=6)).eval()
    # Row 1 is left-padded: the mask, not causality alone, keeps the pad token out of its states.
    batch = {
        "input_ids": torch.tensor([[1, 5, 9, 3, 7, 2], [0, 4, 8, 6, 11, 12]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, -100, -100, 3, 7, 2], [-100, -100, -100, 6, 11, 12]]),
        "note_spans": torch.tensor([[1, 1, 3]]),
        "answer_spans": torch.tensor([[1, 3, 5]]),
        "pair_index": torch.tensor([[0, 0]]),
        "pair_targets": torch.tensor([1.0]),
        "relevance_index": torch.tensor([0]),
        "relevance_labels": torch.tensor([0.0]),
    }
    settings = LossSettings(align_weight=0.5, pos_weight=2.0, relevance_weight=0.25)
    with torch.no_grad():
        ref = _reference_forward(model, batch)
        out = joint_losses(model, head, batch, settings)
        single = head(ref.hidden_states[-1][1], [(1, 3)], [(3, 5)])
    align = _bce(float(single.pair_logits[0, 0]), 1.0, 2.0)
    relevance = _bce(float(single.relevance_logits[0]), 0.0)
    assert float(out["lm"]) == pytest.approx(float(ref.loss), rel=1e-5)
    assert float(out["align"]) == pytest.approx(align, rel=1e-5)
    assert float(out["relevance"]) == pytest.approx(relevance, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(float(ref.loss) + 0.5 * align + 0.25 * relevance, rel=1e-5)
