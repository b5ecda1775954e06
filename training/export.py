"""Write ``RUN/export/``: what inference (and anyone with PEFT) needs.

* ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT ``save_pretrained``;
  loads with plain ``PeftModel.from_pretrained(base, RUN/export)``);
* ``head.safetensors`` + ``head_config.json`` (the alignment head);
* ``manifest.json``: base model (hub id or path, or the random preset's seed and
  shape), preset, LoRA settings, stage history (domain then task), sha256 of every
  training data file, the ArchEHR case ids each stage trained on (``training_case_ids``),
  the alignment threshold calibrated on the training cases,
  package versions and the creation date.

The folder is assembled under a temporary name and renamed, so an interrupted export
never looks complete.
"""
from __future__ import annotations

import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from heads.alignment import HEAD_CONFIG, HEAD_WEIGHTS, NotePairHead, save_head
from model.backbone import RANDOM_INIT_SEED, is_quantised, is_random_preset, resolve_preset
from model.calibration import calibrate_threshold
from model.export_folder import DEFAULT_THRESHOLD, EXPORT_FORMAT, model_card, package_versions, write_manifest
from model.head_scoring import pair_probabilities, relevance_probabilities

from .config import TrainConfig
from .data import TrainItem, file_sha256, task_file_records
from .gather import save_adapter

def base_model_record(cfg: TrainConfig, init_manifest: dict | None, backbone) -> dict:
    preset = resolve_preset(cfg.preset)
    inherited = (init_manifest or {}).get("base_model", {})
    path = cfg.base_path or inherited.get("path") or None
    record = {
        "preset": preset.name,
        "id": path or preset.source,  # hub id or local path; None = random init below
        "path": path,
        "load_in_4bit": is_quantised(backbone),
        "random_init": None,
    }
    if record["id"] is None and is_random_preset(preset):
        record["random_init"] = {"seed": RANDOM_INIT_SEED, "arch": dict(preset.arch)}
    return record


def calibrate(backbone, head: NotePairHead, items: Sequence[TrainItem], max_examples: int) -> dict | None:
    """Best-F1 probability threshold over the training examples with gold pairs (None if none)."""
    cited = [it.encoded for it in items if it.encoded.pairs and it.encoded.answer_spans][:max_examples]
    if not cited:
        return None
    # One example per forward: the training run still holds its optimizer state and activations.
    probs = pair_probabilities(backbone, head, cited, batch_size=1)
    targets = [np.asarray(enc.pair_targets(), dtype=np.float32) for enc in cited]
    threshold, f1 = calibrate_threshold(probs, targets)
    return {"threshold": threshold, "train_pair_f1": round(f1, 4), "calibrated_on": "training cases",
            "n_examples": len(cited)}


def calibrate_relevance(backbone, head: NotePairHead, items: Sequence[TrainItem], max_examples: int) -> dict | None:
    """Subtask 2 threshold: best strict micro F1 (essential sentences) over the labelled training examples."""
    labelled = [it for it in items if it.essential is not None and len(it.essential) == len(it.encoded.note_spans)]
    labelled = labelled[:max_examples]
    if not labelled:
        return None
    probs = relevance_probabilities(backbone, head, [it.encoded for it in labelled])
    if probs is None:
        return None
    threshold, f1 = calibrate_threshold(probs, [np.asarray(it.essential, dtype=np.float32) for it in labelled])
    return {"threshold": threshold, "train_strict_micro_f1": round(f1, 4), "calibrated_on": "training cases",
            "calibrated_for": "strict micro F1 (essential sentences)", "n_examples": len(labelled)}


def export_run(
    run_dir: str | Path,
    backbone,
    head: NotePairHead,
    tokenizer,
    cfg: TrainConfig,
    items: Sequence[TrainItem],
    sources: Sequence[str],
    init_export: Path | None,
    init_manifest: dict | None,
    steps: int,
    final_loss: float | None,
    adapter_state: dict | None = None,
    calibrate_alignment: bool = True,
) -> Path:
    """``adapter_state``: the full LoRA weights when the live backbone is sharded (FSDP,
    training.gather); sharded, it cannot run the calibration forward on one process, so
    ``calibrate_alignment`` False keeps the inherited/default threshold (said on stderr)."""
    run = Path(run_dir)
    final = run / "export"
    tmp = run / ".export.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if adapter_state is not None:
        save_adapter(backbone, tmp, adapter_state)
    else:
        backbone.save_pretrained(str(tmp))
    save_head(head, tmp)

    calibrating = cfg.joint and calibrate_alignment
    alignment = calibrate(backbone, head, items, cfg.calibration_max_examples) if calibrating else None
    if alignment is None:
        inherited = (init_manifest or {}).get("alignment")
        alignment = dict(inherited, calibrated_on="inherited") if inherited else {
            "threshold": DEFAULT_THRESHOLD, "train_pair_f1": None, "calibrated_on": "default", "n_examples": 0}
        if cfg.joint and not calibrate_alignment:
            alignment["not_calibrated"] = "sharded (FSDP) run: calibrate after loading the export"
            print(f"note: alignment threshold not calibrated (FSDP run); using {alignment['calibrated_on']} "
                  f"threshold {alignment['threshold']}", file=sys.stderr)
    relevance = calibrate_relevance(backbone, head, items, cfg.calibration_max_examples) if calibrating else None
    if relevance is None and (init_manifest or {}).get("relevance"):
        relevance = dict(init_manifest["relevance"], calibrated_on="inherited")
    if cfg.stage == "task":  # each annotated file with the case ids it contributed
        data_files = task_file_records(cfg)
    else:
        data_files = [{"path": str(s), "sha256": file_sha256(s)} for s in sources]
    stage = {
        "stage": cfg.stage,
        "joint": cfg.joint,
        "head_trained": cfg.joint,
        "init": str(init_export) if init_export is not None else None,
        "data": data_files,
        "examples": len(items),
        # ArchEHR cases this stage trained on (the domain stage trains on emrQA: none), so that
        # scoring an export on its own training cases can be refused (metrics/training_cases.py).
        "case_ids": sorted({it.encoded.example_id for it in items}) if cfg.stage == "task" else [],
        "steps": steps,
        "final_loss": final_loss,
        "seed": cfg.seed,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
    }
    history = list((init_manifest or {}).get("stages", [])) + [stage]
    peft_cfg = backbone.peft_config["default"]
    manifest = {
        "format": EXPORT_FORMAT,
        "preset": cfg.preset,
        "base_model": base_model_record(cfg, init_manifest, backbone),
        "lora": {"r": peft_cfg.r, "alpha": peft_cfg.lora_alpha, "dropout": peft_cfg.lora_dropout,
                 "targets": sorted(peft_cfg.target_modules)},
        "head": {"weights": HEAD_WEIGHTS, "config": HEAD_CONFIG, **head.config.to_dict()},
        "alignment": alignment,
        "relevance": relevance,  # Subtask 2 threshold (None: no relevance output or no labelled case)
        "stages": history,
        "training_data": [d for s in history for d in s["data"]],
        # None = unknown: an inherited task stage from before the record existed.
        "training_case_ids": None if any(s.get("stage") == "task" and "case_ids" not in s for s in history)
        else sorted({c for s in history for c in s.get("case_ids", [])}),
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "packages": package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_manifest(tmp, manifest)
    # Replaces the blank template PEFT's save_pretrained leaves there.
    (tmp / "README.md").write_text(model_card(manifest), encoding="utf-8")
    from plumbing.atomic import fsync_tree

    fsync_tree(tmp)  # on disk before the rename
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
