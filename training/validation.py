"""Range and type rules for every TrainConfig field, as data.

Each field of :class:`training.config.TrainConfig` has one :class:`Rule` here (a test
and the words for what it expects); :func:`check_config` applies them all and raises
one :class:`InputError` (exit 2, one line) for the first field that breaks its rule,
before anything is loaded or written. Rules that relate two fields (``batch_tokens``
vs ``max_length``, ``head_layer`` vs the preset's depth) follow the table.
An export's manifest is checked by :mod:`model.export_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from plumbing.atomic import check_out_folder
from data.emrqa import UNANSWERABLE_RULES
from plumbing.errors import InputError
from plumbing.ranges import SEED, Range, integer, number

from .trackers import TRACKERS, check_tracker_installed


@dataclass(frozen=True)
class Rule:
    test: Callable[[Any], bool]
    expect: str  # completes "--name must be ..."


def ranged(r: Range) -> Rule:
    """A numeric rule from the shared range factory (the words ``--help`` shows, too)."""
    return Rule(r.contains, r.words())


def finite(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    return ranged(number(lo, hi, lo_open=lo_open, hi_open=hi_open))


def integer_rule(lo: int, hi: int, note: str = "") -> Rule:
    return ranged(integer(lo, hi, note))


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

# The longest context of any preset (Qwen3-4B: 40960 positions); a preset's own is checked below.
MAX_CONTEXT = 40_960

RULES: dict[str, Rule] = {
    "stage": one_of("domain", "task"),
    "preset": preset_rule(),
    "out": ANY_TEXT,
    "data": ANY_TEXT,
    "n_examples": integer_rule(0, 10**9, "0 = all"),
    "unanswerable": one_of(*UNANSWERABLE_RULES),
    "xml": ANY_TEXT,
    "key": ANY_TEXT,
    "init": ANY_TEXT,
    "base": ANY_TEXT,
    "load_in_4bit": one_of("auto", "true", "false"),
    "quant_storage": one_of("uint8", "bfloat16", "float16", "float32"),
    "joint": BOOL,
    "seed": ranged(SEED),
    "epochs": integer_rule(1, 10_000),
    "max_steps": integer_rule(0, 10**8, "0 = run the epochs"),
    "batch_size": integer_rule(1, 65_536),
    "grad_accum": integer_rule(1, 65_536),
    "lr": finite(0, 1e3, lo_open=True),
    "head_lr": finite(0, 1e3, lo_open=True),
    "weight_decay": finite(0, 1),
    "warmup_ratio": finite(0, 1),
    "schedule": one_of("cosine", "linear", "constant"),
    "max_grad_norm": finite(0, 1e6),
    "max_length": integer_rule(16, MAX_CONTEXT),
    "group_by_length": BOOL,
    "batch_tokens": integer_rule(0, 2**24, "0 = batch_size rows"),
    "bf16": BOOL,
    "compile": BOOL,
    "gradient_checkpointing": BOOL,
    "lora_r": integer_rule(1, 1024),
    "lora_alpha": finite(0, 65_536, lo_open=True),
    "lora_dropout": finite(0, 1, hi_open=True),
    "head_proj_dim": integer_rule(1, 65_536),
    "head_mlp_dim": integer_rule(1, 65_536),
    "head_pooling": one_of("mean", "attention"),
    "head_layer": integer_rule(-1, 1024, "-1 = final layer"),
    "head_relevance": BOOL,
    "head_dropout": finite(0, 1, hi_open=True),
    "align_weight": finite(0, 1e4),
    "pos_weight": finite(0, 1e4, lo_open=True),
    "relevance_weight": finite(0, 1e4),
    "calibration_max_examples": integer_rule(0, 10**6),
    "log_every": integer_rule(1, 10**8),
    "save_every": integer_rule(0, 10**8, "0 = only the final export"),
    "keep_checkpoints": integer_rule(0, 10_000, "0 = keep all"),
    "progress": BOOL,
    "plot": BOOL,
    "report_to": one_of(*TRACKERS),
}


def _type_rule(annotation: object) -> Rule:
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(str(annotation), annotation)
    if kind is float:
        return finite()
    if kind is int:
        return ranged(integer())
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
    context = preset_arch(cfg.preset).get("max_position_embeddings")
    if context is not None and cfg.max_length > context:
        raise InputError(
            f"--max_length must be at most {context} (the context of preset {cfg.preset!r}), got {cfg.max_length}"
        )
    if cfg.batch_tokens and cfg.batch_tokens < cfg.max_length:
        raise InputError(f"--batch_tokens ({cfg.batch_tokens}) must be at least --max_length ({cfg.max_length})")
    layers = preset_layers(cfg.preset)
    if layers is not None and cfg.head_layer > layers:
        raise InputError(f"--head_layer must be -1 or 0..{layers} for preset {cfg.preset!r}, got {cfg.head_layer}")
    if cfg.out:
        check_out_folder(Path(cfg.out), "--out")
    check_tracker_installed(cfg.report_to)  # a missing package: one line now, not a silent no-op later


def preset_arch(name: str) -> dict:
    from model.presets import PRESETS

    preset = PRESETS.get(name)
    return dict(preset.arch) if preset is not None else {}


def preset_layers(name: str) -> int | None:
    return preset_arch(name).get("num_hidden_layers")


def range_words(name: str) -> str:
    """The allowed values of config key ``name`` as ``train.py --help`` shows them."""
    rule = RULES.get(name)
    return rule.expect if rule is not None else ""
