"""Model files shipped inside installed packages (the Qwen3 tokenizer, all-MiniLM-L6-v2): found
by import spec, never downloaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def packaged_folder(module: str, distribution: str, folder: str, required: str) -> Path:
    """``folder`` inside the installed ``module`` (pip name ``distribution``), holding ``required``."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package {distribution} is not installed (pip install {distribution})")
    path = Path(spec.origin).parent / folder
    if not (path / required).is_file():
        raise RuntimeError(f"no {required} in {path}")
    return path
