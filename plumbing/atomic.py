"""The one writer: atomic files and all-or-nothing output sets.

* :func:`atomic_write`: a temp file beside the target, fsynced, then renamed; a crash or
  a validation error part-way never leaves a half-written file under the final name.
* :class:`OutputSet`: a whole folder of outputs (``infer.py``'s submissions, zips and
  ``run.json``) built in a hidden sibling folder, fsynced, then swapped into place in one
  rename; the folder holds either the complete new set or the untouched previous one,
  never a mix. A reused folder is refused unless ``overwrite``; then the whole set is
  replaced.
* :func:`fsync_tree`: for writers that fill a temporary folder themselves (checkpoints,
  exports) before renaming it.

Everything written here gets the permissions of the user's umask (``tempfile`` alone
would make files 0600 and folders 0700, unreadable to teammates).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Callable

from .errors import InputError, one_line

# Names infer.py may leave in its output folder (subtask2/ etc. and report.html included): anything else
# in a folder we are asked to replace is the user's, and we refuse to delete it.
OUTPUT_SET_NAMES = re.compile(r"^(subtask\d+(\.zip)?|run\.json|report\.html)$")
# Test-only hook (never documented to users): pause before the final rename, after
# touching this marker file, so a test can kill the process mid-write.
_PAUSE_ENV = "ARCHEHR_TEST_PAUSE_BEFORE_COMMIT"


def current_umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse directory fsync; the data is still synced
        pass
    finally:
        os.close(fd)


def atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through ``write(binary_file)`` to a temp file beside ``target``, then rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json_atomic(path: Path, data: object) -> None:
    """Indented UTF-8 JSON; values JSON lacks (paths, dates) are written as strings."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def fsync_tree(root: Path) -> None:
    """Seal a folder built aside (a checkpoint, an export, an output set) before renaming it into
    place: every file and folder under ``root`` (``root`` included) gets the umask's permissions
    and is fsynced. The permissions are set here, once for every writer, because libraries do not
    follow the umask: safetensors writes 0600, ``tempfile`` 0600 files and 0700 folders."""
    root = Path(root)
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            os.chmod(path, file_mode)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# --- output folders ---------------------------------------------------------------------


def _nearest_existing(path: Path, flag: str, shown: Path) -> Path:
    """The nearest ancestor of ``path`` (a path not yet there) that exists; a folder, never a dangling link."""
    probe = path.parent
    while not probe.exists():
        if probe.is_symlink():
            raise InputError(f"{flag} lies under a dangling symbolic link ({probe})", shown)
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{flag} lies under {probe}, which is not a folder", shown)
    return probe


def _check_can_create_in(folder: Path, flag: str, shown: Path) -> None:
    """Create (and remove) a probe file in ``folder``: permission bits say nothing to root, and
    /proc, /sys or a read-only mount accept a permission check yet refuse every new file."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".archehr-probe-")
    except OSError as err:
        raise InputError(f"{flag}: cannot create files in {folder} ({err.strerror or err})", shown) from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "a file" if stat.S_ISREG(mode) else "not a regular file"


def check_out_folder(out: Path, flag: str = "--out") -> None:
    """The output preflight for a folder (every CLI's ``--out``, before any work): not empty text,
    a folder or absent (never a file, device or FIFO), not a dangling link or under one, and new
    files can really be created where it is or will be."""
    out = Path(out)
    if str(out).strip() in ("", "."):
        raise InputError(f"{flag} must name a folder (got {str(out)!r}); the working directory is not used")
    if out.is_symlink() and not out.exists():
        raise InputError(f"{flag} is a dangling symbolic link", out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{flag} exists and is {_kind(out.stat().st_mode)}, not a folder", out)
        _check_can_create_in(out.resolve(), flag, out)
        return
    _check_can_create_in(_nearest_existing(out.absolute(), flag, out), flag, out)


def check_file_target(target: Path, inputs: list[Path | None], flag: str) -> None:
    """The output preflight for a file (``score.py --json``, ``baselines.fit --out``), before any work:
    absent or a regular file (never a device, FIFO or folder: it is replaced by a rename), none of the
    ``inputs``, and its folder exists (or can be made) and takes new files."""
    target = Path(target)
    if not str(target).strip() or str(target) == "." or str(target).endswith(os.sep):
        raise InputError(f"{flag} must name a file", target)
    for source in inputs:
        if source is not None and (same_file(target, source) or target.absolute() == Path(source).absolute()):
            raise InputError(f"{flag} would overwrite an input file; choose another path", target)
    if target.is_symlink() and not target.exists():
        raise InputError(f"{flag} is a dangling symbolic link", target)
    if target.exists():
        mode = target.stat().st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{flag} is {_kind(mode)}; it would be replaced, so give a regular file's path", target)
        _check_can_create_in(target.resolve().parent, flag, target)
        return
    parent = target.absolute().parent
    _check_can_create_in(
        parent if parent.is_dir() else _nearest_existing(target.absolute(), flag, target), flag, target
    )


def check_output_set_target(out: Path, overwrite: bool, names: re.Pattern[str] = OUTPUT_SET_NAMES) -> None:
    """Before the work: ``out`` is writable, and reusable (empty, or our previous set with ``overwrite``)."""
    out = Path(out)
    check_out_folder(out)
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    foreign = [n for n in entries if not names.match(n)]
    if foreign:
        raise InputError(
            f"output folder holds files that are not ours ({one_line(foreign[0])}, ...); give an empty or new --out",
            out,
        )
    if not overwrite:
        raise InputError("output folder already holds a run; pass --overwrite to replace it or use another --out", out)


class OutputSet:
    """Build a folder's whole content aside, then put it in place in one rename.

    ``with OutputSet(out, overwrite) as stage:`` write every file under ``stage``; on a
    clean exit the set is fsynced and swapped with ``out``; on any exception (Ctrl-C
    included) the staging folder is removed and ``out`` is untouched.
    """

    def __init__(self, out: Path, overwrite: bool = False, names: re.Pattern[str] = OUTPUT_SET_NAMES):
        self.out = Path(out)
        self.overwrite = overwrite
        self.names = names
        self.stage: Path | None = None

    def __enter__(self) -> Path:
        check_output_set_target(self.out, self.overwrite, self.names)
        target = self.out.resolve() if self.out.is_symlink() else self.out.absolute()
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale(target)
        self.stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-{_owner()}"))
        os.chmod(self.stage, 0o777 & ~current_umask())
        return self.stage

    @staticmethod
    def _remove_stale(target: Path, older_than_s: float = 3600.0) -> None:
        """Staging folders a killed run (SIGKILL) left beside ``target``: those of a process
        that no longer runs, or (another host's) an hour old."""
        now = time.time()
        for p in target.parent.glob(f".{target.name}.partial-*"):
            pid, _, host = p.name[len(f".{target.name}.partial-") :].partition("@")
            ours = host.startswith(_owner().partition("@")[2])  # same host: the pid says if it still runs
            try:
                if (ours and pid.isdigit() and not _alive(int(pid))) or now - p.stat().st_mtime > older_than_s:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.stage is not None
        if exc_type is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            return
        try:
            fsync_tree(self.stage)
            pause = os.environ.get(_PAUSE_ENV)
            if pause:
                Path(pause).touch()
                time.sleep(60)
            self._swap()
        except BaseException:
            shutil.rmtree(self.stage, ignore_errors=True)
            raise

    def _swap(self) -> None:
        assert self.stage is not None
        target = self.target
        if not target.exists():
            os.rename(self.stage, target)
        elif _exchange(self.stage, target):
            shutil.rmtree(self.stage, ignore_errors=True)  # now holds the previous set
        else:  # no renameat2: a rename aside, then into place (a microsecond-wide window)
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.rename(target, old / "set")
            os.rename(self.stage, target)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)


def _owner() -> str:
    """``PID@HOST@``: whose staging folder it is (shared filesystems span hosts)."""
    import socket

    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    return f"{os.getpid()}@{host}@"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0
