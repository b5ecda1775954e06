"""The export calibration's dense merged view of a training backbone (model.merged_view)."""

from __future__ import annotations

import torch

from model.backbone import decoder, load_backbone, load_merged
from model.merged_view import merged_view, merged_view_bytes, merged_view_within_memory
from model.packed import pack, packed_forward

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def trained_looking(quantised: bool):
    torch.manual_seed(0)
    model = load_backbone("tiny", load_in_4bit=quantised, device="cpu", gradient_checkpointing=False)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B != 0, so a view that skipped the fold would differ
            param.data.normal_(0, 0.05)
    return model.eval()


def projections(model):
    for i, layer in enumerate(decoder(model).layers):
        for part in ("self_attn", "mlp"):
            for name in PROJECTIONS:
                if hasattr(getattr(layer, part), name):
                    yield f"model.layers.{i}.{part}.{name}", getattr(getattr(layer, part), name)


def test_view_holds_what_the_merged_load_holds(tmp_path):
    """NF4 base + LoRA: each dense weight of the view is the merged load's (what infer.py runs), bit for bit."""
    backbone = trained_looking(quantised=True)
    backbone.save_pretrained(tmp_path)
    merged = load_merged("tiny", tmp_path, load_in_4bit=True, device="cpu")
    view = merged_view(backbone)
    assert view is not None
    want = dict(projections(merged))
    got = dict(projections(view))
    assert set(got) == set(want) and len(got) == 7 * len(decoder(backbone).layers)
    for name, module in got.items():
        assert type(module) is torch.nn.Linear, name
        assert torch.equal(module.weight, want[name].weight.to(module.weight.dtype)), name


def test_view_forward_equals_the_lora_modules_and_leaves_them_untouched():
    backbone = trained_looking(quantised=False)
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    view = merged_view(backbone)
    assert view is not None
    ids = [torch.randint(0, 2000, (n,)).tolist() for n in (17, 40, 5)]
    packed = pack(ids, torch.device("cpu"))
    with torch.no_grad():
        want, _ = packed_forward(backbone, packed, tap=-1)
        got, _ = packed_forward(view, packed, tap=-1)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    # The backbone keeps its LoRA modules and its weights: training could go on after an export.
    assert all(hasattr(m, "base_layer") and hasattr(m, "lora_A") for _, m in projections(backbone))
    assert all(torch.equal(p, before[n]) for n, p in backbone.named_parameters())
    assert merged_view_bytes(backbone) == sum(m.weight.numel() * 4 for _, m in projections(view))


def test_no_view_for_a_model_without_lora_or_without_room(monkeypatch, tmp_path):
    from model import merged_view as mv

    backbone = trained_looking(quantised=False)
    backbone.save_pretrained(tmp_path)
    assert merged_view(load_merged("tiny", tmp_path, load_in_4bit=False, device="cpu")) is None  # plain Linears
    folded = trained_looking(quantised=False)
    folded.merge_adapter()  # PEFT's fold in place: the base already holds the LoRA; folding again would double it
    assert merged_view(folded) is None
    monkeypatch.setattr(mv, "room_bytes", lambda device: 1000)
    view, why_not = merged_view_within_memory(backbone, working_bytes=10)
    assert view is None and why_not is not None and "do not fit the 0.0 GB" in why_not
    monkeypatch.setattr(mv, "room_bytes", lambda device: None)  # off CUDA: no budget to check
    view, why_not = merged_view_within_memory(backbone, working_bytes=10**15)
    assert view is not None and why_not is None


def test_calibration_says_and_records_when_it_falls_back(monkeypatch, capsys):
    """Without room for the view, calibration runs the LoRA modules, says so on stderr, and the
    record names that forward; the head's outputs agree with the view's."""
    from bench.synthetic import training_examples
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from model import merged_view as mv
    from training import export

    backbone = trained_looking(quantised=False)
    torch.manual_seed(1)
    head = NotePairHead(HeadConfig(hidden_size=decoder(backbone).config.hidden_size)).eval()
    examples = training_examples(6, 256, decoder(backbone).embed_tokens.weight.shape[0])
    merged, forward = export.calibration_outputs(backbone, head, examples)
    assert forward == export.MERGED_FORWARD and "note:" not in capsys.readouterr().err
    _, forward = export.calibration_outputs(backbone, head, examples, merged=False)  # the bench's baseline
    assert forward == f"{export.LORA_FORWARD} (asked)" and "note:" not in capsys.readouterr().err
    monkeypatch.setattr(mv, "room_bytes", lambda device: 0)
    lora, forward = export.calibration_outputs(backbone, head, examples)
    assert forward.startswith(export.LORA_FORWARD + " (its dense weights")
    assert "note: calibrating through the LoRA modules" in capsys.readouterr().err
    for a, b in zip(merged, lora):
        assert torch.allclose(a.pair_logits, b.pair_logits, atol=1e-4)
