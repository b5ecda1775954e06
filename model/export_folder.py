"""The export folder (``RUN/export``): where it is, its ``manifest.json``, the alignment threshold
it carries and the package versions recorded in it and in run records. The one owner of these
rules; ``training/export.py`` builds the manifest's content, ``model/loaded_export.py`` loads the
weights, ``inference`` and ``evaluation`` read what they need through here.
"""

from __future__ import annotations

import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from plumbing.errors import InputError

from .manifest import DEFAULT_THRESHOLD, EXPORT_FORMAT, ExportManifest

MANIFEST = "manifest.json"
__all__ = [
    "DEFAULT_THRESHOLD",
    "EXPORT_FORMAT",
    "MANIFEST",
    "ExportManifest",
    "find_export",
    "model_card",
    "package_versions",
    "read_manifest",
    "write_manifest",
]
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


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CARD_TAGS = (
    "archehr",
    "archehr-qa",
    "clinical-nlp",
    "medical",
    "question-answering",
    "evidence-attribution",
    "qlora",
    "lora",
    "qwen3",
)
# The fine-tuned systems' rows in a ``score.py cv`` run's ladder.json (evaluation.cv writes them):
# (subtask key, system, task type, task name, metrics kept).
CV_ROWS = (
    (
        "subtask2",
        "head",
        "text-classification",
        "ArchEHR-QA Subtask 2: evidence identification (relevance head)",
        ("strict_micro_f1", "strict_micro_precision", "strict_micro_recall", "lenient_micro_f1"),
    ),
    (
        "subtask3",
        "model",
        "text-generation",
        "ArchEHR-QA Subtask 3: answer generation",
        ("bleu", "rouge1", "rouge2", "rougeL", "sari", "bertscore", "alignscore", "medcon"),
    ),
    (
        "subtask4",
        "head",
        "text-classification",
        "ArchEHR-QA Subtask 4: evidence alignment (alignment head)",
        ("micro_f1", "micro_precision", "micro_recall", "macro_f1"),
    ),
)


def read_cv_ladder(cv_dir: str | Path) -> dict[str, Any]:
    """``ladder.json`` of a ``score.py cv`` run folder (or the file itself); InputError when absent."""
    p = Path(cv_dir)
    path = p / "ladder.json" if p.is_dir() else p
    try:
        ladder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InputError("not a score.py cv run (no readable ladder.json)", path) from None
    if not isinstance(ladder, dict) or not isinstance(ladder.get("subtask4", []), list):
        raise InputError("ladder.json is not a score.py cv ladder", path)
    return dict(ladder, source=str(path))


def cv_model_index(ladder: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Hub ``model-index`` entries: the fine-tuned systems' held-out scores in a cv ladder."""
    folds = f"{ladder.get('n_folds')}-fold case-grouped CV"
    key = Path(str(ladder.get("key") or "the key")).name
    held_out = str(ladder.get("evaluated_on", "held-out cases")) == "held-out cases"
    dataset = {
        "type": "archehr-qa",
        "name": "ArchEHR-QA",
        "split": f"held-out folds of {key}" if held_out else f"TRAINING CASES of {key} (optimistic)",
    }
    results = []
    for subtask, system, task_type, task_name, keep in CV_ROWS:
        block = ladder.get(subtask)
        rows = block.get("rows", []) if isinstance(block, dict) else (block or [])
        row = next((r for r in rows if isinstance(r, dict) and r.get("system") == system), None)
        scores = (row or {}).get("scores") or {}
        metrics = [
            {"type": k, "value": scores[k], "name": f"{k} ({folds})"}
            for k in keep
            if isinstance(scores.get(k), (int, float)) and not isinstance(scores.get(k), bool)
        ]
        if metrics:
            results.append({"task": {"type": task_type, "name": task_name}, "dataset": dataset, "metrics": metrics})
    return [{"name": name, "results": results}] if results else []


def _yaml(value: object, indent: int = 0) -> list[str]:
    """Block-style YAML; every scalar JSON-encoded (JSON scalars are valid YAML)."""
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:")
                lines += _yaml(v, indent + 2)
            else:
                lines.append(f"{pad}{k}: {json.dumps(v)}")
        return lines
    if isinstance(value, list):
        lines = []
        for item in value:
            inner = _yaml(item, indent + 2)
            lines.append(f"{pad}- {inner[0].lstrip()}")
            lines += inner[1:]
        return lines
    return [f"{pad}{json.dumps(value)}"]


def card_metadata(
    manifest: dict[str, Any], ladder: dict[str, Any] | None = None, library: str = "peft"
) -> dict[str, Any]:
    """The card's Hub metadata: base model (a hub id only; a local path or random init is left out),
    library, tags and, given a ``score.py cv`` ladder, its held-out scores as ``model-index``."""
    base = manifest.get("base_model") or {}
    base_id = base.get("id")
    meta: dict[str, Any] = {}
    if isinstance(base_id, str) and HUB_ID.match(base_id) and not Path(base_id).exists():
        meta["base_model"] = base_id
    meta["library_name"] = library
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(CARD_TAGS) + (["random-init-test-model"] if base.get("random_init") else [])
    if ladder is not None:
        stages = manifest.get("stages") or [{}]
        meta["model-index"] = cv_model_index(ladder, f"archehr-{stages[-1].get('stage', 'export')}")
    return meta


def front_matter(meta: dict[str, Any]) -> str:
    return "---\n" + "\n".join(_yaml(meta)) + "\n---\n"


def model_card(record: ExportManifest, ladder: dict[str, Any] | None = None, merged: bool = False) -> str:
    """``export/README.md``: Hub metadata (YAML front matter), then what the export is, what it was
    trained on, and what it is for. ``ladder``: a ``score.py cv`` run's scores (:func:`read_cv_ladder`)."""
    manifest = record.to_dict()
    lines = _card_intro_lines(manifest, ladder, merged)
    lines += _card_stage_lines(manifest)
    lines += _card_threshold_lines(manifest)
    lines += _card_evaluation_lines(manifest, ladder)
    lines += _card_usage_lines(manifest, merged)
    return "\n".join(lines) + "\n"


def _card_intro_lines(manifest: dict[str, Any], ladder: dict[str, Any] | None, merged: bool) -> list[str]:
    """Front matter, what the export is for, and its base model and LoRA settings."""
    base = manifest.get("base_model") or {}
    if base.get("random_init"):
        base_line = (
            f"randomly initialised `{base.get('preset')}` (seed {base['random_init'].get('seed')}): "
            "a test model, it generates noise"
        )
    else:
        base_line = f"`{base.get('id')}` (preset `{base.get('preset')}`, 4-bit NF4: {base.get('load_in_4bit')})"
    lora = manifest.get("lora") or {}
    return [
        front_matter(card_metadata(manifest, ladder, library="transformers" if merged else "peft")),
        "# archehr export" + (" (merged)" if merged else ""),
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
    ]


def _card_stage_lines(manifest: dict[str, Any]) -> list[str]:
    lines = ["## Training stages"]
    for i, stage in enumerate(manifest.get("stages") or [], 1):
        lines.append(
            f"{i}. `{stage.get('stage')}`{' (joint head)' if stage.get('joint') else ''}: "
            f"{stage.get('examples')} examples, {stage.get('steps')} steps, seed {stage.get('seed')}, "
            f"final loss {stage.get('final_loss')}, finished {stage.get('finished')}"
        )
        for data in stage.get("data") or []:
            lines.append(f"   - data `{Path(str(data.get('path'))).name}` sha256 `{data.get('sha256')}`")
    return lines


def _card_threshold_lines(manifest: dict[str, Any]) -> list[str]:
    alignment = manifest.get("alignment") or {}
    lines = [
        "",
        "## Thresholds",
        f"- alignment probability threshold {alignment.get('threshold')} ({alignment.get('calibrated_on')}; "
        f"pair F1 there {alignment.get('train_pair_f1')}, {alignment.get('n_examples')} examples). "
        "Chosen on training cases: it is not a held-out score.",
    ]
    for key, value in sorted(manifest.items()):
        if key.endswith("_threshold") and value is not None:
            lines.append(f"- {key.replace('_', ' ')}: {value}")
    return lines


def _card_evaluation_lines(manifest: dict[str, Any], ladder: dict[str, Any] | None) -> list[str]:
    """A cv ladder's held-out scores, else the manifest's recorded cv scores, else where to get them."""
    lines = ["", "## Evaluation"]
    cv = manifest.get("cv")
    if ladder is not None:
        lines.append(
            f"Case-grouped cross-validation of this recipe ({ladder.get('n_folds')} folds, "
            f"{ladder.get('n_cases')} cases, {ladder.get('evaluated_on')}), from `{ladder.get('source')}` "
            "(`score.py cv`): each fold's model was trained on the other folds, so these estimate the "
            "recipe on unseen cases, not this export on its own training cases. They are the front "
            "matter's `model-index`."
        )
        for entry in cv_model_index(ladder, "cv"):
            for result in entry["results"]:
                metrics = ", ".join(f"{m['type']} {m['value']}" for m in result["metrics"])
                lines.append(f"- {result['task']['name']}: {metrics}")
    elif cv:
        lines.append("Case-grouped cross-validation (held-out cases):")
        lines += [f"- {name}: {value}" for name, value in sorted(cv.items())]
    else:
        lines.append(
            "No cross-validation scores are recorded with this export; `python score.py cv` "
            "measures them on held-out cases."
        )
    return lines


def _card_usage_lines(manifest: dict[str, Any], merged: bool) -> list[str]:
    """How to serve (merged folder) or load the export, and the package versions it was made with."""
    lines = []
    if merged:
        lines += [
            "",
            "## This folder",
            "The export's LoRA adapter merged into its base model (the base dequantised as trained), bf16: "
            'a standard Hugging Face model folder. `AutoModelForCausalLM.from_pretrained("this/folder")` '
            "loads it, and vLLM or SGLang serve it (Subtask 3 answers). The alignment head is not in it: "
            "`infer.py --export` on the export folder above applies it (Subtasks 2 and 4).",
        ]
    lines += [
        "",
        "## Loading",
        "```python",
        "import sys",
        'sys.path.insert(0, "/path/to/archehr")',
        "from model.loaded_export import load_export",
        'loaded = load_export("path/to/export")',
        "```",
        'The adapter also loads with plain PEFT: `PeftModel.from_pretrained(base_model, "path/to/export")`.',
        "",
        f"Packages: {', '.join(f'{k} {v}' for k, v in (manifest.get('packages') or {}).items() if v)}. "
        f"Created {manifest.get('created')}.",
    ]
    return lines


def refresh_model_card(export_dir: str | Path, ladder: dict[str, Any] | None) -> Path:
    """Rewrite an export's README.md from its manifest (and a cv ladder's scores); returns its path."""
    from plumbing.atomic import write_text_atomic

    root = find_export(export_dir)
    write_text_atomic(root / "README.md", model_card(read_manifest(root), ladder))
    return root / "README.md"
