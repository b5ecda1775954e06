"""CUDA paths (NF4 kernels, bf16 autocast, compiled layers, merged inference). Skipped without CUDA.

Run on a GPU machine with ``python -m pytest -m gpu``.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_cuda_joint_step_nf4_bf16_compiled():
    from bench.synthetic import training_examples
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from model.backbone import compile_decoder_layers, load_backbone
    from training.data import TrainItem, collate
    from training.joint import JointModel, LossSettings

    backbone = load_backbone("tiny", load_in_4bit=True, device="cuda", keep_bf16=True)
    compile_decoder_layers(backbone)
    model = JointModel(backbone, NotePairHead(HeadConfig(hidden_size=64)).cuda(), LossSettings()).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    examples = training_examples(12, 256, 151936, seed=0)
    losses = []
    for step in range(6):
        batch = {k: v.cuda() for k, v in collate([TrainItem(e) for e in examples[:4]], 0).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
        out["loss"].backward()
        if step == 0:
            lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
            assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0]  # the same 4 rows: the step must fit them


def test_cuda_merged_model_matches_nf4_plus_lora(tmp_path):
    from model.backbone import load_backbone, load_merged

    torch.manual_seed(0)
    model = load_backbone("tiny", load_in_4bit=True, device="cuda")
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    model.save_pretrained(tmp_path)
    plain = load_backbone("tiny", load_in_4bit=True, device="cuda", adapter_dir=tmp_path, trainable=False)
    merged = load_merged("tiny", tmp_path, load_in_4bit=True, device="cuda")
    ids = torch.randint(0, 2000, (2, 24), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = plain(input_ids=ids).logits.float()
        b = merged(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_cuda_train_and_infer_end_to_end(tmp_path):
    import json

    from conftest import EXAMPLES

    import infer
    import train

    domain = tmp_path / "domain"
    assert train.main(["--stage", "domain", "--preset", "tiny", "--data", str(EXAMPLES / "emrqa_sample.jsonl"),
                       "--out", str(domain), "--max_steps", "3", "--load_in_4bit", "true", "--progress", "false"]) in (0, None)
    task = tmp_path / "task"
    assert train.main(["--stage", "task", "--joint", "--preset", "tiny", "--init", str(domain),
                       "--xml", str(EXAMPLES / "archehr-qa.xml"), "--key", str(EXAMPLES / "archehr-qa_key.json"),
                       "--out", str(task), "--max_steps", "2", "--progress", "false"]) in (0, None)
    out = tmp_path / "sub"
    assert infer.main([str(EXAMPLES / "archehr-qa.xml"), "--checkpoint", str(task / "export"), "--out", str(out),
                       "--no-progress"]) in (0, None)
    run = json.loads((out / "run.json").read_text())
    assert (out / "subtask3.zip").is_file() and (out / "subtask4.zip").is_file()
    assert "checkpoint" in json.dumps(run).lower()
