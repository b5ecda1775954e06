"""The export folder (``RUN/export``): where it is, its ``manifest.json``, the alignment threshold
it carries and the package versions recorded in it and in run records. The one owner of these
rules; ``training/export.py`` builds the manifest's content, ``model/checkpoint.py`` loads the
weights, ``inference`` and ``evaluation`` read what they need through here.
"""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

from data.errors import InputError

MANIFEST = "manifest.json"
EXPORT_FORMAT = "archehr-export/1"
# The alignment threshold when nothing was calibrated (no cited training pairs, no head trained).
DEFAULT_THRESHOLD = 0.5
MANIFEST_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "numpy", "archehr")


def find_export(path: str | Path) -> Path:
    """The export folder, given a run folder (uses RUN/export) or the export folder itself."""
    p = Path(path)
    for candidate in (p / "export", p):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise InputError(f"not a run folder or export folder (no {MANIFEST})", p)


def read_manifest(export_dir: str | Path) -> dict:
    """``manifest.json`` of an export folder; missing or invalid -> InputError naming it."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"not an export folder (no {MANIFEST})", export_dir)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"invalid {MANIFEST} ({getattr(err, 'msg', err)})", path) from None
    if not isinstance(manifest, dict):
        raise InputError(f"invalid {MANIFEST} (not a JSON object)", path)
    return manifest


def manifest_threshold(manifest: dict) -> float:
    """The calibrated alignment threshold recorded in a manifest (the default when absent)."""
    return float((manifest.get("alignment") or {}).get("threshold", DEFAULT_THRESHOLD))


def write_manifest(export_dir: str | Path, manifest: dict) -> Path:
    """Write ``manifest`` (any keys; callers add fields freely) into an export folder being built."""
    path = Path(export_dir) / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def package_versions(names: tuple[str, ...] = MANIFEST_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None where absent), for manifests and run records."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
