"""One error type for malformed user input, and the CLI convention around it.

Every command-line entry point turns an :class:`InputError` into exit code 2 and
a single line on stderr (file, case, problem) with no traceback, so a user with a
broken file sees what to fix instead of a stack trace.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, TypeVar

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
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as err:
            print(f"error: {err.one_line()}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]
