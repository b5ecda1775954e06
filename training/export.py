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
from plumbing.timing import StepClock
from model.backbone import RANDOM_INIT_SEED, is_quantised, is_random_preset, resolve_preset
from model.calibration import calibrate_threshold
from model.export_folder import DEFAULT_THRESHOLD, EXPORT_FORMAT, model_card, package_versions, write_manifest
from model.manifest import BaseModel, Calibration, ExportManifest, Lora, RandomInit, Stage, portable_tokenizer_name

from .config import TrainConfig
from .data import TrainItem, file_sha256, task_file_records
from .gather import save_adapter


def base_model_record(cfg: TrainConfig, init_manifest: ExportManifest | None, backbone) -> BaseModel:
    preset = resolve_preset(cfg.preset)
    path = cfg.base or (init_manifest.base_model.path if init_manifest else None) or None
    source = path or preset.source  # hub id or local path; None = random init
    random_init = (
        RandomInit(RANDOM_INIT_SEED, dict(preset.arch)) if source is None and is_random_preset(preset) else None
    )
    return BaseModel(
        preset=preset.name, id=source, path=path, load_in_4bit=is_quantised(backbone), random_init=random_init
    )


# Real tokens per calibration forward: packed (no padding), no gradients, no activations kept
# beyond one layer's, so a forward costs less than one training micro-batch's of as many tokens.
CALIBRATION_BATCH_TOKENS = 16384
MERGED_FORWARD = "merged weights"  # the calibration record's "forward": what infer.py's merged load computes
LORA_FORWARD = "LoRA modules"


def calibration_working_bytes(backbone) -> int:
    """A calibration forward's working set beside the weights: one pack's widest activations
    (attention and MLP projections, bf16) with room for workspaces and the allocator."""
    from model.backbone import decoder
    from model.locate import MARGIN_BYTES

    cfg = decoder(backbone).config
    per_token = 8 * cfg.hidden_size + 3 * cfg.intermediate_size
    return CALIBRATION_BATCH_TOKENS * per_token * 2 + MARGIN_BYTES


@torch.no_grad()
def calibration_outputs(backbone, head: NotePairHead, encoded: Sequence, merged: bool = True) -> tuple[list, str]:
    """(the head's outputs, pair and relevance logits, for every example; the forward they came
    from). Packed forwards of several examples in eval mode
    (:func:`model.head_scoring.packed_head_outputs`, the fast engine's) through the backbone's
    dense merged view (:mod:`model.merged_view`: what ``infer.py`` merges, and about twice as
    fast as the NF4 + LoRA modules on an H200) where it fits in memory, else through the
    modules themselves (said on stderr; ``merged`` False asks for them: the bench's baseline).
    It calls the decoder layers' parts, not their compiled forwards, so a no-grad forward
    compiles no second set of graphs."""
    from model.head_scoring import eval_mode, packed_head_outputs
    from model.merged_view import merged_view_within_memory
    from model.packed import packed_attention, token_budget_packs

    out: list = [None] * len(encoded)
    with eval_mode(backbone, head):  # before the view: its layers copy the modes they see
        view, why_not = (
            merged_view_within_memory(backbone, calibration_working_bytes(backbone)) if merged else (None, "asked")
        )
        forward = MERGED_FORWARD if view is not None else f"{LORA_FORWARD} ({why_not})"
        if view is None and merged:
            print(f"note: calibrating through the LoRA modules, not merged weights: {why_not}", file=sys.stderr)
        model = view if view is not None else backbone
        attention, _ = packed_attention(model)
        for group in token_budget_packs([len(enc.input_ids) for enc in encoded], CALIBRATION_BATCH_TOKENS):
            outputs = packed_head_outputs(model, head, [encoded[i] for i in group], attention)
            for i, o in zip(group, outputs):
                out[i] = o
    return out, forward


def cited_examples(items: Sequence[TrainItem], max_examples: int) -> list:
    return [it.encoded for it in items if it.encoded.pairs and it.encoded.answer_spans][:max_examples]


def relevance_examples(items: Sequence[TrainItem], max_examples: int) -> list[TrainItem]:
    labelled = [it for it in items if it.essential is not None and len(it.essential) == len(it.encoded.note_spans)]
    return labelled[:max_examples]


def calibrate(head_outputs: dict, items: Sequence[TrainItem], max_examples: int, forward: str) -> dict | None:
    """Best-F1 probability threshold over the training examples with gold pairs (None if none);
    ``forward`` (which weights the outputs came from) is recorded beside it."""
    cited = cited_examples(items, max_examples)
    if not cited:
        return None
    probs = [torch.sigmoid(head_outputs[id(enc)].pair_logits.float()).cpu().numpy() for enc in cited]
    targets = [np.asarray(enc.pair_targets(), dtype=np.float32) for enc in cited]
    threshold, f1 = calibrate_threshold(probs, targets)
    return {
        "threshold": threshold,
        "train_pair_f1": round(f1, 4),
        "calibrated_on": "training cases",
        "forward": forward,
        "n_examples": len(cited),
    }


def calibrate_relevance(head_outputs: dict, items: Sequence[TrainItem], max_examples: int, forward: str) -> dict | None:
    """Subtask 2 threshold: best strict micro F1 (essential sentences) over the labelled training examples."""
    labelled = relevance_examples(items, max_examples)
    if not labelled or any(head_outputs[id(it.encoded)].relevance_logits is None for it in labelled):
        return None
    probs = [torch.sigmoid(head_outputs[id(it.encoded)].relevance_logits.float()).cpu().numpy() for it in labelled]
    threshold, f1 = calibrate_threshold(probs, [np.asarray(it.essential, dtype=np.float32) for it in labelled])
    return {
        "threshold": threshold,
        "train_strict_micro_f1": round(f1, 4),
        "calibrated_on": "training cases",
        "calibrated_for": "strict micro F1 (essential sentences)",
        "forward": forward,
        "n_examples": len(labelled),
    }


def calibrated_thresholds(
    backbone, head: NotePairHead, items: Sequence[TrainItem], max_examples: int, merged: bool = True
) -> tuple[dict | None, dict | None]:
    """The alignment and Subtask 2 thresholds calibrated on the training examples: one set of
    forwards serves both (None where no example has what a threshold needs); ``merged`` as
    :func:`calibration_outputs` takes it."""
    wanted = {id(enc): enc for enc in cited_examples(items, max_examples)}
    wanted.update({id(it.encoded): it.encoded for it in relevance_examples(items, max_examples)})
    if not wanted:
        return None, None
    found, forward = calibration_outputs(backbone, head, list(wanted.values()), merged)
    outputs = dict(zip(wanted, found))
    return calibrate(outputs, items, max_examples, forward), calibrate_relevance(outputs, items, max_examples, forward)


def alignment_record(
    cfg: TrainConfig, calibrated: dict | None, init_manifest: ExportManifest | None, calibrate_alignment: bool
) -> Calibration:
    """The Subtask 4 threshold: calibrated here, else inherited from --init, else the default."""
    if calibrated is not None:
        return Calibration.from_dict(calibrated)
    inherited = init_manifest.alignment if init_manifest is not None else None
    record = (
        dict(inherited.to_dict(), calibrated_on="inherited")
        if inherited
        else {"threshold": DEFAULT_THRESHOLD, "train_pair_f1": None, "calibrated_on": "default", "n_examples": 0}
    )
    if cfg.joint and not calibrate_alignment:
        record["not_calibrated"] = "sharded (FSDP) run: calibrate after loading the export"
        print(
            f"note: alignment threshold not calibrated (FSDP run); using {record['calibrated_on']} "
            f"threshold {record['threshold']}",
            file=sys.stderr,
        )
    return Calibration.from_dict(record)


def relevance_record(calibrated: dict | None, init_manifest: ExportManifest | None) -> Calibration | None:
    """The Subtask 2 threshold (None: no relevance output or no labelled case), else inherited."""
    if calibrated is not None:
        return Calibration.from_dict(calibrated)
    inherited = init_manifest.relevance if init_manifest is not None else None
    return Calibration.from_dict(dict(inherited.to_dict(), calibrated_on="inherited")) if inherited else None


def stage_record(
    cfg: TrainConfig,
    items: Sequence[TrainItem],
    sources: Sequence[str],
    init_export: Path | None,
    steps: int,
    final_loss: float | None,
) -> Stage:
    if cfg.stage == "task":  # each annotated file with the case ids it contributed
        data_files = task_file_records(cfg)
    else:
        data_files = [{"path": str(s), "sha256": file_sha256(s)} for s in sources]
    details = {
        "head_trained": cfg.joint,
        "init": str(init_export) if init_export is not None else None,
        "examples": len(items),
        "final_loss": final_loss,
        "seed": cfg.seed,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
    }
    # ArchEHR cases this stage trained on (the domain stage trains on emrQA: none), so that
    # scoring an export on its own training cases can be refused (metrics/training_cases.py).
    case_ids = sorted({it.encoded.example_id for it in items}) if cfg.stage == "task" else []
    return Stage(stage=cfg.stage, joint=cfg.joint, steps=steps, data=data_files, case_ids=case_ids, details=details)


def build_manifest(
    cfg: TrainConfig,
    backbone,
    head: NotePairHead,
    tokenizer,
    history: list[Stage],
    init_manifest: ExportManifest | None,
    alignment: Calibration,
    relevance: Calibration | None,
) -> ExportManifest:
    peft_cfg = backbone.peft_config["default"]
    # None = unknown: an inherited task stage from before the record existed.
    unknown = any(s.stage == "task" and s.case_ids is None for s in history)
    return ExportManifest(
        format=EXPORT_FORMAT,
        preset=cfg.preset,
        base_model=base_model_record(cfg, init_manifest, backbone),
        lora=Lora(
            r=peft_cfg.r,
            alpha=peft_cfg.lora_alpha,
            dropout=peft_cfg.lora_dropout,
            targets=sorted(peft_cfg.target_modules),
        ),
        head={"weights": HEAD_WEIGHTS, "config": HEAD_CONFIG, **head.config.to_dict()},
        alignment=alignment,
        relevance=relevance,
        stages=history,
        training_data=[d for s in history for d in s.data],
        training_case_ids=None if unknown else sorted({c for s in history for c in s.case_ids or []}),
        # Portable: a hub id, the packaged tokenizer's marker or a folder's name, never a local path.
        tokenizer=portable_tokenizer_name(getattr(tokenizer, "name_or_path", None)),
        packages=package_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _steps_line(steps: dict[str, float]) -> str:
    """The export's steps for its stderr line: "4.1 s (adapter 0.3 s, ...)"."""
    parts = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in steps.items())
    return f"{sum(steps.values()):.1f} s ({parts})"


def export_run(
    run_dir: str | Path,
    backbone,
    head: NotePairHead,
    tokenizer,
    cfg: TrainConfig,
    items: Sequence[TrainItem],
    sources: Sequence[str],
    init_export: Path | None,
    init_manifest: ExportManifest | None,
    steps: int,
    final_loss: float | None,
    adapter_state: dict | None = None,
    calibrate_alignment: bool = True,
    timings: dict | None = None,
) -> Path:
    """``adapter_state``: the full LoRA weights when the live backbone is sharded (FSDP,
    training.gather); sharded, it cannot run the calibration forward on one process, so
    ``calibrate_alignment`` False keeps the inherited/default threshold (said on stderr).
    Each step's seconds go to ``timings`` (and one stderr line)."""
    took: dict[str, float] = timings if timings is not None else {}
    clock = StepClock(took)  # the fixed cost users wait for after training
    run = Path(run_dir)
    final = run / "export"
    tmp = run / ".export.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if adapter_state is not None:
        save_adapter(backbone, tmp, adapter_state)
    else:
        backbone.save_pretrained(str(tmp))
    clock("adapter_s")
    save_head(head, tmp)
    clock("head_s")

    calibrating = cfg.joint and calibrate_alignment
    if calibrating:
        from model.packed import layer_ops

        layer_ops(backbone)  # the fused kernels' probe (their compile, once per machine) timed apart
        clock("kernels_s")
    pair_t, relevance_t = (
        calibrated_thresholds(backbone, head, items, cfg.calibration_max_examples) if calibrating else (None, None)
    )
    clock("calibration_s")
    alignment = alignment_record(cfg, pair_t, init_manifest, calibrate_alignment)
    relevance = relevance_record(relevance_t, init_manifest)
    history = list(init_manifest.stages if init_manifest is not None else []) + [
        stage_record(cfg, items, sources, init_export, steps, final_loss)
    ]
    manifest = build_manifest(cfg, backbone, head, tokenizer, history, init_manifest, alignment, relevance)
    write_manifest(tmp, manifest)
    # Replaces the blank template PEFT's save_pretrained leaves there.
    (tmp / "README.md").write_text(model_card(manifest), encoding="utf-8")
    clock("manifest_s")
    from plumbing.atomic import fsync_tree

    fsync_tree(tmp)  # on disk before the rename
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    clock("fsync_s")
    print(f"export: {_steps_line(took)}", file=sys.stderr)
    return final
