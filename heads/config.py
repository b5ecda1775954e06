"""Configuration of the alignment head, saved beside its weights as ``head_config.json``."""

from __future__ import annotations

from typing import Any

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

POOLINGS = ("mean", "attention")


@dataclass
class HeadConfig:
    """The head's shape. The one place its defaults are written: TrainConfig's head_* and
    NotePairHead's arguments read them."""

    hidden_size: int
    proj_dim: int = 256
    mlp_dim: int = 256
    pooling: str = "mean"
    relevance: bool = True
    dropout: float = 0.0
    # Which backbone hidden state feeds the head, in ``output_hidden_states`` numbering:
    # 0 = embeddings, k = output of decoder layer k, -1 (or num_layers) = final normed state.
    layer: int = -1

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.hidden_size <= 0 or self.proj_dim <= 0 or self.mlp_dim <= 0:
            raise ValueError("hidden_size, proj_dim and mlp_dim must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown head config keys {unknown}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "HeadConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
