"""Range and type rules for every TrainConfig field, as data.

Each field of :class:`training.config.TrainConfig` has one :class:`Rule` here (a test
and the words for what it expects); :func:`check_config` applies them all and raises
one :class:`InputError` (exit 2, one line) for the first field that breaks its rule,
before anything is loaded or written. Rules that relate two fields (``batch_tokens``
vs ``max_length``, ``head_layer`` vs the preset's depth) follow the table.
An export's manifest is checked by :mod:`model.export_checks`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from plumbing.atomic import check_out_folder
from data.emrqa import UNANSWERABLE_RULES
from plumbing.errors import InputError


@dataclass(frozen=True)
class Rule:
    test: Callable[[Any], bool]
    expect: str  # completes "--name must be ..."


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def finite(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def test(x: Any) -> bool:
        if not _num(x):
            return False
        if lo is not None and (x <= lo if lo_open else x < lo):
            return False
        if hi is not None and (x >= hi if hi_open else x > hi):
            return False
        return True

    left = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
    right = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
    words = " and ".join(w for w in (left, right) if w)
    return Rule(test, f"a finite number{' ' + words if words else ''}")


def integer(lo: int) -> Rule:
    return Rule(lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= lo, f"an integer >= {lo}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda x: x in choices, "one of " + ", ".join(choices))


def _preset_names() -> tuple[str, ...]:
    from model.presets import PRESETS

    return tuple(sorted(PRESETS))


def preset_rule() -> Rule:
    names = _preset_names()
    return Rule(lambda x: x in names, "one of " + ", ".join(names))


ANY_TEXT = Rule(lambda x: isinstance(x, str), "text")
BOOL = Rule(lambda x: isinstance(x, bool), "true or false")

RULES: dict[str, Rule] = {
    "stage": one_of("domain", "task"),
    "preset": preset_rule(),
    "out": ANY_TEXT,
    "data": ANY_TEXT,
    "n_examples": integer(0),
    "unanswerable": one_of(*UNANSWERABLE_RULES),
    "xml": ANY_TEXT,
    "key": ANY_TEXT,
    "init": ANY_TEXT,
    "base_path": ANY_TEXT,
    "load_in_4bit": one_of("auto", "true", "false"),
    "quant_storage": one_of("uint8", "bfloat16", "float16", "float32"),
    "joint": BOOL,
    "seed": integer(0),
    "epochs": integer(1),
    "max_steps": integer(0),
    "batch_size": integer(1),
    "grad_accum": integer(1),
    "lr": finite(0, lo_open=True),
    "head_lr": finite(0, lo_open=True),
    "weight_decay": finite(0),
    "warmup_ratio": finite(0, 1),
    "schedule": one_of("cosine", "linear", "constant"),
    "max_grad_norm": finite(0),
    "max_length": integer(1),
    "group_by_length": BOOL,
    "batch_tokens": integer(0),
    "bf16": BOOL,
    "compile": BOOL,
    "gradient_checkpointing": BOOL,
    "lora_r": integer(1),
    "lora_alpha": finite(0, lo_open=True),
    "lora_dropout": finite(0, 1, hi_open=True),
    "head_proj_dim": integer(1),
    "head_mlp_dim": integer(1),
    "head_pooling": one_of("mean", "attention"),
    "head_layer": Rule(lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= -1,
                       "-1 (final layer) or a layer number >= 0"),
    "head_relevance": BOOL,
    "head_dropout": finite(0, 1, hi_open=True),
    "align_weight": finite(0),
    "pos_weight": finite(0, lo_open=True),
    "relevance_weight": finite(0),
    "calibration_max_examples": integer(0),
    "log_every": integer(1),
    "save_every": integer(0),
    "keep_checkpoints": integer(0),  # 0 = keep all
    "progress": BOOL,
    "plot": BOOL,
}


def _type_rule(annotation: object) -> Rule:
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(str(annotation), annotation)
    if kind is float:
        return finite()
    if kind is int:
        return Rule(lambda x: isinstance(x, int) and not isinstance(x, bool), "an integer")
    if kind is bool:
        return BOOL
    return ANY_TEXT


def check_config(cfg) -> None:
    """Raise InputError for the first field of ``cfg`` (a TrainConfig) outside its rule."""
    for f in fields(cfg):
        name, value = f.name, getattr(cfg, f.name)
        # A field added without a rule still gets its type checked (tests/test_hostile_inputs.py
        # fails until it has a rule of its own).
        rule = RULES.get(name) or _type_rule(f.type)
        if not rule.test(value):
            raise InputError(f"--{name} must be {rule.expect}, got {value!r}")
    if cfg.batch_tokens and cfg.batch_tokens < cfg.max_length:
        raise InputError(f"--batch_tokens ({cfg.batch_tokens}) must be at least --max_length ({cfg.max_length})")
    layers = preset_layers(cfg.preset)
    if layers is not None and cfg.head_layer > layers:
        raise InputError(f"--head_layer must be -1 or 0..{layers} for preset {cfg.preset!r}, got {cfg.head_layer}")
    if cfg.out:
        check_out_folder(Path(cfg.out), "--out")


def preset_layers(name: str) -> int | None:
    from model.presets import PRESETS

    preset = PRESETS.get(name)
    return preset.arch.get("num_hidden_layers") if preset is not None else None
