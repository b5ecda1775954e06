"""Training configuration: dataclass defaults <- TOML preset <- ``--key value`` overrides.

Every field is settable from the command line (``--lr 1e-4``, ``--max-steps 50``,
``--joint`` / ``--joint false``); values are coerced to the field's type and an
unknown key or a bad value is an :class:`InputError` (exit 2). The resolved config
is written into the run folder as ``config.toml`` and ``config.json``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_type_hints

from plumbing.errors import InputError, parse_json, read_text_file
from plumbing.ranges import integer
from heads.config import HeadConfig
from model.presets import LoraSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
STAGES = ("domain", "task")
ANY_INTEGER = integer()  # the field's own range is checked after coercion (training/validation.py)
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


@dataclass
class TrainConfig:
    stage: str = "domain"
    preset: str = "tiny"
    out: str = ""
    # Inputs: domain stage reads `data`; task stage reads `xml` + `key` and starts from `init`.
    data: str = ""
    n_examples: int = 0  # 0 = all records; else a seeded random sample
    unanswerable: str = "abstain"
    xml: str = ""
    key: str = ""
    init: str = ""
    base: str = ""  # local folder or hub id overriding the preset's weights (infer.py's --base too)
    load_in_4bit: str = "auto"  # auto = the preset's default; true / false
    # dtype the packed NF4 weights are stored in: uint8, or bfloat16 to shard them with FSDP
    quant_storage: str = "uint8"
    joint: bool = False
    seed: int = 0
    # Optimisation
    epochs: int = 1
    max_steps: int = 0  # > 0 caps optimizer steps (overrides epochs)
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    max_length: int = 4096
    group_by_length: bool = True
    # > 0: batches filled to this many padded tokens (rows of similar length) instead of
    # `batch_size` rows; far less padding and bigger matmuls (see BENCHMARKS.md).
    batch_tokens: int = 0
    # bf16 autocast and bf16 embeddings/lm_head on CUDA (no PEFT fp32 upcast); CPU stays fp32.
    bf16: bool = True
    # torch.compile each decoder layer on CUDA (BENCHMARKS.md: +60% tokens/s at 2048);
    # the first steps pay the compile time. Off on CPU.
    compile: bool = True
    gradient_checkpointing: bool = True
    # LoRA (defaults: model.presets.LoraSettings, the one place they are written)
    lora_r: int = LoraSettings.r
    lora_alpha: int = LoraSettings.alpha
    lora_dropout: float = LoraSettings.dropout
    # Alignment head (defaults: heads.config.HeadConfig) and joint loss (LossSettings reads these)
    head_proj_dim: int = HeadConfig.proj_dim
    head_mlp_dim: int = HeadConfig.mlp_dim
    head_pooling: str = HeadConfig.pooling
    head_layer: int = HeadConfig.layer
    head_relevance: bool = HeadConfig.relevance
    head_dropout: float = HeadConfig.dropout
    align_weight: float = 1.0
    pos_weight: float = 5.0
    relevance_weight: float = 0.5
    calibration_max_examples: int = 200
    # Logging and checkpoints
    log_every: int = 10
    save_every: int = 0  # 0 = no intermediate checkpoints
    keep_checkpoints: int = 2
    progress: bool = True
    plot: bool = True
    report_to: str = "none"  # none | tensorboard | wandb | mlflow | trackio (training.trackers)

    def validate(self) -> "TrainConfig":
        from .validation import check_config  # the rules, one per field, as data

        check_config(self)
        return self

    def quantise(self) -> bool | None:
        return None if self.load_in_4bit == "auto" else self.load_in_4bit == "true"

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        (out / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        (out / "config.toml").write_text(to_toml(self.to_dict()), encoding="utf-8")


_FIELD_TYPES = get_type_hints(TrainConfig)


def to_toml(values: dict) -> str:
    lines = []
    for k, v in values.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        else:
            lines.append(f"{k} = {toml_string(str(v))}")
    return "\n".join(lines) + "\n"


def toml_string(text: str) -> str:
    """A TOML basic string. Not ``json.dumps``: JSON writes a character beyond the BMP as a
    surrogate pair (``\\ud800\\udc00``), which TOML rejects, and leaves DEL unescaped."""
    escaped = "".join(
        f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else "\\" + ch if ch in '"\\' else ch for ch in text
    )
    return f'"{escaped}"'


# Keys spelt differently once, still read (with a note) so old commands, TOMLs and runs keep working.
RENAMED_KEYS = {"base_path": "base"}


def canonical_key(name: str, note: bool = True) -> str:
    """``name`` (``-`` or ``_``) as the config key it means; a renamed key says its new name on stderr."""
    name = name.replace("-", "_")
    if name in RENAMED_KEYS:
        new = RENAMED_KEYS[name]
        if note:
            print(f"note: --{name} is deprecated; use --{new} (the spelling every CLI uses)", file=sys.stderr)
        return new
    return name


def coerce(name: str, value: Any) -> Any:
    """``value`` (a TOML value or a CLI string) as field ``name``'s type."""
    if name not in _FIELD_TYPES:
        known = ", ".join(sorted(_FIELD_TYPES))
        raise InputError(f"unknown config key {name!r} (known: {known})")
    typ = _FIELD_TYPES[name]
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in TRUE:
                return True
            if text in FALSE:
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return ANY_INTEGER.parse(value) if isinstance(value, str) else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value).lower() if name == "load_in_4bit" and isinstance(value, bool) else str(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("1e309"))
        from .validation import range_words

        words = range_words(name) if typ in (int, float) else ""
        if words:
            raise InputError(f"--{name} must be {words}, got {value!r}") from None
        raise InputError(f"config key {name!r}: {value!r} is not a valid {typ.__name__}") from None


def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError("config file not found", p)
    try:
        text = p.read_bytes().decode("utf-8")  # TOML is UTF-8 by definition
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text (byte {err.start}); TOML files must be UTF-8", p) from None
    except OSError as err:
        raise InputError(f"cannot read the config file ({err.strerror})", p) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"invalid TOML ({err})", p) from None
    task = data.pop("task", None)
    out = {canonical_key(k): coerce(canonical_key(k, note=False), v) for k, v in data.items()}
    if task is not None:
        out.update(_task_data(task, p))
    return out


# Several task-stage files live in one string field, separated by NUL, the one character no path can
# hold (paths are opaque: a newline is a valid path character; see training.data.split_files).
MULTI_FILE_KEYS = ("xml", "key")
FILE_SEPARATOR = "\0"


def _task_data(task: object, path: Path) -> dict:
    """``[[task.data]]`` tables (``xml`` and ``key`` each) -> the xml / key fields, in order."""
    entries = task.get("data") if isinstance(task, dict) else None
    if not isinstance(entries, list) or not entries or set(task) != {"data"}:
        raise InputError("[task] may only hold [[task.data]] tables, each with xml and key", path)
    for e in entries:
        if not isinstance(e, dict) or set(e) != {"xml", "key"} or not all(isinstance(v, str) for v in e.values()):
            raise InputError('each [[task.data]] table needs exactly xml = "..." and key = "..."', path)
    return {name: FILE_SEPARATOR.join(e[name] for e in entries) for name in MULTI_FILE_KEYS}


def parse_overrides(argv: list[str]) -> dict:
    """``--key value`` pairs (``--flag`` alone means true for boolean keys)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) == 2:
            raise InputError(f"expected --key value, got {token!r}")
        name, _, inline = token[2:].partition("=")
        name = canonical_key(name)
        if name not in _FIELD_TYPES:
            coerce(name, None)  # raises the unknown-key error
        if inline:
            out[name] = _repeatable(out, name, coerce(name, inline))
            i += 1
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if _FIELD_TYPES[name] is bool:
            if nxt is not None and nxt.lower() in TRUE | FALSE:
                out[name] = coerce(name, nxt)
                i += 2
            else:
                out[name] = True
                i += 1
            continue
        if nxt is None or (nxt.startswith("--") and len(nxt) > 2 and not _is_number(nxt)):
            raise InputError(f"--{name} needs a value")
        out[name] = _repeatable(out, name, coerce(name, nxt))
        i += 2
    return out


def _repeatable(out: dict, name: str, value: Any) -> Any:
    """A repeated --xml / --key adds a file (in order); any other repeated key keeps the last value."""
    if name in MULTI_FILE_KEYS and name in out:
        return out[name] + FILE_SEPARATOR + value
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def default_config_path(stage: str) -> Path:
    return CONFIG_DIR / f"{stage}.toml"


# Test hooks that were config keys once (now training.hooks' environment variables):
# dropped from the config.json of a run saved before, so it still resumes.
RETIRED_KEYS = ("stop_after_steps", "record_batches")


def build_config(overrides: dict, config_file: str | Path | None = None, base: dict | None = None) -> TrainConfig:
    """Defaults <- ``base`` (a resumed run's config) or the stage's TOML <- ``overrides``."""
    values: dict = {}
    if base is not None:
        values.update(
            {
                canonical_key(k, note=False): coerce(canonical_key(k, note=False), v)
                for k, v in base.items()
                if k not in RETIRED_KEYS
            }
        )
    else:
        stage = overrides.get("stage", "domain")
        if config_file is None and stage not in STAGES:
            raise InputError(f"--stage must be one of {STAGES}, got {stage!r}")
        # A missing preset is an error, never a silent fall back to the dataclass defaults.
        values.update(read_toml(config_file or default_config_path(stage)))
    values.update(overrides)
    cfg = TrainConfig(**values).validate()
    if "batch_size" in overrides and "batch_tokens" not in overrides and cfg.batch_tokens > 0:
        # Never silent: token-budget batches (the stage presets' default) leave batch_size unused.
        print(
            f"note: --batch_size is not used while batch_tokens = {cfg.batch_tokens} (token-budget batches); "
            "add --batch_tokens 0 for batches of batch_size rows",
            file=sys.stderr,
        )
    return cfg


def load_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise InputError("not a training run folder (no config.json)", run_dir)
    config = parse_json(read_text_file(path), path)
    if not isinstance(config, dict):
        raise InputError("config.json must be a JSON object", path)
    for name in MULTI_FILE_KEYS:  # a run saved before NUL separated its task files used newlines
        value = config.get(name)
        if isinstance(value, str) and "\n" in value and FILE_SEPARATOR not in value and not Path(value).exists():
            config[name] = value.replace("\n", FILE_SEPARATOR)
    return config
