"""The joint task stage teaches the head an alignment that word overlap gets wrong.

Synthetic cases (tests/synthetic.py): answers use lay words, their supports use
codes from a fixed lexicon, and each answer has a distractor note sentence that
repeats its words. Held-out cases are generated with another seed (not in training).
"""

from __future__ import annotations

import numpy as np
import pytest
from accelerate.utils import set_seed

from data.prompts import encode_example, example_from_case
from model.backbone import LoraSettings, load_backbone
from model.loaded_export import load_export
from model.head_scoring import pair_probabilities
from model.calibration import calibrate_threshold, pair_f1
from training.config import build_config
from training.run import build_head, run_training
from synthetic import make_cases, word_overlap_top1, write_archehr

N_TRAIN, N_HELD_OUT = 24, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def targets(case) -> np.ndarray:
    return np.array([[1.0 if n in a.citations else 0.0 for n in case.note_ids] for a in case.answer_sentences])


def top1(probs: list[np.ndarray]) -> list[np.ndarray]:
    return [(p == p.max(axis=1, keepdims=True)).astype(np.float32) for p in probs]


def set_f1(pred: list[set], gold: list[set]) -> float:
    tp = sum(len(p & g) for p, g in zip(pred, gold))
    return 2 * tp / (sum(map(len, pred)) + sum(map(len, gold))) if tp else 0.0


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    train, held = make_cases(N_TRAIN, seed=1), make_cases(N_HELD_OUT, seed=2)
    assert not {c.case_id for c in train} & {c.case_id for c in held}
    write_archehr(train, root / "train.xml", root / "train_key.json")
    return root, train, held


def test_generator_makes_word_overlap_misleading(synthetic):
    _, train, held = synthetic
    for case in train + held:
        assert len(case.gold_pairs()) == len(case.answer_sentences) == 3
    assert set_f1([word_overlap_top1(c) for c in held], [c.gold_pairs() for c in held]) < 0.1


def test_joint_stage_learns_held_out_alignment(synthetic, qwen_tokenizer):
    root, train, held = synthetic
    cfg = build_config(
        dict(
            stage="task",
            joint=True,
            preset="tiny",
            xml=str(root / "train.xml"),
            key=str(root / "train_key.json"),
            out=str(root / "run"),
            batch_size=4,
            batch_tokens=0,
            grad_accum=1,
            epochs=10,
            lr=2e-3,
            head_lr=4e-3,
            warmup_ratio=0.0,
            gradient_checkpointing=False,
            log_every=5,
            save_every=0,
            progress=False,
        )
    )
    held_targets = [targets(c) for c in held]
    train_enc = [encode_example(qwen_tokenizer, example_from_case(c)) for c in train]
    held_enc = [encode_example(qwen_tokenizer, example_from_case(c)) for c in held]

    # The exact initial state of the run (same seed, same construction order).
    set_seed(cfg.seed)
    backbone = load_backbone(
        "tiny",
        device="cpu",
        gradient_checkpointing=False,
        lora=LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout),
    )
    head = build_head(cfg, 64, None, "cpu")
    train_probs = pair_probabilities(backbone, head, train_enc)
    before_threshold, _ = calibrate_threshold(train_probs, [targets(c) for c in train])
    before_probs = pair_probabilities(backbone, head, held_enc)
    before_f1 = pair_f1(before_probs, held_targets, before_threshold)
    before_top1 = pair_f1(top1(before_probs), held_targets, 0.5)

    result = run_training(cfg)
    assert result.export_dir is not None
    losses = [row["align"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0], losses

    loaded = load_export(result.export_dir, device="cpu")
    after_probs = [loaded.score_pairs(c) for c in held]
    after_f1 = pair_f1(after_probs, held_targets, loaded.threshold)
    after_top1 = pair_f1(top1(after_probs), held_targets, 0.5)
    overlap_top1 = set_f1([word_overlap_top1(c) for c in held], [c.gold_pairs() for c in held])

    assert after_f1 >= before_f1 + 0.3 and after_f1 >= 0.6, (before_f1, after_f1)
    assert after_top1 >= max(before_top1, overlap_top1) + 0.4, (before_top1, overlap_top1, after_top1)
    assert loaded.manifest.alignment is not None and loaded.manifest.alignment.calibrated_on == "training cases"
