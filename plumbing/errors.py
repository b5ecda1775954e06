"""One error type for malformed user input, and the CLI convention around it.

Every command-line entry point turns an :class:`InputError` into exit code 2 and
a single line on stderr (file, case, problem) with no traceback, so a user with a
broken file sees what to fix instead of a stack trace.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Callable, TypeVar

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Malformed or inconsistent input file; message names file, case and problem."""

    def __init__(self, problem: str, path: str | Path | None = None, case_id: str | None = None):
        self.problem = problem
        self.path = str(path) if path is not None else None
        self.case_id = case_id
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = []
        if self.path:
            parts.append(self.path)
        if self.case_id is not None:
            parts.append(f"case {self.case_id}")
        parts.append(self.problem)
        return ": ".join(parts).replace("\n", " ")


def check_input_file(path: Path) -> None:
    """A user's input file exists and is not empty (InputError naming it otherwise)."""
    if not path.is_file():
        raise InputError("file not found", path)
    if path.stat().st_size == 0:
        raise InputError("file is empty", path)


def read_text_file(path: Path) -> str:
    """A user's text file as str; missing, non-UTF-8 or empty -> InputError naming it."""
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", path) from None
    if not text.strip():
        raise InputError("file is empty", path)
    return text


F = TypeVar("F", bound=Callable[..., int | None])


def exit_on_input_error(main: F) -> F:
    """Decorate a CLI ``main``: InputError -> one stderr line and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int | None:
        try:
            return main(*args, **kwargs)
        except InputError as err:
            print(f"error: {err.one_line()}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after saving what can be resumed; ``message`` says how."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def exit_on_interrupt(main: F) -> F:
    """Decorate a CLI ``main``: SIGTERM behaves as Ctrl-C, and either one ends the command
    with one stderr line and exit code 130 (writers clean their temp files on the way out)."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int | None:
        import signal
        import threading

        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if in_main_thread else None
        try:
            return main(*args, **kwargs)
        except Interrupted as stop:
            print(stop.message, file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
        except KeyboardInterrupt:
            print("interrupted: no half-written file was left", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


def parse_json(text: str | bytes, path: str | Path, where: str = "") -> object:
    """JSON from a user's file; malformed or absurdly deep JSON -> one InputError line."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = f"{where}: " if where else ""
        raise InputError(f"{at}invalid JSON ({err.msg} at line {err.lineno})", path) from None
    except RecursionError:
        raise InputError(f"{where + ': ' if where else ''}JSON nested too deeply", path) from None
