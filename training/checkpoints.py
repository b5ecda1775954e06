"""Resumable training checkpoints: ``RUN/checkpoints/step-N/``.

Each holds the LoRA adapter, the head, optimizer and scheduler state, every RNG
state (python, numpy, torch CPU and CUDA; one file per process) and the data
position, so that a resumed run continues bit-for-bit where it stopped. A checkpoint
is written to a temporary folder and renamed, so a crash never leaves half of one.

Several processes: the global main process writes everything except each rank's own
RNG files (``rng-R``, R = global rank), into the run folder, which must be on a
filesystem every node sees. Under FSDP every rank takes part in gathering the full
adapter and head (training.gather) and saves its own optimizer shard
(``optimizer-rank-R.pt``): an FSDP checkpoint resumes on the same number of processes.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from plumbing.atomic import fsync_tree
from plumbing.errors import InputError
from plumbing.ranges import integer
from heads.alignment import HEAD_WEIGHTS, load_head, save_head

from . import gather

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    py = random.getstate()
    npy = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; a torn newer one (disk full, killed copy) is skipped
    with a warning, so a resume falls back to the previous complete one."""
    for d in reversed(checkpoint_dirs(run_dir)):
        problem = checkpoint_problem(d)
        if problem is None:
            return d
        print(f"warning: skipping checkpoint {d}: {problem}", file=sys.stderr)
    return None


def skipped_newer(run_dir: str | Path, used: Path) -> list[str]:
    """Checkpoints newer than ``used`` (torn ones a resume skipped), by name."""
    dirs = checkpoint_dirs(run_dir)
    return [d.name for d in dirs[dirs.index(used) + 1 :]] if used in dirs else []


def _safetensors_problem(path: Path) -> str | None:
    """Whether ``path`` holds a whole safetensors file (header parses, data not cut short)."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError):
        return f"{path.name} is truncated or not safetensors"
    if 8 + n + end > size:
        return f"{path.name} is truncated ({size} bytes, needs {8 + n + end})"
    return None


# The trainer state's numbers (training.loop_state writes them): each integer within its range.
_STEP_COUNT = integer(0, 10**9)
STATE_FIELDS = {"step": _STEP_COUNT, "epoch": _STEP_COUNT, "position": _STEP_COUNT, "tokens": integer(0, 10**15)}
OPTIONAL_STATE_FIELDS = {
    "total_steps": _STEP_COUNT,
    "processes": integer(1, 65_536),
    "batches_per_step": integer(1, 10**9),
}


def state_problem(state: object, ckpt: Path) -> str | None:
    """What is wrong with a trainer state's fields (None: every number in range, the step the folder's)."""
    if not isinstance(state, dict):
        return f"{STATE_FILE} must be a JSON object"
    for name, allowed in {**STATE_FIELDS, **OPTIONAL_STATE_FIELDS}.items():
        if name not in state:
            if name in STATE_FIELDS:
                return f"{STATE_FILE} lacks {name!r}"
            continue
        if not allowed.contains(state[name]):
            return f"{STATE_FILE}: {name} must be {allowed.words()}, got {state[name]!r}"
    named = _STEP_DIR.match(ckpt.name)
    if named and int(named.group(1)) != state["step"]:
        return f"{STATE_FILE} says step {state['step']} in folder {ckpt.name}"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """What makes ``ckpt`` unusable for a resume (None: complete). Cheap: headers and sizes only."""
    try:
        state = read_state(ckpt)
    except (OSError, ValueError, RecursionError):
        return f"{STATE_FILE} is missing or unreadable"
    problem = state_problem(state, ckpt)
    if problem is not None:
        return problem
    problem = _safetensors_problem(ckpt / "adapter" / "adapter_model.safetensors")
    if problem is None and (ckpt / "head").exists():
        problem = _safetensors_problem(ckpt / "head" / "head.safetensors")
    if problem is not None:
        return problem
    # A sharded (FSDP) checkpoint holds one optimizer file per rank instead of optimizer.pt.
    optimizers = sorted(ckpt.glob("optimizer-rank-*.pt")) or [ckpt / "optimizer.pt"]
    for name in (*(p.name for p in optimizers), "scheduler.pt", "rng-0.pt"):
        if not zipfile.is_zipfile(ckpt / name):  # torch.save's format is a zip: a cut one has no directory
            return f"{name} is missing, empty or truncated"
    return None


def save_checkpoint(
    run_dir: str | Path, step: int, model, accelerator, optimizer, scheduler, state: dict, keep: int = 2, wrapped=None
) -> Path:
    """Write ``step-N`` (adapter, head, optimizer, scheduler, RNG, ``state``); keep the newest ``keep``.
    ``model`` is the unwrapped model, ``wrapped`` what ``accelerator.prepare`` returned (FSDP)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.partial"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    meta, tensors = capture_rng()
    (tmp / f"rng-{rank}.json").write_text(json.dumps(meta), encoding="utf-8")
    torch.save(tensors, tmp / f"rng-{rank}.pt")
    fsdp = gather.is_fsdp(accelerator)
    with gather.full_parameters(accelerator, wrapped):  # every rank (FSDP gathers)
        if accelerator.is_main_process:
            lora, head_state = gather.trainable_state(model.backbone, model.head) if fsdp else (None, None)
            if fsdp:
                gather.save_adapter(model.backbone, tmp / "adapter", lora)
            else:
                model.backbone.save_pretrained(str(tmp / "adapter"))
            if model.head is not None:
                save_head(gather.head_from_state(model.head, head_state) if fsdp else model.head, tmp / "head")
    if fsdp:
        torch.save(optimizer.state_dict(), tmp / f"optimizer-rank-{rank}.pt")
    if accelerator.is_main_process:
        if not fsdp:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(tmp)  # on disk before the rename makes it the checkpoint a resume trusts
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(ckpt: str | Path, model, optimizer, scheduler, accelerator=None, wrapped=None) -> dict:
    """Restore adapter, head, optimizer and scheduler into live objects; return the trainer state."""
    from safetensors import SafetensorError

    ckpt = Path(ckpt)
    try:
        return _load_checkpoint(ckpt, model, optimizer, scheduler, accelerator, wrapped)
    except (OSError, EOFError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        detail = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:100]}"
        if "size mismatch" in str(err) or "shape" in str(err):  # the weights are fine; the settings are not
            raise InputError(
                f"checkpoint does not fit the run's settings ({detail}); was the run's config.json "
                "edited? restore its values to resume",
                ckpt,
            ) from None
        # Passed the completeness check yet unreadable (bit rot, edited by hand): say which.
        raise InputError(
            f"checkpoint is unreadable ({detail}); move it out of checkpoints/ to resume from the previous one", ckpt
        ) from None


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler, accelerator=None, wrapped=None) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    if accelerator is not None and gather.is_fsdp(accelerator):
        return _load_fsdp_checkpoint(ckpt, adapter, model, optimizer, scheduler, accelerator, wrapped)
    result = set_peft_model_state_dict(model.backbone, adapter)
    missing_lora = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing_lora:
        raise RuntimeError(f"checkpoint adapter lacks {len(missing_lora)} LoRA weights, e.g. {missing_lora[0]}")
    if model.head is not None:
        device = next(model.head.parameters()).device
        model.head.load_state_dict(load_head(ckpt / "head", device=device).state_dict())
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    return read_state(ckpt)


def read_state(ckpt: str | Path) -> dict:
    """The trainer state alone (step, epoch, position in global batches, layout)."""
    return json.loads((Path(ckpt) / STATE_FILE).read_text(encoding="utf-8"))


def load_rng(ckpt: str | Path, rank: int) -> None:
    """Restore this rank's RNG states; a rank the checkpoint did not have (resumed on more
    processes than it was written with) takes rank 0's, as every rank starts from the
    same seed in a fresh run too."""
    ckpt = Path(ckpt)
    if not (ckpt / f"rng-{rank}.json").is_file():
        rank = 0
    meta = json.loads((ckpt / f"rng-{rank}.json").read_text(encoding="utf-8"))
    restore_rng(meta, torch.load(ckpt / f"rng-{rank}.pt", weights_only=True))


def _load_fsdp_checkpoint(ckpt: Path, adapter: dict, model, optimizer, scheduler, accelerator, wrapped) -> dict:
    """FSDP: every rank writes the full adapter/head into its shards; its own optimizer shard."""
    from safetensors.torch import load_file

    state = read_state(ckpt)
    rank = accelerator.process_index
    shard = ckpt / f"optimizer-rank-{rank}.pt"
    if state.get("processes") != accelerator.num_processes or not shard.is_file():
        raise InputError(
            f"an FSDP checkpoint resumes on the process count it was written with "
            f"({state.get('processes')}), not {accelerator.num_processes}",
            ckpt,
        )
    head_state = load_file(str(ckpt / "head" / HEAD_WEIGHTS)) if model.head is not None else None
    with gather.full_parameters(accelerator, wrapped, writeback=True):
        gather.load_trainable_state(model.backbone, model.head, adapter, head_state)
    optimizer.load_state_dict(torch.load(shard, weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    return state
