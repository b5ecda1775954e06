"""Atomic file writes: a temp file beside the target, then a rename.

A crash or a validation error part-way never leaves a half-written submission,
score file or run record behind under the final name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through ``write(binary_file)`` to a temp file beside ``target``, then rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json_atomic(path: Path, data: object) -> None:
    """Indented UTF-8 JSON; values JSON lacks (paths, dates) are written as strings."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
