"""The rule for scores on training cases: refused unless asked for, and then labelled.

An export's ``manifest.json`` lists the ArchEHR case ids each stage trained on
(``training_case_ids``); ``infer.py`` copies them into ``run.json``. Scoring an export on
any of those cases gives optimistic numbers: ``infer.py --key`` and ``score.py`` refuse
it unless ``--allow-train-cases`` is given, and then every printed and stored score
carries :data:`TRAINING_CASES_LABEL` (the wording ``score.py cv`` uses).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from plumbing.errors import InputError
from model.export_folder import find_export, read_manifest
from model.manifest import ExportManifest, is_kind

TRAINING_CASES_LABEL = "TRAINING CASES — optimistic"
RUN_RECORD = "run.json"


class TrainingCaseLeak(InputError):
    """A request (or a bug) would score a system on cases it trained or was tuned on."""


def manifest_training_case_ids(manifest: ExportManifest | None) -> list[str] | None:
    """Case ids the export trained on; None when the manifest predates the record."""
    return None if manifest is None else manifest.training_case_ids


def export_training_case_ids(export_dir: str | Path) -> list[str] | None:
    """Read an export's training case ids without loading the model (None when unknown)."""
    try:
        export = find_export(export_dir)
    except (InputError, OSError):
        return None  # the loader reports a missing export with its own message
    # A present but tampered manifest is refused here: unknown ids must never skip the refusal.
    return manifest_training_case_ids(read_manifest(export))


def run_record_beside(submission: str | Path) -> Path | None:
    """``run.json`` of the infer.py output folder holding ``submission`` (DIR/subtaskN.zip or
    DIR/subtaskN/submission.json), or None."""
    path = Path(submission).resolve()
    for folder in (path.parent, path.parent.parent):
        if (folder / RUN_RECORD).is_file():
            return folder / RUN_RECORD
    return None


def run_record_training_case_ids(run_json: Path) -> list[str] | None:
    try:
        record = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError("run.json beside the submission is not valid JSON", run_json) from None
    if not isinstance(record, dict):
        return None
    if "training_case_ids" in record:
        ids = record["training_case_ids"]
        if ids is not None and not is_kind(ids, "str_list"):
            raise InputError("field 'training_case_ids' must be a list of strings", run_json)
        return ids
    # "checkpoint_manifest": the name in run.json files written before the export rename.
    manifest = record.get("export_manifest") or record.get("checkpoint_manifest")
    return None if not manifest else manifest_training_case_ids(ExportManifest.from_dict(manifest, run_json))


def check_training_cases(
    scored: Iterable[str], trained: Iterable[str] | None, allow: bool, source: str | Path | None
) -> list[str]:
    """Scored cases that are training cases (sorted); refused unless ``allow``."""
    shared = sorted(set(scored) & set(trained or ()))
    if shared and not allow:
        raise TrainingCaseLeak(
            f"{len(shared)} of the scored cases are training cases of this export (this one among them); "
            "refused (pass --allow-train-cases to get optimistic, labelled numbers)",
            source,
            shared[0],
        )
    return shared
