"""The standalone inference load (model.standalone_qwen3 + model.chat_tokenizer): the weights,
tokens and predictions of the transformers load, without importing transformers."""

from __future__ import annotations

import gc
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.archehr import load_xml
from data.prompts import chat_prompt, encode_examples, example_from_case
from model.backbone import load_merged, load_tokenizer, save_random_base
from model.chat_tokenizer import chat_tokenizer_unsupported, load_chat_tokenizer
from model.loaded_export import load_export, standalone_folders
from model.packed import pack, packed_forward
from model.presets import bundled_tokenizer_dir, get_preset
from model.standalone_qwen3 import StandaloneConfig, load_standalone_merged, standalone_unsupported

from synthetic import make_cases
from test_merged_view import trained_looking

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_XML = ROOT / "examples" / "archehr-qa.xml"
EXAMPLE_KEY = ROOT / "examples" / "archehr-qa_key.json"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return save_random_base("tiny", tmp_path_factory.mktemp("base") / "tiny")


@pytest.mark.parametrize("quantised", [True, False])
def test_weights_and_forward_equal_the_merged_load(tiny_base, tmp_path, quantised):
    """Every weight equals transformers' merged load bit for bit (NF4 round trip and LoRA fold
    included), and so does the packed forward: states and greedy tokens."""
    trained_looking(quantised).save_pretrained(tmp_path)  # LoRA B != 0: a skipped fold would show
    want = load_merged("tiny", tmp_path, load_in_4bit=quantised, device="cpu", base_path=str(tiny_base))
    got = load_standalone_merged(tiny_base, tmp_path, quantised=quantised, device="cpu")
    want_params, got_params = dict(want.named_parameters()), dict(got.named_parameters())
    assert set(got_params) == set(want_params)
    for name, tensor in got_params.items():
        assert tensor.dtype == want_params[name].dtype and torch.equal(tensor, want_params[name]), name
    assert got.lm_head.weight is got.model.embed_tokens.weight  # tied, as the config says
    assert torch.equal(got.model.rotary_emb.inv_freq, want.model.rotary_emb.inv_freq)
    ids = [torch.randint(0, 2000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (17, 40, 5)]
    packed = pack(ids, torch.device("cpu"))
    at = torch.tensor([16, 56, 61])
    for tap in (-1, 1):
        (h_want, t_want), (h_got, t_got) = (packed_forward(m, packed, tap=tap, logits_at=at) for m in (want, got))
        assert torch.equal(h_got, h_want) and torch.equal(t_got, t_want)


def test_an_unquantised_load_imports_no_compiler(tiny_base, tmp_path):
    """Building and filling the module tree imports neither transformers, PEFT nor torch's
    compiler (an nn.Embedding initialised on the meta device imports dynamo: seconds of load)."""
    trained_looking(False).save_pretrained(tmp_path)
    script = (
        "import sys\n"
        "from model.standalone_qwen3 import load_standalone_merged\n"
        f"load_standalone_merged({str(tiny_base)!r}, {str(tmp_path)!r}, quantised=False, device='cpu')\n"
        "print(sorted(m for m in ('transformers', 'peft', 'torch._dynamo', 'torch._inductor') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


ENGINE_MODULES = ("model/decoding.py", "model/packed.py", "model/fused_ops.py", "model/backbone.py",
                  "model/head_scoring.py", "inference/memory.py", "inference/fast.py")  # fmt: skip


def test_the_config_holds_every_field_the_engine_reads(tiny_base):
    """Every ``config.X`` / ``cfg.X`` / ``getattr(config, "X")`` the engine's modules read exists on
    the standalone config with transformers' value: a field missing there turns a fast path off
    (the fused kernels read ``hidden_act``) or breaks a run."""
    import re

    from transformers import AutoConfig

    pattern = re.compile(r"\b(?:config|cfg)\.([a-z_]+)\b|getattr\((?:config|cfg), \"([a-z_]+)\"")
    read = set()
    for module in ENGINE_MODULES:
        for match in pattern.finditer((ROOT / module).read_text(encoding="utf-8")):
            read.add(match.group(1) or match.group(2))
    # not model config fields: dynamo's config, the head's config, the config.json file name, the
    # transformers-only loading switches
    read -= {"specialize_float", "layer", "json", "use_cache", "quantization_config"}
    assert {"hidden_act", "rms_norm_eps", "num_key_value_heads", "model_type"} <= read
    ours, theirs = StandaloneConfig.from_folder(tiny_base), AutoConfig.from_pretrained(tiny_base)
    for name in sorted(read):
        assert hasattr(ours, name), name
        assert getattr(ours, name) == getattr(theirs, name), name


def test_rotary_embedding_equals_transformers_on_long_positions(tiny_base, tmp_path):
    trained_looking(False).save_pretrained(tmp_path)
    want = load_merged("tiny", tmp_path, load_in_4bit=False, device="cpu", base_path=str(tiny_base))
    got = load_standalone_merged(tiny_base, tmp_path, quantised=False, device="cpu")
    positions = torch.arange(0, 40000, 7)[None]
    x = torch.zeros(1, dtype=torch.bfloat16)
    for a, b in zip(want.model.rotary_emb(x, positions), got.model.rotary_emb(x, positions)):
        assert torch.equal(a, b)


def test_unreadable_bases_say_why(tmp_path, tiny_base):
    assert standalone_unsupported(None) == "the base is not a local folder"
    assert standalone_unsupported(tmp_path / "absent") == "the base is not a local folder"
    assert "config.json" in standalone_unsupported(tmp_path)
    config = json.loads((tiny_base / "config.json").read_text())
    for i, (change, words) in enumerate(
        (
            ({"model_type": "llama"}, "not qwen3"),
            ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, "yarn"),
            ({"use_sliding_window": True}, "sliding-window"),
            ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
            ({"attention_bias": True}, "bias"),
            ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantised"),
        )
    ):
        folder = tmp_path / f"base{i}"
        folder.mkdir()
        (folder / "model.safetensors").symlink_to(tiny_base / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        assert words in (standalone_unsupported(folder) or ""), change
    broken = tmp_path / "broken-index"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors.index.json").write_text("{not json")
    assert "unreadable model.safetensors.index.json" in standalone_unsupported(broken)
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    assert standalone_unsupported(broken) == "no safetensors weights in the base folder"  # a shard not downloaded
    assert standalone_unsupported(tiny_base) is None
    # A random preset built in memory and a hub id that is not in the local cache go through transformers.
    assert "in memory" in standalone_folders(get_preset("tiny"), None, 0, quantised=False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    assert "hub id" in standalone_folders(get_preset("tiny"), "no-such-org/no-such-model", 0, quantised=True)
    # --base names the tokenizer's folder too, as transformers' load reads it
    assert "no tokenizer.json" in standalone_folders(get_preset("tiny"), str(tiny_base), 0, quantised=True)
    full = tmp_path / "with-tokenizer"
    full.mkdir()
    for f in [*tiny_base.iterdir(), *bundled_tokenizer_dir().iterdir()]:
        (full / f.name).symlink_to(f)
    assert standalone_folders(get_preset("tiny"), str(full), 0, quantised=True) == (full, full)


# --- the tokenizer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers():
    return load_chat_tokenizer(bundled_tokenizer_dir()), load_tokenizer("tiny")


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abc XYZ\n\t\r 0123.,;:'\"!?éüß中文日本<|>_-/()[]{}\u00a0\u200b"
    specials = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>"]
    texts = []
    for _ in range(n):
        parts = [rng.choice(alphabet) for _ in range(rng.randint(0, 60))]
        if rng.random() < 0.3:
            parts.insert(rng.randint(0, len(parts)), rng.choice(specials))
        texts.append("".join(parts))
    return texts


def test_tokens_and_offsets_equal_transformers(tokenizers):
    ours, theirs = tokenizers
    texts = _random_texts(400, 0) + ["", " ", "e\u0301 café", "  \n\n  x", "The patient's BP 120/80 mmHg."]
    a = ours(texts, add_special_tokens=False, return_offsets_mapping=True)
    b = theirs(texts, add_special_tokens=False, return_offsets_mapping=True)
    assert a["input_ids"] == b["input_ids"]
    assert [[tuple(o) for o in row] for row in a["offset_mapping"]] == [
        [tuple(o) for o in row] for row in b["offset_mapping"]
    ]
    assert ours(texts[5], add_special_tokens=False, verbose=False)["input_ids"] == b["input_ids"][5]


def test_decoding_equals_transformers(tokenizers):
    ours, theirs = tokenizers
    rng = random.Random(1)
    vocab = theirs.vocab_size + len(theirs.get_added_vocab())
    rows = [[rng.randrange(vocab) for _ in range(rng.randint(0, 40))] for _ in range(300)]
    rows.append(sorted(set(theirs.all_special_ids)) + [9707, 151667, 151668])
    for skip in (True, False):
        assert ours.batch_decode(rows, skip_special_tokens=skip) == theirs.batch_decode(rows, skip_special_tokens=skip)
    assert ours.batch_decode(torch.tensor(rows[:1]), skip_special_tokens=True) == [ours.decode(rows[0], True)]
    assert set(ours.special_ids) == set(theirs.all_special_ids)
    assert (ours.eos_token_id, ours.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id)
    assert ours.convert_tokens_to_ids("<|im_end|>") == theirs.convert_tokens_to_ids("<|im_end|>")
    assert ours.convert_tokens_to_ids("no such token") is None and ours.unk_token_id == theirs.unk_token_id


def test_chat_prompts_and_encodings_equal_transformers(tokenizers):
    ours, theirs = tokenizers
    cases = load_xml(EXAMPLE_XML) + make_cases(25, seed=3)
    examples = [example_from_case(c, with_answer=True) for c in cases]
    for ex in examples:
        assert chat_prompt(ours, ex) == chat_prompt(theirs, ex)
    wants = [i % 2 == 0 for i in range(len(examples))]
    assert encode_examples(ours, examples, with_answer=wants) == encode_examples(theirs, examples, with_answer=wants)
    messages = [{"role": "user", "content": "hi"}]
    for thinking in (True, False):
        for generation in (True, False):
            kwargs = dict(tokenize=False, add_generation_prompt=generation, enable_thinking=thinking)
            assert ours.apply_chat_template(messages, **kwargs) == theirs.apply_chat_template(messages, **kwargs)
    with pytest.raises(ValueError, match="text only"):
        ours.apply_chat_template(messages, tokenize=True)


def test_tokenizer_folders_it_cannot_read_say_why(tmp_path):
    assert "tokenizer.json" in chat_tokenizer_unsupported(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert "tokenizer_config.json" in chat_tokenizer_unsupported(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert "LlamaTokenizer" in chat_tokenizer_unsupported(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    assert "chat template" in chat_tokenizer_unsupported(tmp_path)
    with pytest.raises(ValueError, match="chat template"):
        load_chat_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "Qwen2Tokenizer", "chat_template": "x"})
    )
    from plumbing.errors import InputError

    with pytest.raises(InputError, match="tokenizer.json: unreadable tokenizer"):
        load_chat_tokenizer(tmp_path)


# --- the whole load, as infer.py's engine runs it -------------------------------------------------


@pytest.fixture(scope="module")
def nf4_export(tmp_path_factory):
    """A tiny export trained on the NF4 base (train.py, two steps), its random base in a cache
    folder of its own: the standalone load reads that base as it reads a released one."""
    import train

    root = tmp_path_factory.mktemp("nf4_export")
    cache = root / "cache"
    previous = os.environ.get("ARCHEHR_CACHE")
    os.environ["ARCHEHR_CACHE"] = str(cache)
    try:
        args = ["--stage", "task", "--joint", "--preset", "tiny", "--load_in_4bit", "true", "--xml", str(EXAMPLE_XML)]
        args += ["--key", str(EXAMPLE_KEY), "--out", str(root / "task"), "--max-steps", "2", "--max-length", "1024"]
        assert train.main([*args, "--progress", "false", "--plot", "false"]) == 0
    finally:
        if previous is None:
            os.environ.pop("ARCHEHR_CACHE")
        else:
            os.environ["ARCHEHR_CACHE"] = previous
    return root / "task" / "export", cache


def _predict(loaded):
    from inference.fast import FastEngine

    cases = load_xml(EXAMPLE_XML)
    engine = FastEngine(loaded)
    return engine.predict(cases, answers=True, pairs=True, relevance=True, max_new_tokens=12)


def test_engine_predictions_equal_the_transformers_load(nf4_export, monkeypatch):
    export, cache = nf4_export
    monkeypatch.setenv("ARCHEHR_CACHE", str(cache))
    standalone = load_export(export, device="cpu", merge=True, load_in_4bit=True, engine_only=True)
    plain = load_export(export, device="cpu", merge=True, load_in_4bit=True)
    assert standalone.loader == "standalone" and plain.loader == "transformers"
    assert type(standalone.model).__name__ == "StandaloneQwen3"
    a, b = _predict(standalone), _predict(plain)
    assert a.answers == b.answers and a.answers
    assert a.pairs.keys() == b.pairs.keys() and a.pairs
    for case_id in a.pairs:
        np.testing.assert_array_equal(a.pairs[case_id], b.pairs[case_id])
    for case_id in b.relevance:
        np.testing.assert_array_equal(a.relevance[case_id], b.relevance[case_id])


def test_standalone_load_imports_neither_transformers_nor_peft(nf4_export):
    export, cache = nf4_export
    script = (
        "import sys\n"
        "from plumbing.console import hide_progress_bars\n"
        "hide_progress_bars()\n"
        "from inference.fast import load_for_inference\n"
        f"loaded, record = load_for_inference({str(export)!r}, device='cpu', merge=True, load_in_4bit=True)\n"
        "assert record['loader'] == 'standalone', record\n"
        "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))\n"
    )
    env = {**os.environ, "ARCHEHR_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_base_it_cannot_read_is_said_and_recorded(nf4_export, monkeypatch, tmp_path):
    from inference.fast import load_for_inference

    export, cache = nf4_export
    monkeypatch.setenv("ARCHEHR_CACHE", str(cache))
    base = next(cache.glob("random-bases/*"))
    odd = tmp_path / "base"
    odd.mkdir()
    for f in base.iterdir():
        (odd / f.name).symlink_to(f)
    (odd / "config.json").unlink()
    (odd / "config.json").write_text(
        json.dumps({**json.loads((base / "config.json").read_text()), "attention_bias": True})
    )
    said: list[str] = []
    loaded, record = load_for_inference(
        export, base=str(odd), device="cpu", merge=True, load_in_4bit=True, log=said.append
    )
    assert record["loader"].startswith("transformers: attention bias")
    assert any("loaded through transformers (attention bias" in line for line in said)


# --- bitsandbytes without torch's compiler ---------------------------------------------------------

NF4_CHECKSUM = (
    "import hashlib, sys, torch\n"
    "{importer}\n"
    "loaded_compiler = 'torch._dynamo' in sys.modules\n"
    "from bitsandbytes.functional import dequantize_4bit, quantize_4bit\n"
    "w = torch.randn(384, 640, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)\n"
    "q, state = quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type='nf4')\n"
    "d = dequantize_4bit(q, state)\n"
    "digest = hashlib.sha256(q.numpy().tobytes() + d.float().numpy().tobytes()).hexdigest()\n"
    "print(loaded_compiler, torch.compile.__module__, torch.compile.__name__, digest)\n"
)


def _nf4_in_fresh_process(importer: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = NF4_CHECKSUM.format(importer=importer)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_bitsandbytes_imports_without_the_compiler_and_quantises_the_same():
    ours = _nf4_in_fresh_process("from model.standalone_qwen3 import import_bitsandbytes; import_bitsandbytes()")
    plain = _nf4_in_fresh_process("import bitsandbytes")
    assert ours[0] == "False" and plain[0] == "True"  # dynamo: not imported by ours, imported by the plain import
    assert ours[1:3] == ["torch", "compile"]  # torch.compile is torch's own again
    assert ours[3] == plain[3]  # the same packed weights and dequantised values


class _KernelsThroughTorchOps:
    """bitsandbytes' CUDA backend module as :func:`_nf4_round_trip_on_cuda` calls it, each kernel
    done by the same-named ``torch.ops.bitsandbytes`` op on the CPU: what the glue passes (which
    tensor, block size, order, the scales' offset) is then checked against ``quantize_4bit`` +
    ``dequantize_4bit`` without a GPU. The pointers are resolved to the live tensors."""

    def __init__(self):
        self.lib = SimpleNamespace(
            cquantize_blockwise_bf16_nf4=self._quantize_4bit, cquantize_blockwise_fp32=self._quantize_blockwise
        )
        self.calls: list[str] = []

    @staticmethod
    def _at(pointer: int, like: dict) -> torch.Tensor:
        found = []
        for t in gc.get_objects():
            if not issubclass(type(t), torch.Tensor) or t.device.type != "cpu" or t.is_meta:
                continue
            try:
                if t.data_ptr() == pointer and all(getattr(t, k) == v for k, v in like.items()):
                    found.append(t)
            except RuntimeError:  # tensors without storage (fake tensors other tests left alive)
                continue
        assert found, (pointer, like)
        return found[0]

    def _quantize_4bit(self, code, a, absmax, out, blocksize, n):
        self.calls.append("quantize_4bit")
        assert code is None
        src = self._at(a, {"dtype": torch.bfloat16})
        assert src.numel() == n
        packed, scales = torch.ops.bitsandbytes.quantize_4bit(src, blocksize, "nf4", torch.uint8)
        self._at(out, {"dtype": torch.uint8}).copy_(packed)
        self._at(absmax, {"dtype": torch.float32}).copy_(scales)

    def _quantize_blockwise(self, code, a, absmax, out, blocksize, n):
        self.calls.append("quantize_blockwise")
        src = self._at(a, {"dtype": torch.float32, "shape": torch.Size([n])})
        codes, scales = torch.ops.bitsandbytes.quantize_blockwise(
            src, self._at(code, {"shape": torch.Size([256])}), blocksize
        )
        self._at(out, {"dtype": torch.uint8}).copy_(codes)
        self._at(absmax, {"dtype": torch.float32, "shape": scales.shape}).copy_(scales)

    def _dequantize_blockwise_impl(self, a, absmax, code, blocksize, dtype, out):
        self.calls.append("dequantize_blockwise")
        out.copy_(torch.ops.bitsandbytes.dequantize_blockwise(a, absmax, code, blocksize, dtype))

    def _dequantize_4bit_impl(self, a, absmax, blocksize, quant_type, dtype, out):
        self.calls.append("dequantize_4bit")
        out.copy_(torch.ops.bitsandbytes.dequantize_4bit(a, absmax, blocksize, quant_type, list(out.shape), dtype))


@pytest.mark.parametrize("shape", [(256, 64), (130, 70), (17, 3)])
def test_direct_nf4_round_trip_passes_what_quantize_4bit_passes(shape, monkeypatch):
    """The CUDA round trip's glue around bitsandbytes' kernels (double quantisation of the
    scales, their offset, block sizes, shapes) gives what ``quantize_4bit`` + ``dequantize_4bit``
    give, with each kernel standing in for itself on the CPU (the GPU test runs the real ones)."""
    import contextlib

    import bitsandbytes.functional as bnb_functional

    from model import standalone_qwen3

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])).to(torch.bfloat16)
    q, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    want = bnb_functional.dequantize_4bit(q, state)
    kernels = _KernelsThroughTorchOps()
    monkeypatch.setattr(torch.cuda, "device", lambda _device: contextlib.nullcontext())
    got = standalone_qwen3._nf4_round_trip_on_cuda(weight, kernels)
    assert kernels.calls == ["quantize_4bit", "quantize_blockwise", "dequantize_blockwise", "dequantize_4bit"]
    assert got.dtype == torch.bfloat16 and got.shape == weight.shape
    assert torch.equal(got, want)


def test_compile_stand_in_compiles_at_the_first_call_only():
    from model.standalone_qwen3 import _compile_on_first_call

    compiled: list[tuple[object, dict]] = []

    def real(fn, **kwargs):
        compiled.append((fn, kwargs))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    stand_in = _compile_on_first_call(real)

    def double(x):
        return 2 * x

    direct = stand_in(double)

    @stand_in(dynamic=False)
    def triple(x):
        return 3 * x

    assert compiled == [] and direct.__name__ == "double" and triple.__name__ == "triple"
    assert direct(2) == ("compiled", 4) and direct(3) == ("compiled", 6)
    assert triple(1) == ("compiled", 3)
    assert [(fn.__name__, kwargs) for fn, kwargs in compiled] == [("double", {}), ("triple", {"dynamic": False})]


def test_the_base_loads_as_it_was_trained_on_cuda(nf4_export):
    """NF4 by default where training ran on an NF4 base, unquantised where it did not, whatever
    the preset's own default; on a CPU only when asked."""
    from dataclasses import replace

    from model.export_folder import read_manifest
    from model.loaded_export import base_in_4bit

    manifest = read_manifest(nf4_export[0])
    assert manifest.base_model.load_in_4bit is True
    tiny, big = get_preset("tiny"), get_preset("qwen3-4b")
    assert not tiny.load_in_4bit and big.load_in_4bit
    bf16 = replace(manifest, base_model=replace(manifest.base_model, load_in_4bit=False))
    unknown = replace(manifest, base_model=replace(manifest.base_model, load_in_4bit=None))
    assert base_in_4bit(manifest, tiny, "cuda") is True
    assert base_in_4bit(bf16, big, "cuda") is False
    assert base_in_4bit(unknown, big, "cuda:0") is True and base_in_4bit(unknown, tiny, "cuda") is False
    assert base_in_4bit(manifest, big, "cpu") is False


def _base_copy(tiny_base: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in tiny_base.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).symlink_to(f)
    return folder


def test_bad_base_weights_are_one_line_input_errors(tiny_base, tmp_path):
    """A truncated file, a missing tensor, a tensor of the wrong shape and an adapter that does
    not fit: each an InputError naming the file, before any weight is used."""
    from safetensors.torch import load_file, save_file

    from plumbing.errors import InputError

    trained_looking(False).save_pretrained(tmp_path / "adapter")
    tensors = load_file(str(tiny_base / "model.safetensors"))
    truncated = _base_copy(tiny_base, tmp_path / "truncated")
    (truncated / "model.safetensors").write_bytes((tiny_base / "model.safetensors").read_bytes()[:-100])
    lacking = _base_copy(tiny_base, tmp_path / "lacking")
    save_file(
        {k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k}, str(lacking / "model.safetensors")
    )
    misshapen = _base_copy(tiny_base, tmp_path / "misshapen")
    name = "model.layers.0.self_attn.q_proj.weight"
    save_file({**tensors, name: tensors[name][:-1]}, str(misshapen / "model.safetensors"))
    for folder, words in (
        (truncated, "unreadable weights"),
        (lacking, "lack model.layers.1.mlp.down_proj.weight"),
        (misshapen, f"{name} has shape [63, 64], config.json says [64, 64]"),
    ):
        with pytest.raises(InputError, match=re.escape(words)) as err:
            load_standalone_merged(folder, tmp_path / "adapter", quantised=False, device="cpu")
        assert str(folder) in str(err.value) and "\n" not in str(err.value)
    other = tmp_path / "other-adapter"
    other.mkdir()
    (other / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 7),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(7, 2)},
              str(other / "adapter_model.safetensors"))  # fmt: skip
    with pytest.raises(InputError, match="do not fit the base"):
        load_standalone_merged(tiny_base, other, quantised=False, device="cpu")


def test_the_standalone_model_has_no_forward_of_its_own(tiny_base, tmp_path):
    """Only the fast engine's loops run it; a plain forward says so instead of failing obscurely."""
    trained_looking(False).save_pretrained(tmp_path)
    model = load_standalone_merged(tiny_base, tmp_path, quantised=False, device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    for module in (model, model.model, model.model.layers[0]):
        with pytest.raises(NotImplementedError, match="fast engine"):
            module(input_ids=ids)


def test_a_sharded_base_loads_as_the_single_file(tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_base).save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    trained_looking(True).save_pretrained(tmp_path / "adapter")
    one = load_standalone_merged(tiny_base, tmp_path / "adapter", quantised=True, device="cpu")
    many = load_standalone_merged(sharded, tmp_path / "adapter", quantised=True, device="cpu")
    theirs = dict(many.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in one.named_parameters())


def test_a_cached_hub_id_is_read_from_its_snapshot(tiny_base, tmp_path, monkeypatch):
    """A hub id in the local cache: its snapshot folder (as model.locate finds cached bases), never a download."""
    import huggingface_hub

    snapshot = tmp_path / "models--org--model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for f in [*tiny_base.iterdir(), *bundled_tokenizer_dir().iterdir()]:
        (snapshot / f.name).symlink_to(f)
    asked = []

    def cached(repo_id, filename, *args, **kwargs):
        asked.append((repo_id, filename))
        return str(snapshot / filename) if repo_id == "org/model" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cached)
    assert standalone_folders(get_preset("tiny"), "org/model", 0, quantised=True) == (snapshot, snapshot)
    assert "hub id" in standalone_folders(get_preset("tiny"), "org/other", 0, quantised=True)
    assert asked == [("org/model", "config.json"), ("org/other", "config.json")]
