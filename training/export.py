"""Write ``RUN/export/``: what inference (and anyone with PEFT) needs.

* ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT ``save_pretrained``;
  loads with plain ``PeftModel.from_pretrained(base, RUN/export)``);
* ``head.safetensors`` + ``head_config.json`` (the alignment head);
* ``manifest.json``: base model (hub id or path, or the random preset's seed and
  shape), preset, LoRA settings, stage history (domain then task), sha256 of every
  training data file, the alignment threshold calibrated on the training cases,
  package versions and the creation date.

The folder is assembled under a temporary name and renamed, so an interrupted export
never looks complete.
"""
from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from heads.alignment import HEAD_CONFIG, HEAD_WEIGHTS, NotePairHead, save_head
from model.backbone import RANDOM_INIT_SEED, is_quantised, is_random_preset, resolve_preset
from model.export_folder import DEFAULT_THRESHOLD, EXPORT_FORMAT, model_card, package_versions, write_manifest
from model.head_scoring import pair_probabilities

from .calibration import calibrate_threshold
from .config import TrainConfig
from .data import TrainItem, file_sha256

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
) -> Path:
    run = Path(run_dir)
    final = run / "export"
    tmp = run / ".export.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    backbone.save_pretrained(str(tmp))
    save_head(head, tmp)

    alignment = calibrate(backbone, head, items, cfg.calibration_max_examples) if cfg.joint else None
    if alignment is None:
        inherited = (init_manifest or {}).get("alignment")
        alignment = dict(inherited, calibrated_on="inherited") if inherited else {
            "threshold": DEFAULT_THRESHOLD, "train_pair_f1": None, "calibrated_on": "default", "n_examples": 0}
    data_files = [{"path": str(s), "sha256": file_sha256(s)} for s in sources]
    stage = {
        "stage": cfg.stage,
        "joint": cfg.joint,
        "head_trained": cfg.joint,
        "init": str(init_export) if init_export is not None else None,
        "data": data_files,
        "examples": len(items),
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
        "stages": history,
        "training_data": [d for s in history for d in s["data"]],
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "packages": package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_manifest(tmp, manifest)
    # Replaces the blank template PEFT's save_pretrained leaves there.
    (tmp / "README.md").write_text(model_card(manifest), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
