"""Settings a stage inherits from its ``--init`` export: the adapter and head are loaded as trained,
so their shape keys (``lora_*``, ``head_*``) are the export's. The run's config records those values,
and an explicit different value is refused instead of being silently ignored."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

from model.manifest import ExportManifest
from plumbing.errors import InputError

from .config import TrainConfig, coerce

# TrainConfig key -> (manifest section, key in it)
INHERITED = {
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
    **{f"head_{k}": ("head", k) for k in ("proj_dim", "mlp_dim", "pooling", "relevance", "dropout", "layer")},
}


def inherited_settings(manifest: ExportManifest) -> dict:
    """The TrainConfig values an init export fixes (keys its manifest records)."""
    out = {}
    sections = {"lora": manifest.lora.to_dict() if manifest.lora is not None else {}, "head": manifest.head}
    for key, (section, name) in INHERITED.items():
        record = sections[section]
        if name in record:
            out[key] = coerce(key, record[name])
    return out


def adopt_init_settings(
    cfg: TrainConfig,
    manifest: ExportManifest,
    explicit: Iterable[str] = (),
    init_path: str | Path | None = None,
    note: Callable[[str], None] | None = None,
) -> TrainConfig:
    """``cfg`` with the init export's adapter/head settings; a key in ``explicit`` (given by the
    user) whose value differs from the export's -> InputError. ``note`` hears which preset values
    (not given by the user) were replaced."""
    inherited = inherited_settings(manifest)
    for key in explicit:
        if key in inherited and getattr(cfg, key) != inherited[key]:
            raise InputError(
                f"--{key} {getattr(cfg, key)!r} differs from the --init export's {inherited[key]!r}: "
                f"its adapter and head are loaded as trained (drop --{key})",
                init_path,
            )
    changed = [f"{k} {getattr(cfg, k)!r} -> {v!r}" for k, v in inherited.items() if getattr(cfg, k) != v]
    if changed and note is not None:
        note(f"note: the --init export fixes {', '.join(changed)} (its adapter and head load as trained)")
    return dataclasses.replace(cfg, **inherited)


def check_init_settings(
    cfg: TrainConfig, init: str | Path, explicit: Iterable[str], note: Callable[[str], None] | None = None
) -> TrainConfig:
    """``cfg`` with the settings of the export at ``init`` (a run or export folder); an explicit
    (``explicit``) different --lora_* / --head_* is an InputError. Used by train.py and score.py cv."""
    from model.export_folder import find_export, read_manifest

    export = find_export(init)
    return adopt_init_settings(cfg, read_manifest(export), explicit=explicit, init_path=export, note=note)
