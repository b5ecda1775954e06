"""Backbone loading: LoRA placement, seeded random base, NF4 on CPU, hidden-state tap."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from data.prompts import PromptExample, encode_example
from heads.alignment import NotePairHead
from model.backbone import (
    LORA_TARGETS,
    LoraSettings,
    backbone_hidden,
    build_random_base,
    compile_decoder_layers,
    decoder,
    load_backbone,
    load_tokenizer,
    save_random_base,
    start_compile_workers,
)
from training.batching import collate
from training.data import TrainItem
from training.joint import JointModel, LossSettings


def small_example() -> PromptExample:
    return PromptExample(
        example_id="x",
        question="Why was the stent placed?",
        note_ids=["1", "2", "3"],
        note_texts=["A stone blocked the kidney.", "A stent was placed.", "He went home."],
        answer_ids=["1"],
        answer_texts=["The stent relieved the blockage."],
        pairs={("1", "2")},
    )


def test_lora_on_every_projection_and_only_lora_trains():
    model = load_backbone("tiny", device="cpu", gradient_checkpointing=False)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    layers = decoder(model).layers
    assert len(layers) == 2
    for layer in layers:
        for name in LORA_TARGETS:
            parent = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
            assert hasattr(getattr(parent, name), "lora_A"), name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(LORA_TARGETS) * 2  # A and B per projection per layer
    custom = load_backbone("tiny", device="cpu", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    assert custom.peft_config["default"].r == 4


def test_random_base_is_seeded_saved_once_and_leaves_global_rng(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    a = save_random_base("tiny", tmp_path / "a")
    b = save_random_base("tiny", tmp_path / "b")
    assert torch.equal(torch.rand(3), expected), "building the random base must not consume the global RNG"
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    save_random_base("tiny", tmp_path / "a")  # already there: not rewritten
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime
    other = build_random_base("tiny", seed=1).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(other[key], wa[key])


def test_nf4_four_bit_path_on_cpu(tmp_path, monkeypatch, qwen_tokenizer):
    import bitsandbytes as bnb

    monkeypatch.setenv("ARCHEHR_CACHE", str(tmp_path))
    model = load_backbone("tiny", load_in_4bit=True, device="cpu")
    # The random base went through disk and the user's from_pretrained + NF4 path.
    assert (tmp_path / "random-bases" / "tiny-seed0" / "model.safetensors").is_file()
    q_proj = decoder(model).layers[0].self_attn.q_proj
    base_layer = q_proj.base_layer
    assert isinstance(base_layer, bnb.nn.Linear4bit)
    assert isinstance(base_layer.weight, bnb.nn.Params4bit)
    assert base_layer.weight.quant_type == "nf4"
    assert base_layer.weight.quant_state.nested  # double quantisation
    assert base_layer.compute_dtype == torch.bfloat16
    enc = encode_example(qwen_tokenizer, small_example())
    batch = collate([TrainItem(enc)], qwen_tokenizer.pad_token_id)
    joint = JointModel(model, NotePairHead(64, proj_dim=16), LossSettings())
    losses = joint(batch)
    assert torch.isfinite(losses["loss"].detach()) and float(losses["align"].detach()) > 0
    losses["loss"].backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    # lora_B starts at zero, so its gradient is the one that must be non-zero.
    assert sum(float(g.abs().sum()) for g in lora_grads) > 0
    assert base_layer.weight.grad is None


def test_hidden_tap_matches_output_hidden_states(qwen_tokenizer):
    model = load_backbone("tiny", device="cpu", trainable=False)
    ids = torch.tensor([qwen_tokenizer("A short note about a kidney stone.")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in (0, 1, -2, -1, 2):
            final, tapped = backbone_hidden(model, ids, mask, layer)
            assert torch.allclose(tapped, ref[layer], atol=1e-5), layer
            assert torch.allclose(final, ref[-1], atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        backbone_hidden(model, ids, mask, 5)


def test_tokenizer_by_preset_or_folder():
    from model.presets import bundled_tokenizer_dir

    a, b = load_tokenizer("tiny"), load_tokenizer(str(bundled_tokenizer_dir()))
    text = "Pt was given furosemide 40 mg IV."
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a.pad_token_id is not None


def test_compile_workers_start_through_torchs_hook_or_say_they_cannot(monkeypatch):
    import sys

    import torch._inductor.async_compile as async_compile

    started: list[bool] = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: started.append(True))
    assert start_compile_workers() is True and started == [True]
    monkeypatch.setitem(sys.modules, "torch._inductor.async_compile", None)  # a torch without the hook
    assert start_compile_workers() is False and started == [True]


def test_training_starts_compile_workers_first_only_when_it_compiles_on_cuda(monkeypatch):
    from types import SimpleNamespace

    import training.run as run

    class Started(Exception):
        pass

    class LoadedTokenizer(Exception):
        pass

    def start():
        raise Started

    def tokenizer(*_):
        raise LoadedTokenizer

    monkeypatch.setattr(run, "start_compile_workers", start)
    monkeypatch.setattr(run, "load_tokenizer", tokenizer)
    monkeypatch.setattr(run.torch.cuda, "is_available", lambda: True)
    setup = SimpleNamespace(cfg=SimpleNamespace(compile=True, base=None), preset="tiny")
    with pytest.raises(Started):  # before the tokenizer, data and weights load
        run.train_and_export(setup, resume=False)
    setup.cfg.compile = False
    with pytest.raises(LoadedTokenizer):
        run.train_and_export(setup, resume=False)
    setup.cfg.compile = True
    monkeypatch.setattr(run.torch.cuda, "is_available", lambda: False)
    with pytest.raises(LoadedTokenizer):
        run.train_and_export(setup, resume=False)


@pytest.mark.slow
def test_compiled_layers_trace_once_with_floats_as_constants(monkeypatch):
    """Left symbolic, the norm eps and LoRA floats made dynamo restart its trace (issue 21)."""
    from torch._dynamo.utils import compilation_time_metrics

    monkeypatch.setattr(torch._dynamo.config, "specialize_float", False)  # torch's default, restored after

    torch._dynamo.reset()
    compilation_time_metrics.clear()
    model = load_backbone("tiny", load_in_4bit=False, device=torch.device("cpu"), lora=LoraSettings(dropout=0.05))
    compile_decoder_layers(model)
    model.train()
    ids = torch.randint(0, 1000, (2, 37))
    model(input_ids=ids, labels=ids).loss.backward()
    assert torch._dynamo.config.specialize_float
    assert "compile_attempt_0" in compilation_time_metrics
    assert "compile_attempt_1" not in compilation_time_metrics
    torch._dynamo.reset()


def _checkpointed_tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = load_backbone("tiny", load_in_4bit=False, device=torch.device("cpu"), lora=LoraSettings(dropout=0.1))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so that every LoRA path carries gradient
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(seed + 1))
    return model.train()


def _lora_grads(model) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)  # the same dropout masks for every model
    ids = torch.randint(0, 1000, (2, 29), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_layers_run_their_compiled_call_in_the_forward_and_the_recompute(monkeypatch):
    """transformers >= 5.24 checkpoints inside a layer's forward, where dynamo does not compile:
    the compiled layers ran eagerly under gradient checkpointing. Checkpointed around the
    compiled call, each step calls it twice a layer (forward, recompute), with the same
    gradients as the uncompiled model (dropout masks replayed)."""
    calls: list[int] = []

    def counting_compile(fn, **kwargs):  # stands in for torch.compile: counts, runs eagerly
        assert kwargs == {"dynamic": True}

        def compiled(*args, **kw):
            calls.append(1)
            return fn(*args, **kw)

        return compiled

    want = _lora_grads(_checkpointed_tiny())
    model = _checkpointed_tiny()
    monkeypatch.setattr(torch, "compile", counting_compile)
    compile_decoder_layers(model)
    layers = decoder(model).layers
    assert all(not layer.gradient_checkpointing for layer in layers)  # its own, inside forward: off
    got = _lora_grads(model)
    assert len(calls) == 2 * len(layers)
    assert want.keys() == got.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    calls.clear()
    with torch.no_grad():  # nothing to recompute: one call a layer
        model(input_ids=torch.ones((1, 5), dtype=torch.long))
    assert len(calls) == len(layers)


@pytest.mark.slow
def test_checkpointed_compiled_layers_run_compiled_graphs_not_eager_ops():
    """The real torch.compile on CPU: under gradient checkpointing, the layers' forward and
    recompute run inductor's graphs (no eager SwiGLU or RMSNorm ops left in the layers)."""
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    model = _checkpointed_tiny()
    compile_decoder_layers(model)
    n_layers = len(decoder(model).layers)
    ids = torch.randint(0, 1000, (1, 40))
    for _ in range(2):  # compiled and warm
        model(input_ids=ids, labels=ids).loss.backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    names = [e.name for e in prof.events()]
    forward_graphs = sum(1 for n in names if n == "CompiledFunction")
    assert forward_graphs == 2 * n_layers  # forward + recompute, each compiled
    assert names.count("aten::silu") == 0
    assert names.count("aten::rsqrt") == 1  # the final norm, outside the layers (eager: 8 a layer)
    torch._dynamo.reset()


def test_checkpointed_compiled_call_drops_a_kv_cache_in_training_only():
    """As transformers does under checkpointing: the recompute would write a cache twice."""
    from model.backbone import checkpoint_compiled_call

    seen: list[object] = []

    class Layer(torch.nn.Module):
        gradient_checkpointing = True

        def forward(self, x, past_key_values=None):
            seen.append(past_key_values)
            return x * x

    layer = Layer().train()
    with pytest.raises(ValueError, match="compiled layer"):
        checkpoint_compiled_call(layer)
    layer._compiled_call_impl = layer._call_impl  # stands in for layer.compile()
    checkpoint_compiled_call(layer)
    x = torch.ones(3, requires_grad=True)
    layer(x, past_key_values="cache").sum().backward()
    assert seen == [None, None]  # forward and recompute
    with torch.no_grad():
        layer(x, past_key_values="cache")
    assert seen[-1] == "cache" and torch.equal(x.grad, 2 * torch.ones(3))
