"""The domain stage (emrQA, loss on answer tokens only) lowers the answer loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

from data.emrqa import emrqa_to_prompt_example, load_emrqa
from data.prompts import IGNORE_INDEX, encode_example
from model.backbone import backbone_hidden, load_backbone
from model.loaded_export import load_export
from training.config import build_config
from training.batching import collate
from training.data import TrainItem, emrqa_evidence_pairs
from training.joint import answer_token_loss
from training.run import run_training

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@torch.no_grad()
def answer_loss(backbone, encoded, pad_id: int) -> float:
    """Mean answer-token CE over the examples (eval mode, one padded batch)."""
    backbone.eval()
    batch = collate([TrainItem(e) for e in encoded], pad_id)
    final, _ = backbone_hidden(backbone, batch["input_ids"], batch["attention_mask"])
    loss, n = answer_token_loss(backbone, final, batch["labels"])
    assert n > 0
    return float(loss)


def test_labels_cover_only_the_answer(qwen_tokenizer):
    rec = load_emrqa(EXAMPLES / "emrqa_sample.jsonl", n=1)[0]
    enc = encode_example(qwen_tokenizer, emrqa_to_prompt_example(rec))
    answer_positions = [i for i, t in enumerate(enc.labels) if t != IGNORE_INDEX]
    assert answer_positions[0] == enc.prompt_length
    decoded = qwen_tokenizer.decode([enc.input_ids[i] for i in answer_positions])
    assert decoded.startswith(rec.answer_text) and decoded.endswith("<|im_end|>\n")


def test_emrqa_evidence_pair_is_the_sentence_holding_the_answer():
    for rec in load_emrqa(EXAMPLES / "emrqa_sample.jsonl"):
        ex = emrqa_to_prompt_example(rec)
        pairs = emrqa_evidence_pairs(rec, ex)
        if not rec.answerable:
            assert pairs == set()
            continue
        [(aid, nid)] = pairs
        assert aid == "1" and rec.answer_text in ex.note_texts[ex.note_ids.index(nid)]


def test_domain_stage_lowers_answer_loss(tmp_path, qwen_tokenizer):
    data = EXAMPLES / "emrqa_sample.jsonl"
    cfg = build_config(
        dict(
            stage="domain",
            preset="tiny",
            data=str(data),
            out=str(tmp_path / "run"),
            batch_size=4,
            batch_tokens=0,
            grad_accum=1,
            epochs=6,
            lr=1e-2,
            warmup_ratio=0.0,
            gradient_checkpointing=False,
            log_every=3,
            progress=False,
        )
    )
    encoded = [encode_example(qwen_tokenizer, emrqa_to_prompt_example(r)) for r in load_emrqa(data)]
    set_seed(cfg.seed)
    before = answer_loss(load_backbone("tiny", device="cpu"), encoded, qwen_tokenizer.pad_token_id)

    result = run_training(cfg)
    assert result.steps == 6 * 3
    after = answer_loss(load_export(result.export_dir, device="cpu").model, encoded, qwen_tokenizer.pad_token_id)
    # ln(vocab) = 11.93 is chance level; a random tiny model with frozen embeddings moves slowly.
    assert after < before - 0.4, (before, after)
    logged = [row["lm"] for row in result.history]
    assert logged[-1] < logged[0]
    run = tmp_path / "run"
    for name in ("config.toml", "config.json", "log.jsonl", "loss_curve.png"):
        assert (run / name).is_file(), name
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
