"""Where the model runs and where its base weights come from, checked before anything is built.

Every CLI passes ``--device`` through :func:`resolve_device` and ``--base`` (a local folder or a
hub id) through :func:`check_base` before it loads or writes anything: an unknown device, a CUDA
device on a machine without one, a folder that is not a model, or a hub id that is neither
cached nor downloadable is one :class:`InputError` line (exit 2) within seconds, naming what was
asked and what this machine has. Loading itself lives in :mod:`model.backbone`.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from plumbing.errors import InputError

if TYPE_CHECKING:
    import torch

# What `--device` may name (torch accepts more, e.g. "meta", that cannot run a model).
DEVICE_TYPES = ("cpu", "cuda", "mps")
HUB_HOST = ("huggingface.co", 443)
HUB_PROBE_SECONDS = 3.0
BASE_FLAG = "--base"
_TRUE = ("1", "true", "yes", "on")


def available_devices() -> list[str]:
    """The devices this machine can run a model on, as ``--device`` spells them."""
    import torch  # here, not at import: the CLIs' --help stays fast

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


GB = 1e9
# Room to leave beside what a process plans to allocate: allocator fragmentation, cuBLAS
# workspaces, CUDA-graph pools (inference's budget and export calibration both take it off).
MARGIN_BYTES = int(0.75 * GB)


def room_bytes(device: torch.device | str) -> int | None:
    """Bytes this process may still allocate on a CUDA ``device`` (None elsewhere): what the card
    has free plus what PyTorch holds unused, within the process's memory fraction (a cap that
    ``--max-memory-gb`` or a launcher set). No safety margin: callers take their own off."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allocated = torch.cuda.memory_allocated(index)
    room = free + torch.cuda.memory_reserved(index) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _index: 1.0)(index)
    return max(0, min(room, int(fraction * total) - allocated))


def resolve_device(requested: str | None, flag: str = "--device") -> str:
    """``requested`` (None: cuda when there is one, else cpu) as a device this machine has."""
    import torch

    if requested is None or requested == "":
        return default_device()
    have = ", ".join(available_devices())
    try:
        device = torch.device(str(requested).strip())
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{flag} {requested!r} is not a device (use one of: {have})") from None
    if device.type not in DEVICE_TYPES:
        raise InputError(f"{flag} {requested!r}: a model cannot run on {device.type!r} (use one of: {have})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"{flag} {requested!r}: {why} (this machine has: {have})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{flag} {requested!r}: there is no such GPU (this machine has: {have})")
    if device.type == "mps" and "mps" not in available_devices():
        raise InputError(f"{flag} {requested!r}: MPS is not available (this machine has: {have})")
    return str(device)


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_models(limit: int = 5) -> list[str]:
    """Hub model ids with a folder in the local cache (names only; nothing is read or checked)."""
    try:
        names = sorted(p.name for p in hub_cache_dir().iterdir() if p.name.startswith("models--"))
    except OSError:
        return []
    ids = [n[len("models--") :].replace("--", "/") for n in names]
    return ids[:limit] + ([f"... {len(ids) - limit} more"] if len(ids) > limit else [])


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not source.startswith((".", "~"))
        and not any(c.isspace() or not c.isprintable() for c in source)
    )


def local_model_folder(source: str) -> Path | None:
    """The folder ``source`` names on this machine: the folder itself, or a hub id's snapshot in
    the local cache (the folder of its cached config.json), as :func:`check_base` finds them;
    None where neither (nothing is downloaded)."""
    try:
        path = Path(source).expanduser()
        if path.is_dir():
            return path
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, ~user that does not exist
        return None
    if not _looks_like_hub_id(source):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "config.json")
    except ValueError:  # huggingface_hub's id validation
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def model_folder_problem(folder: Path) -> str | None:
    """What a local base-model folder lacks (None: config, safetensors weights and a tokenizer)."""
    if not (folder / "config.json").is_file():
        return "is not a model folder (no config.json)"
    if not (any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()):
        return "holds no .safetensors weights (only safetensors are loaded)"
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return "holds no tokenizer (tokenizer.json / tokenizer_config.json)"
    return None


def _hub_reachable(timeout: float | None = None) -> bool:
    """Whether the hub answers within ``timeout`` seconds, DNS included (a thread bounds it)."""
    timeout = HUB_PROBE_SECONDS if timeout is None else timeout
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(HUB_HOST, timeout=timeout).close()
            result.append(True)
        except Exception:  # noqa: BLE001 - in a daemon thread: any failure means "not reachable"
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def check_base(source: str | None, flag: str = BASE_FLAG) -> None:
    """A base model the loader will find: a model folder, or a hub id cached or downloadable now."""
    if not source:
        return
    try:
        is_dir = Path(source).expanduser().is_dir()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, ~user that does not exist
        is_dir = False
    path = Path(source).expanduser() if is_dir else Path(source)
    if is_dir:
        problem = model_folder_problem(path)
        if problem is not None:
            raise InputError(f"{flag} {source}: {problem}")
        return
    cached = cached_models()
    have = f"cached hub models: {', '.join(cached)}" if cached else "no hub model is cached"
    if not _looks_like_hub_id(source):
        raise InputError(f"{flag} {source}: no such folder, and not a hub id like Qwen/Qwen3-4B ({have})")
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(source, "config.json"), str):
            return
    except ValueError:  # huggingface_hub's id validation (characters a repo id cannot hold)
        raise InputError(f"{flag} {source}: no such folder, and not a valid hub id ({have})") from None
    how = (
        f"{flag} {source}: not in the local Hugging Face cache ({have}); download it first "
        f"(hf download {source}) or pass {flag} /local/folder"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        raise InputError(how + "; HF_HUB_OFFLINE is set")
    if not _hub_reachable():
        raise InputError(how + "; the hub is not reachable")


def check_model_options(device: str | None, base: str | None) -> None:
    """What every CLI checks before any work: ``--device`` exists here, ``--base`` is loadable."""
    resolve_device(device)
    check_base(base)
