"""The joint head's rung: train the task stage on a fold's training cases, predict held-out ones.

The fold's training cases are written as ``train.xml`` + ``train_key.json`` in the
fold folder and :func:`training.run.run_training` reads exactly those (its manifest
records their sha256, which is checked). The pair threshold is the one the export
calibrated on those training cases; the relevance threshold (Subtask 2) is calibrated
here on the same training cases. Held-out cases reach the model blinded (no key).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from baselines.extractive import answer_or_extractive
from baselines.linking import link_pairs, links_to_pairs
from baselines.relevance import fit_threshold
from plumbing.errors import InputError
from data.records import Case
from training.config import TrainConfig, build_config, canonical_key, coerce

from .folds import write_case_files
from .systems import Prediction

TRAIN_XML = "train.xml"
TRAIN_KEY = "train_key.json"
RUN_DIR = "run"
# The fold loop decides these; a --set of them would break the train/held-out split.
CV_CONTROLLED = ("stage", "xml", "key", "out", "joint", "init", "preset", "seed")


def parse_settings(pairs: Sequence[str]) -> dict:
    """``key=value`` strings (``--set``) as typed training-config overrides."""
    out = {}
    for item in pairs:
        name, sep, value = item.partition("=")
        name = canonical_key(name.strip())
        if not sep or not name:
            raise InputError(f"--set expects key=value, got {item!r}")
        if name in CV_CONTROLLED:
            raise InputError(f"--set {name}=... is decided by the cross-validation itself")
        out[name] = coerce(name, value.strip())
    return out


def fold_config(
    fold_dir: Path,
    *,
    preset: str,
    init: str | None,
    seed: int,
    settings: dict,
    config_file: str | Path | None,
    progress: bool,
) -> TrainConfig:
    overrides = {"progress": progress, **settings}
    overrides.update(
        stage="task",
        joint=True,
        preset=preset,
        init=str(init or ""),
        seed=seed,
        xml=str(fold_dir / TRAIN_XML),
        key=str(fold_dir / TRAIN_KEY),
        out=str(fold_dir / RUN_DIR),
    )
    return build_config(overrides, config_file)


@dataclass
class HeadFold:
    run_dir: Path
    export_dir: Path
    threshold: float
    calibration: dict  # the manifest's "alignment" record
    chosen_on: list[str]  # case ids of the files the run trained and calibrated on
    relevance_threshold: float | None
    relevance_chosen_on: list[str]
    predictions: dict[str, Prediction] = field(default_factory=dict)
    relevance: dict[str, np.ndarray] = field(default_factory=dict)  # case_id -> [n_note] probabilities
    answers: dict[str, str] = field(default_factory=dict)
    extractive_fallback: list[str] = field(default_factory=list)
    steps: int = 0

    def summary(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "export_dir": str(self.export_dir),
            "steps": self.steps,
            "threshold": self.threshold,
            "mode": "absolute",
            "calibration": self.calibration,
            "chosen_on": self.chosen_on,
            "relevance_threshold": self.relevance_threshold,
            "relevance_chosen_on": self.relevance_chosen_on,
            "relevance_calibrated_for": "strict micro F1 (essential) on the training cases",
            "extractive_fallback_cases": self.extractive_fallback,
        }


def _relevance_probabilities(ck, case: Case) -> np.ndarray | None:
    """The head's per-note relevance probabilities (None if the head has no relevance output)."""
    from data.prompts import encode_example, example_from_case
    from model.head_scoring import relevance_probabilities

    enc = encode_example(ck.tokenizer, example_from_case(case, with_answer=True))
    probs = relevance_probabilities(ck.model, ck.head, [enc])
    return None if probs is None else probs[0]


def _files_trained_on(export_dir: Path) -> list[dict]:
    from model.export_folder import read_manifest

    return read_manifest(export_dir).stages[-1].data


def run_head_fold(
    fold_dir: Path,
    train: Sequence[Case],
    held_out: Sequence[Case],
    *,
    preset: str,
    init: str | None,
    seed: int,
    settings: dict,
    config_file: str | Path | None,
    max_new_tokens: int,
    device: str | None,
    progress: bool,
    generate: bool = True,
) -> HeadFold:
    """Train on ``train`` (keyed cases), predict the blinded ``held_out`` cases."""
    from model.loaded_export import load_export
    from training.data import file_sha256
    from training.run import run_training

    fold_dir.mkdir(parents=True, exist_ok=True)
    write_case_files(train, fold_dir / TRAIN_XML, fold_dir / TRAIN_KEY)
    cfg = fold_config(
        fold_dir, preset=preset, init=init, seed=seed, settings=settings, config_file=config_file, progress=progress
    )
    result = run_training(cfg)
    if result.export_dir is None:
        raise RuntimeError(f"fold training in {fold_dir} stopped before exporting")
    export_dir = Path(result.export_dir)
    del result  # the live training objects; the export is what gets evaluated
    gc.collect()

    # The run must have read exactly this fold's training files.
    recorded = {Path(d["path"]).name: d["sha256"] for d in _files_trained_on(export_dir)}
    for name in (TRAIN_XML, TRAIN_KEY):
        if recorded.get(name) != file_sha256(fold_dir / name):
            raise AssertionError(f"{export_dir}: the run did not train on this fold's {name}")
    train_ids = [c.case_id for c in train]

    ck = load_export(export_dir, device=device)
    calibration = ck.manifest.alignment.to_dict() if ck.manifest.alignment is not None else {}
    out = HeadFold(
        fold_dir / RUN_DIR,
        export_dir,
        float(ck.threshold),
        calibration,
        train_ids if calibration.get("calibrated_on") == "training cases" else [],
        None,
        [],
        steps=ck.manifest.stages[-1].steps,
    )

    train_rel = [_relevance_probabilities(ck, c) for c in train]
    if all(p is not None for p in train_rel) and any(c.relevance for c in train):
        threshold, _ = fit_threshold(train, train_rel)  # strict (essential) micro F1, as for the baseline
        out.relevance_threshold, out.relevance_chosen_on = threshold, train_ids

    for case, probs in zip(held_out, ck.score_all(list(held_out))):
        scores = np.asarray(probs, dtype=np.float64)
        links = link_pairs(scores, out.threshold, "absolute")
        out.predictions[case.case_id] = Prediction(scores, links_to_pairs(case.answer_ids, case.note_ids, links))
        rel = _relevance_probabilities(ck, case) if out.relevance_threshold is not None else None
        if rel is not None:
            out.relevance[case.case_id] = rel
    if generate:
        raw = ck.generate_answers(list(held_out), max_new_tokens=max_new_tokens)
        for case, text in zip(held_out, raw):  # what infer.py submits, so the score is of a real submission
            out.answers[case.case_id], replaced = answer_or_extractive(case, text)
            if replaced:
                out.extractive_fallback.append(case.case_id)
    del ck
    gc.collect()
    return out
