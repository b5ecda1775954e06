"""Several cases per micro-batch (issue 21): the head's and the LM's losses are the same values as
the per-case loop computed before, and packing changes only how cases are weighted in a step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data.prompts import IGNORE_INDEX
from heads.alignment import NotePairHead
from heads.config import HeadConfig
from model.backbone import backbone_hidden, lm_head, load_backbone
from synthetic import make_cases
from training.batching import collate
from training.data import encode_items, task_examples
from training.joint import LossSettings, joint_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(qwen_tokenizer):
    torch.manual_seed(0)
    backbone = load_backbone("tiny", load_in_4bit=False, device="cpu", gradient_checkpointing=False).eval()
    head = NotePairHead(HeadConfig(hidden_size=backbone.get_base_model().config.hidden_size, relevance=True)).eval()
    cases = make_cases(5, seed=3)
    examples, relevance = task_examples(cases, joint=True)
    items, dropped = encode_items(qwen_tokenizer, examples, 4096, relevance)
    assert dropped == 0 and sum(bool(it.encoded.pairs) for it in items) >= 3
    items[1].relevance = None  # one example without relevance labels, as in a partly keyed file
    return backbone, head, items, qwen_tokenizer.pad_token_id


def losses_before(backbone, head, batch: dict, settings: LossSettings) -> dict[str, float]:
    """The per-case computation the training step ran before issue 21 (boolean masks, a Python
    loop over examples, ``.tolist()``): the reference the vectorised step must equal."""
    final, tapped = backbone_hidden(backbone, batch["input_ids"], batch["attention_mask"], head.config.layer)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = F.linear(final[:, :-1][keep], lm_head(backbone).weight).float()
    lm = F.cross_entropy(logits, targets[keep])
    pair_logits, rel_logits = head.forward_batch(
        tapped, batch["note_spans"], batch["note_counts"], batch["answer_spans"], batch["answer_counts"]
    )
    scored = [lg.reshape(-1) for lg, cited in zip(pair_logits, batch["has_pairs"].tolist()) if cited]
    align = F.binary_cross_entropy_with_logits(
        torch.cat(scored), batch["pair_targets"], pos_weight=torch.tensor(settings.pos_weight)
    )
    mask = batch["relevance_mask"]
    relevance = F.binary_cross_entropy_with_logits(rel_logits[mask], batch["relevance_targets"][mask])
    total = lm + settings.align_weight * align + settings.relevance_weight * relevance
    return {"lm": float(lm), "align": float(align), "relevance": float(relevance), "loss": float(total)}


@torch.no_grad()
def test_vectorised_losses_equal_the_per_case_loop_on_a_fixed_batch(tiny):
    backbone, head, items, pad_id = tiny
    batch = collate(items, pad_id)
    # Rows of different lengths: the reference attends with the padding mask, joint_losses
    # with the causal mask alone (right padding), and the two must agree.
    assert (batch["attention_mask"] == 0).any()
    settings = LossSettings(align_weight=1.0, pos_weight=5.0, relevance_weight=0.5)
    before = losses_before(backbone, head, batch, settings)
    after = {k: float(v) for k, v in joint_losses(backbone, head, batch, settings, head.config.layer).items()}
    for part in ("lm", "align", "relevance", "loss"):
        assert after[part] == pytest.approx(before[part], abs=1e-3, rel=0), part
        assert after[part] == pytest.approx(before[part], abs=1e-5), part  # in fact the same to float rounding
    assert after["answer_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def test_a_packed_batch_scores_each_case_as_its_own_forward(tiny):
    """Right padding and neighbours in the batch leave each case's logits alone; what packing
    changes is the weighting: the step's LM loss is the mean over all its answer tokens."""
    backbone, head, items, pad_id = tiny
    packed = collate(items, pad_id)
    _, tapped = backbone_hidden(backbone, packed["input_ids"], packed["attention_mask"], head.config.layer)
    flat, _ = head(tapped, packed["note_spans"], packed["answer_spans"], pair_index=packed["pair_index"])
    one_by_one, lm_sum, n_sum = [], 0.0, 0
    for it in items:
        batch = collate([it], pad_id)
        _, hidden = backbone_hidden(backbone, batch["input_ids"], batch["attention_mask"], head.config.layer)
        logits, _ = head(hidden, batch["note_spans"], batch["answer_spans"], pair_index=batch["pair_index"])
        one_by_one.append(logits)
        parts = joint_losses(backbone, None, batch, LossSettings())
        lm_sum += float(parts["lm"]) * int(parts["answer_tokens"])
        n_sum += int(parts["answer_tokens"])
    assert torch.allclose(flat, torch.cat(one_by_one), atol=1e-3)
    packed_lm = float(joint_losses(backbone, None, packed, LossSettings())["lm"])
    assert packed_lm == pytest.approx(lm_sum / n_sum, abs=1e-3)


def test_collate_indexes_every_pair_of_each_cited_case_in_target_order(tiny):
    _, _, items, pad_id = tiny
    batch = collate(items, pad_id)
    expected, a0, n0 = [], 0, 0
    for it in items:
        enc = it.encoded
        if enc.pairs and enc.answer_spans:
            expected += [[a0 + a, n0 + k] for a in range(len(enc.answer_spans)) for k in range(len(enc.note_spans))]
        a0, n0 = a0 + len(enc.answer_spans), n0 + len(enc.note_spans)
    assert batch["pair_index"].tolist() == expected
    assert batch["pair_index"].shape[0] == batch["pair_targets"].shape[0]
    assert batch["relevance_index"].tolist() == batch["relevance_mask"].nonzero().reshape(-1).tolist()
    labels = batch["labels"][:, 1:].reshape(-1)
    assert batch["answer_targets"].tolist() == labels[labels != IGNORE_INDEX].tolist()


def test_collate_pads_widths_to_a_multiple_of_8(tiny):
    """One compiled graph for every batch: widths are multiples of 8 (inductor guards on the
    alignment); the added columns are padding (no attention, no label) after every real token."""
    items = tiny[2]
    for group in ([items[0]], items[:2], items[1:4]):
        batch = collate(group, pad_id=0)
        longest = max(len(it) for it in group)
        width = batch["input_ids"].shape[1]
        assert width % 8 == 0 and longest <= width < longest + 8
        for row, it in enumerate(group):
            n = len(it)
            assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
            assert batch["input_ids"][row, :n].tolist() == it.encoded.input_ids


def test_a_training_step_attends_without_cudnn_forward_and_backward(tiny):
    """training_attention holds for the whole micro-step: the forward and the backward (where a
    checkpointed layer recomputes) both see cuDNN's SDPA off; it is back on afterwards."""
    from types import SimpleNamespace

    from training.joint import JointModel
    from training.loop import forward_backward

    backbone, head, items, pad_id = tiny
    seen = {}
    attention = backbone.get_base_model().model.layers[0].self_attn

    def in_forward(module, args, output):
        seen["forward"] = torch.backends.cuda.cudnn_sdp_enabled()

    def in_backward(module, grad_input, grad_output):
        seen["backward"] = torch.backends.cuda.cudnn_sdp_enabled()

    handles = [attention.register_forward_hook(in_forward), attention.register_full_backward_hook(in_backward)]
    accelerator = SimpleNamespace(backward=lambda loss: loss.backward())
    model = JointModel(backbone, head, LossSettings())
    assert torch.backends.cuda.cudnn_sdp_enabled()
    try:
        with torch.enable_grad():
            forward_backward(model, collate(items[:2], pad_id), accelerator)
    finally:
        for handle in handles:
            handle.remove()
        backbone.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
    assert seen == {"forward": False, "backward": False}
    assert torch.backends.cuda.cudnn_sdp_enabled()


@torch.no_grad()
def test_collated_batches_attend_causally_and_other_batches_keep_their_mask(tiny, monkeypatch):
    """collate's right-padded batch reaches the backbone without its padding mask (the flash
    kernel's causal path); a batch without the flag, e.g. left-padded, keeps the mask."""
    from training import joint

    backbone, head, items, pad_id = tiny
    masks = []
    real = joint.backbone_hidden

    def spy(backbone, input_ids, attention_mask, layer=-1):
        masks.append(attention_mask)
        return real(backbone, input_ids, attention_mask, layer)

    monkeypatch.setattr(joint, "backbone_hidden", spy)
    batch = collate(items, pad_id)
    assert batch["right_padded"] is True
    lengths = batch["attention_mask"].sum(dim=1)
    assert all(bool((row[:n] == 1).all() and (row[n:] == 0).all()) for row, n in zip(batch["attention_mask"], lengths))
    joint_losses(backbone, head, batch, LossSettings(), head.config.layer)
    unflagged = {k: v for k, v in batch.items() if k != "right_padded"}
    joint_losses(backbone, head, unflagged, LossSettings(), head.config.layer)
    assert masks[0] is None
    assert masks[1] is batch["attention_mask"]
