"""A merged Hugging Face model folder from an export, for serving engines (vLLM, SGLang, TGI).

``export_merged(RUN/export)`` writes ``RUN/export/merged/`` (beside the adapter and the head):
the base model as trained (NF4 bases dequantised exactly as the training forward computed them,
:func:`model.backbone.load_merged`) with the LoRA adapter merged in, cast to bf16, saved with
``save_pretrained`` as sharded safetensors plus ``config.json``, the tokenizer (chat template
included) and a greedy ``generation_config.json``. It loads with plain
``AutoModelForCausalLM.from_pretrained(folder)``: no PEFT, no archehr code, no remote code.

The alignment head is not part of it: a serving engine only generates (Subtask 3); relevance and
alignment (Subtasks 2 and 4) stay with ``infer.py --export RUN/export``. ``archehr_merged.json``
says which export (and which manifest, by sha256) the folder was built from.

Built under a hidden sibling name, fsynced and renamed into place: the folder is complete or absent.
A folder that holds anything but an earlier merged export is refused.
"""

from __future__ import annotations

from plumbing.ranges import DEFAULT_NEW_TOKENS
import hashlib
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from plumbing.errors import InputError

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerBase

from .export_folder import MANIFEST, find_export, model_card, package_versions, read_manifest

MERGED_DIR = "merged"  # RUN/export/merged
MERGED_RECORD = "archehr_merged.json"
MERGED_FORMAT = "archehr-merged/1"
DEFAULT_SHARD_SIZE = "5GB"  # transformers' default; Qwen3-4B in bf16 (8 GB) is two shards
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SHARD_SIZE = re.compile(r"^[1-9][0-9]*(KB|MB|GB|KiB|MiB|GiB)$")


def merged_out(export_dir: Path, out: str | Path | None) -> Path:
    """Where the merged folder goes; refused (InputError) if that folder holds anything else."""
    target = Path(out) if out else export_dir / MERGED_DIR
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise InputError("the merged model's output is not a folder", target)
    if target.is_dir() and any(target.iterdir()) and not (target / MERGED_RECORD).is_file():
        raise InputError(
            f"folder holds other files (not an earlier merged export, no {MERGED_RECORD}); "
            "choose an empty or new --out",
            target,
        )
    return target


def greedy_generation_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> GenerationConfig:
    """What infer.py decodes with: greedy, stopping at EOS or ``<|im_end|>``."""
    from transformers import GenerationConfig

    from .loaded_export import stop_ids

    return GenerationConfig(  # type: ignore[no-untyped-call]  # transformers leaves its __init__ unannotated
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_merged(
    export_dir: str | Path,
    out: str | Path | None = None,
    *,
    base: str | None = None,
    device: str | None = None,
    dtype: str = "bfloat16",
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    ladder: dict[str, Any] | None = None,
) -> Path:
    """Write the merged model folder of ``export_dir`` (a run or export folder); returns its path.
    ``ladder``: a ``score.py cv`` run's scores (``read_cv_ladder``) for the model card's ``model-index``."""
    from .loaded_export import load_export

    root = find_export(export_dir)
    record_in = read_manifest(root)
    manifest = record_in.to_dict()
    target = merged_out(root, out)
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not SHARD_SIZE.match(str(max_shard_size)):
        raise InputError(f"--max_shard_size must be a size such as 5GB or 500MB, got {max_shard_size!r}")
    trained_in_4bit = bool((manifest.get("base_model") or {}).get("load_in_4bit"))
    # The base as trained (NF4 -> dequantised when it was), the adapter merged into it.
    loaded = load_export(root, base=base, device=device, load_in_4bit=trained_in_4bit, merge=True)
    model = loaded.model.to(DTYPES[dtype])
    model.config.use_cache = True
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    loaded.tokenizer.save_pretrained(tmp)
    greedy_generation_config(loaded.tokenizer, max_new_tokens).save_pretrained(tmp)
    record = {
        "format": MERGED_FORMAT,
        "export": str(root.resolve()),
        "manifest_sha256": _sha256(root / MANIFEST),
        "preset": manifest.get("preset"),
        "base_model": (manifest.get("base_model") or {}).get("id"),
        "merged_into": "the NF4 base dequantised as trained" if trained_in_4bit else "the unquantised base",
        "dtype": dtype,
        "cv_scores_from": (ladder or {}).get("source"),
        "head": "not included: relevance and alignment run with infer.py --export on the export",
        "packages": package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / "README.md").write_text(model_card(record_in, ladder, merged=True), encoding="utf-8")
    (tmp / MERGED_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    from plumbing.atomic import fsync_tree

    fsync_tree(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
