"""The export folder (``RUN/export``): where it is, its ``manifest.json``, the alignment threshold
it carries and the package versions recorded in it and in run records. The one owner of these
rules; ``training/export.py`` builds the manifest's content, ``model/loaded_export.py`` loads the
weights, ``inference`` and ``evaluation`` read what they need through here.
"""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

from plumbing.errors import InputError

from .manifest import DEFAULT_THRESHOLD, EXPORT_FORMAT, ExportManifest

MANIFEST = "manifest.json"
__all__ = ["DEFAULT_THRESHOLD", "EXPORT_FORMAT", "MANIFEST", "ExportManifest", "find_export", "model_card",
           "package_versions", "read_manifest", "write_manifest"]
MANIFEST_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "numpy", "archehr")


def find_export(path: str | Path) -> Path:
    """The export folder, given a run folder (uses RUN/export) or the export folder itself."""
    p = Path(path)
    for candidate in (p / "export", p):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise InputError(f"not a run folder or export folder (no {MANIFEST})", p)


def read_manifest(export_dir: str | Path) -> ExportManifest:
    """The one reader of ``manifest.json``: missing, invalid JSON or any mistyped field -> InputError
    naming the file (and the field)."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"not an export folder (no {MANIFEST})", export_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as err:
        raise InputError(f"invalid {MANIFEST} ({getattr(err, 'msg', 'nested too deeply')})", path) from None
    if not isinstance(data, dict):
        raise InputError(f"invalid {MANIFEST} (not a JSON object)", path)
    return ExportManifest.from_dict(data, path)


def write_manifest(export_dir: str | Path, manifest: ExportManifest) -> Path:
    """The one writer of ``manifest.json``, into an export folder being built."""
    path = Path(export_dir) / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest.to_dict(), indent=2) + "\n")
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


def model_card(record: ExportManifest) -> str:
    """``export/README.md``: what the export is, what it was trained on, and what it is for."""
    manifest = record.to_dict()
    base = manifest.get("base_model") or {}
    if base.get("random_init"):
        base_line = (f"randomly initialised `{base.get('preset')}` (seed {base['random_init'].get('seed')}): "
                     "a test model, it generates noise")
    else:
        base_line = f"`{base.get('id')}` (preset `{base.get('preset')}`, 4-bit NF4: {base.get('load_in_4bit')})"
    lora = manifest.get("lora") or {}
    alignment = manifest.get("alignment") or {}
    lines = [
        "# archehr export",
        "",
        "A LoRA adapter and an evidence-alignment head for ArchEHR-QA (answering patients' questions about "
        "their hospital records, and linking each answer sentence to the note sentences that support it).",
        "",
        "**Intended use: research only.** Not for clinical decisions, and not to be shown to patients "
        "without review by a clinician.",
        "",
        "## Base model",
        f"- {base_line}",
        f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
        f"on {', '.join(lora.get('targets') or [])}",
        "",
        "## Training stages",
    ]
    for i, stage in enumerate(manifest.get("stages") or [], 1):
        lines.append(f"{i}. `{stage.get('stage')}`{' (joint head)' if stage.get('joint') else ''}: "
                     f"{stage.get('examples')} examples, {stage.get('steps')} steps, seed {stage.get('seed')}, "
                     f"final loss {stage.get('final_loss')}, finished {stage.get('finished')}")
        for data in stage.get("data") or []:
            lines.append(f"   - data `{Path(str(data.get('path'))).name}` sha256 `{data.get('sha256')}`")
    lines += [
        "",
        "## Thresholds",
        f"- alignment probability threshold {alignment.get('threshold')} ({alignment.get('calibrated_on')}; "
        f"pair F1 there {alignment.get('train_pair_f1')}, {alignment.get('n_examples')} examples). "
        "Chosen on training cases: it is not a held-out score.",
    ]
    for key, value in sorted(manifest.items()):
        if key.endswith("_threshold") and value is not None:
            lines.append(f"- {key.replace('_', ' ')}: {value}")
    lines += ["", "## Evaluation"]
    cv = manifest.get("cv")
    if cv:
        lines.append("Case-grouped cross-validation (held-out cases):")
        lines += [f"- {name}: {value}" for name, value in sorted(cv.items())]
    else:
        lines.append("No cross-validation scores are recorded with this export; `python score.py cv` "
                     "measures them on held-out cases.")
    lines += [
        "",
        "## Loading",
        "```python",
        "import sys",
        'sys.path.insert(0, "/path/to/archehr")',
        "from model.loaded_export import load_export",
        'loaded = load_export("path/to/export")',
        "```",
        "The adapter also loads with plain PEFT: `PeftModel.from_pretrained(base_model, \"path/to/export\")`.",
        "",
        f"Packages: {', '.join(f'{k} {v}' for k, v in (manifest.get('packages') or {}).items() if v)}. "
        f"Created {manifest.get('created')}.",
    ]
    return "\n".join(lines) + "\n"
