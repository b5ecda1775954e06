"""The alignment head: vectorised pooling, pair scores, batching, size, save/load."""

from __future__ import annotations

import pytest
import torch

from heads.alignment import NotePairHead, count_parameters, load_head, save_head
from heads.config import HeadConfig


def loop_mean(hidden: torch.Tensor, spans) -> torch.Tensor:
    return torch.stack([hidden[b, s:e].mean(0) for b, s, e in spans])


def test_mean_pooling_matches_per_span_loop():
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 8)
    spans = [(0, 0, 3), (0, 3, 4), (1, 2, 9), (1, 9, 12), (0, 5, 12)]
    head = NotePairHead(8, proj_dim=4)
    assert torch.allclose(head.pool(hidden, torch.tensor(spans)), loop_mean(hidden, spans), atol=1e-6)
    # [T,H] input with (start, end) spans means row 0.
    assert torch.allclose(head.pool(hidden[1], [(2, 9)]), loop_mean(hidden, [(1, 2, 9)]), atol=1e-6)


def test_attention_pooling_only_sees_its_span():
    torch.manual_seed(0)
    head = NotePairHead(8, proj_dim=4, pooling="attention")
    hidden = torch.randn(1, 10, 8)
    spans = torch.tensor([[0, 2, 5], [0, 7, 9]])
    before = head.pool(hidden, spans)
    changed = hidden.clone()
    changed[0, 5:7] += 100.0  # tokens outside both spans
    changed[0, 9:] -= 50.0
    assert torch.allclose(head.pool(changed, spans), before, atol=1e-6)
    # A convex combination of the span's tokens: inside the per-dimension min/max.
    inside = hidden[0, 2:5]
    assert bool((before[0] <= inside.max(0).values + 1e-6).all() and (before[0] >= inside.min(0).values - 1e-6).all())


def test_forward_shapes_and_batch_equals_single():
    torch.manual_seed(0)
    head = NotePairHead(16, proj_dim=8, relevance=True).eval()
    hidden = torch.randn(2, 20, 16)
    notes = [[(1, 3), (3, 6), (6, 9)], [(0, 4), (4, 8)]]
    answers = [[(10, 13), (13, 15)], [(12, 18)]]
    single = [head(hidden[b], notes[b], answers[b]) for b in range(2)]
    assert single[0].pair_logits.shape == (2, 3) and single[0].relevance_logits.shape == (3,)
    assert single[1].pair_logits.shape == (1, 2)
    flat_notes = torch.tensor([(b, s, e) for b in range(2) for s, e in notes[b]])
    flat_answers = torch.tensor([(b, s, e) for b in range(2) for s, e in answers[b]])
    pairs, rel = head.forward_batch(hidden, flat_notes, [3, 2], flat_answers, [2, 1])
    for b in range(2):
        assert torch.allclose(pairs[b], single[b].pair_logits, atol=1e-5)
    assert torch.allclose(rel, torch.cat([s.relevance_logits for s in single]), atol=1e-5)
    # No relevance branch when switched off.
    assert NotePairHead(16, proj_dim=8, relevance=False)(hidden[0], notes[0], answers[0]).relevance_logits is None


def test_gradients_reach_hidden_states():
    head = NotePairHead(8, proj_dim=4)
    hidden = torch.randn(1, 10, 8, requires_grad=True)
    out = head(hidden, [(0, 4), (4, 8)], [(8, 10)])
    out.pair_logits.sum().backward()
    assert hidden.grad is not None and float(hidden.grad[0, :10].abs().sum()) > 0


def test_size_and_precision_for_qwen3_4b_width():
    head = NotePairHead(2560)
    n = count_parameters(head)
    assert 100_000 < n < 10_000_000
    assert all(p.dtype == torch.float32 for p in head.parameters())
    # bf16 hidden states are upcast on entry.
    out = head(torch.randn(6, 2560, dtype=torch.bfloat16), [(0, 3)], [(3, 6)])
    assert out.pair_logits.dtype == torch.float32


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(3)
    head = NotePairHead(HeadConfig(hidden_size=12, proj_dim=6, mlp_dim=10, pooling="attention", layer=1))
    save_head(head, tmp_path)
    assert (tmp_path / "head.safetensors").is_file() and (tmp_path / "head_config.json").is_file()
    loaded = load_head(tmp_path)
    assert loaded.config == head.config
    hidden = torch.randn(1, 9, 12)
    assert torch.equal(head(hidden, [(0, 4)], [(4, 9)]).pair_logits, loaded(hidden, [(0, 4)], [(4, 9)]).pair_logits)


def test_head_config_rejects_bad_values():
    with pytest.raises(ValueError, match="pooling"):
        HeadConfig(hidden_size=8, pooling="max")
    with pytest.raises(ValueError, match="unknown head config keys"):
        HeadConfig.from_dict({"hidden_size": 8, "colour": "red"})
