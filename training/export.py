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
import torch

from heads.alignment import HEAD_CONFIG, HEAD_WEIGHTS, NotePairHead, save_head
from model.backbone import RANDOM_INIT_SEED, is_quantised, is_random_preset, resolve_preset
from model.calibration import calibrate_threshold
from model.export_folder import DEFAULT_THRESHOLD, EXPORT_FORMAT, model_card, package_versions, write_manifest

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


# Tokens per calibration forward: no gradients and no activations kept, so a group costs
# about what one training micro-batch's forward does (16k tokens fit a 16 GB card in training).
CALIBRATION_BATCH_TOKENS = 8192


def calibration_groups(encoded: Sequence, max_tokens: int = CALIBRATION_BATCH_TOKENS) -> list[list[int]]:
    """Indices of ``encoded`` in length-sorted groups whose padded size stays within ``max_tokens``."""
    from .batching import token_budget_batches

    return token_budget_batches([len(enc.input_ids) for enc in encoded], max_tokens, shuffle=False)


@torch.no_grad()
def calibration_outputs(backbone, head: NotePairHead, encoded: Sequence) -> list:
    """The head's outputs (pair and relevance logits) for every example, in eval mode, from
    token-budget groups of examples. Compiled decoder layers run eagerly here: a no-grad
    forward would otherwise compile a second set of graphs, for a few forwards (issue 21:
    that was most of the 36 s an export took)."""
    from model.head_scoring import group_head_outputs

    device = next(head.parameters()).device
    out: list = [None] * len(encoded)
    was_training = (backbone.training, head.training)
    backbone.eval()
    head.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            for group in calibration_groups(encoded):
                outputs = group_head_outputs(backbone, head, [encoded[i] for i in group], 0, device)
                for i, o in zip(group, outputs):
                    out[i] = o
    finally:
        backbone.train(was_training[0])
        head.train(was_training[1])
    return out


def calibrate(head_outputs: dict, items: Sequence[TrainItem], max_examples: int) -> dict | None:
    """Best-F1 probability threshold over the training examples with gold pairs (None if none)."""
    cited = [it.encoded for it in items if it.encoded.pairs and it.encoded.answer_spans][:max_examples]
    if not cited:
        return None
    probs = [torch.sigmoid(head_outputs[id(enc)].pair_logits.float()).cpu().numpy() for enc in cited]
    targets = [np.asarray(enc.pair_targets(), dtype=np.float32) for enc in cited]
    threshold, f1 = calibrate_threshold(probs, targets)
    return {"threshold": threshold, "train_pair_f1": round(f1, 4), "calibrated_on": "training cases",
            "n_examples": len(cited)}


def relevance_examples(items: Sequence[TrainItem], max_examples: int) -> list[TrainItem]:
    labelled = [it for it in items if it.essential is not None and len(it.essential) == len(it.encoded.note_spans)]
    return labelled[:max_examples]


def calibrate_relevance(head_outputs: dict, items: Sequence[TrainItem], max_examples: int) -> dict | None:
    """Subtask 2 threshold: best strict micro F1 (essential sentences) over the labelled training examples."""
    labelled = relevance_examples(items, max_examples)
    if not labelled or any(head_outputs[id(it.encoded)].relevance_logits is None for it in labelled):
        return None
    probs = [torch.sigmoid(head_outputs[id(it.encoded)].relevance_logits.float()).cpu().numpy() for it in labelled]
    threshold, f1 = calibrate_threshold(probs, [np.asarray(it.essential, dtype=np.float32) for it in labelled])
    return {"threshold": threshold, "train_strict_micro_f1": round(f1, 4), "calibrated_on": "training cases",
            "calibrated_for": "strict micro F1 (essential sentences)", "n_examples": len(labelled)}


def calibrated_thresholds(backbone, head: NotePairHead, cfg: TrainConfig, items: Sequence[TrainItem],
                          init_manifest: dict | None, calibrate_alignment: bool) -> tuple[dict, dict | None]:
    """The alignment and Subtask 2 thresholds: calibrated on the training examples (one set of
    forwards serves both), else inherited from the init export, else the default."""
    calibrating = cfg.joint and calibrate_alignment
    alignment = relevance = None
    if calibrating:
        n = cfg.calibration_max_examples
        cited = [it.encoded for it in items if it.encoded.pairs and it.encoded.answer_spans][:n]
        wanted = {id(enc): enc for enc in cited + [it.encoded for it in relevance_examples(items, n)]}
        encoded = list(wanted.values())
        outputs = dict(zip(wanted, calibration_outputs(backbone, head, encoded))) if encoded else {}
        alignment = calibrate(outputs, items, n)
        relevance = calibrate_relevance(outputs, items, n)
    if alignment is None:
        inherited = (init_manifest or {}).get("alignment")
        alignment = dict(inherited, calibrated_on="inherited") if inherited else {
            "threshold": DEFAULT_THRESHOLD, "train_pair_f1": None, "calibrated_on": "default", "n_examples": 0}
        if cfg.joint and not calibrate_alignment:
            alignment["not_calibrated"] = "sharded (FSDP) run: calibrate after loading the export"
            print(f"note: alignment threshold not calibrated (FSDP run); using {alignment['calibrated_on']} "
                  f"threshold {alignment['threshold']}", file=sys.stderr)
    if relevance is None and (init_manifest or {}).get("relevance"):
        relevance = dict(init_manifest["relevance"], calibrated_on="inherited")
    return alignment, relevance


def write_weights(folder: Path, backbone, head: NotePairHead, adapter_state: dict | None) -> None:
    """The PEFT adapter (gathered weights when sharded) and the head."""
    if adapter_state is not None:
        save_adapter(backbone, folder, adapter_state)
    else:
        backbone.save_pretrained(str(folder))
    save_head(head, folder)


def stage_record(cfg: TrainConfig, items: Sequence[TrainItem], sources: Sequence[str], init_export: Path | None,
                 steps: int, final_loss: float | None) -> dict:
    """This stage's entry in the manifest's stage history."""
    if cfg.stage == "task":  # each annotated file with the case ids it contributed
        data_files = task_file_records(cfg)
    else:
        data_files = [{"path": str(s), "sha256": file_sha256(s)} for s in sources]
    return {
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


def manifest_record(cfg: TrainConfig, backbone, head: NotePairHead, tokenizer, init_manifest: dict | None,
                    stage: dict, alignment: dict, relevance: dict | None) -> dict:
    history = list((init_manifest or {}).get("stages", [])) + [stage]
    peft_cfg = backbone.peft_config["default"]
    return {
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


def publish(tmp: Path, final: Path, manifest: dict) -> None:
    """Manifest and model card into ``tmp``, fsynced, then renamed to ``final`` in one step."""
    write_manifest(tmp, manifest)
    # Replaces the blank template PEFT's save_pretrained leaves there.
    (tmp / "README.md").write_text(model_card(manifest), encoding="utf-8")
    from data.atomic import fsync_tree

    fsync_tree(tmp)  # on disk before the rename
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


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
    write_weights(tmp, backbone, head, adapter_state)
    alignment, relevance = calibrated_thresholds(backbone, head, cfg, items, init_manifest, calibrate_alignment)
    stage = stage_record(cfg, items, sources, init_export, steps, final_loss)
    publish(tmp, final, manifest_record(cfg, backbone, head, tokenizer, init_manifest, stage, alignment, relevance))
    return final
