"""A training run folder: whose it is, who is writing it, and what a resume may change.

* A new run writes only into a new or empty folder: a folder holding an earlier run is refused
  (``--resume RUN`` continues it), a folder holding anything else is never written into.
* :class:`RunLock`: ``RUN/.train.lock`` holds ``PID@HOST`` while a training writes the folder; a
  second training into it is refused with one line; the lock of a process that no longer runs
  (killed with SIGKILL, a crashed machine) is taken over, and that is said on screen.
* :func:`resume_config`: ``--resume RUN`` continues the run exactly as configured in
  ``RUN/config.json``; a setting given with it that differs is refused, naming every field that
  differs and how to proceed (only :data:`FREE_ON_RESUME`, which cannot change the weights, may
  change). :func:`finished_export`: a run that has exported is finished; resuming it does nothing.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Callable

from plumbing.errors import InputError, one_line

from .config import RETIRED_KEYS, TrainConfig, build_config, coerce, load_run_config

LOCK_FILE = ".train.lock"
# What a training writes into its folder (checkpoints/ and export/ with their partial siblings).
RUN_NAMES = re.compile(
    r"^(config\.(json|toml)|log\.jsonl|loss_curve\.png|checkpoints|export|\.export\.partial"
    r"|" + re.escape(LOCK_FILE) + r")$"
)
# Settings that do not change what is trained: a resume may give new values.
FREE_ON_RESUME = ("out", "progress", "plot", "log_every", "save_every", "keep_checkpoints")


def _listing(names: list[str]) -> str:
    shown = ", ".join(one_line(n) for n in names[:3])
    return shown + (", ..." if len(names) > 3 else "")


def check_new_run_folder(out: Path) -> None:
    """A new run's ``--out``: absent or empty; never an earlier run's folder, never a folder of other files."""
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    ours = [n for n in names if n != LOCK_FILE]
    if ours and all(RUN_NAMES.match(n) for n in ours):
        if "export" in ours or any((out / "checkpoints").glob("step-*")):
            raise InputError(
                "output folder already holds a training run; continue it with --resume "
                f"{one_line(str(out))} or give another --out",
                out,
            )
        raise InputError(
            "output folder holds a training run that saved no checkpoint (nothing to resume); "
            "delete the folder or give another --out",
            out,
        )
    if ours:
        raise InputError(
            f"output folder is not empty (holds {_listing(names)}); a new training writes only into "
            "a new or empty folder: give another --out",
            out,
        )


def finished_export(run_dir: str | Path) -> Path | None:
    """The run's export when the run has finished (an export is written last, in one rename)."""
    export = Path(run_dir) / "export"
    return export if (export / "manifest.json").is_file() else None


def resume_config(run_dir: str, overrides: dict, config_file: str | None) -> TrainConfig:
    """``RUN/config.json`` with the settings given beside ``--resume``; any that would change the
    training is refused, every differing field named with its saved and given value."""
    if config_file:
        raise InputError("--config cannot be used with --resume: a run continues with its own config.json", run_dir)
    saved = {k: v for k, v in load_run_config(run_dir).items() if k not in RETIRED_KEYS}
    defaults = TrainConfig().to_dict()
    differ = []
    for name, value in overrides.items():
        if name in FREE_ON_RESUME:
            continue
        before = coerce(name, saved[name]) if name in saved else defaults.get(name)
        if before != value:
            differ.append(f"{name} {before!r} -> {value!r}")
    if differ:
        raise InputError(
            f"--resume continues the run as saved in config.json, but {len(differ)} setting(s) differ: "
            f"{'; '.join(differ)}. Drop them to continue this run, or train with them into a new --out "
            "(nothing was changed)",
            run_dir,
        )
    return build_config({**overrides, "out": run_dir}, base=saved)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (a pid past the range: none either)
        return False
    except PermissionError:
        return True
    return True


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def lock_holder(out: Path) -> tuple[str, bool] | None:
    """``(PID@HOST, running)`` of the lock in ``out``; None without one. Another host's lock counts as running."""
    try:
        text = (out / LOCK_FILE).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError):
        return "unreadable", True
    pid, _, host = text.partition("@")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == 0:
        return one_line(text) or "unknown", True
    return text, _alive(int(pid))


def check_not_locked(out: Path) -> None:
    """Refuse (one line) when another training that still runs holds ``out``'s lock."""
    holder = lock_holder(out)
    if holder is not None and holder[1]:
        raise InputError(
            f"another training (process {holder[0]}) is writing this run folder; wait for it to end or "
            f"give another --out (if that process is gone, delete {LOCK_FILE} in the folder)",
            out,
        )


class RunLock:
    """``RUN/.train.lock`` (``PID@HOST``), created exclusively; :meth:`release` removes it if still ours."""

    def __init__(self, out: Path, note: Callable[[str], None]):
        self.path = Path(out) / LOCK_FILE
        self.owner = _owner()
        self.created = not Path(out).exists()  # removed again if the run leaves nothing in it
        Path(out).mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = lock_holder(Path(out))
                if holder is None:
                    continue  # released meanwhile
                check_not_locked(Path(out))
                note(f"note: took over the lock of training process {holder[0]}, which no longer runs")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.owner + "\n")
            return
        check_not_locked(Path(out))
        raise InputError("could not take the run folder's lock; try again", out)

    def release(self) -> None:
        try:
            if self.path.read_text(encoding="utf-8").strip() == self.owner:
                self.path.unlink()
            if self.created and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # a run refused before writing anything leaves no folder
        except OSError:
            pass
