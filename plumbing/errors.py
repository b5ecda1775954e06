"""One error type for malformed user input, and the CLI convention around it.

Every command-line entry point turns an :class:`InputError` into exit code 2 and
a single line on stderr (file, case, problem) with no traceback, so a user with a
broken file sees what to fix instead of a stack trace.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Callable, NoReturn, TypeVar

EXIT_BAD_INPUT = 2


def first_line(err: BaseException, limit: int = 160) -> str:
    """A library error's first non-blank line (its type's name where it has none), at most
    ``limit`` characters: what a one-line InputError quotes of it."""
    line = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return line[:limit]


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
        return one_line(": ".join(parts))


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


EXIT_STDOUT_CLOSED = 141  # as a shell reports a writer ended by SIGPIPE (`yes | head -1`)


def one_line(text: str) -> str:
    """``text`` on one line (paths may hold newlines; a message never spans two lines)."""
    return " ".join(str(text).splitlines()) if text else ""


class CliParser(argparse.ArgumentParser):
    """The parser every command line uses: an argument error is one line naming the problem and a
    second with the ``--help`` hint, exit code 2; no usage block, nothing printed or written before."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {one_line(message)}", file=sys.stderr)
        print(f"see: {self.prog} --help", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush cannot fail (and print a traceback) again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed too: the exit code is all that is left
        pass


def _stdout_failure(err: OSError) -> int:
    """A closed pipe (``| head -1``) ends quietly; any other write failure (a full disk) is one line."""
    _silence_stdout()
    if isinstance(err, BrokenPipeError) or err.errno == errno.EPIPE:
        return EXIT_STDOUT_CLOSED
    _say(f"error: cannot write the results to stdout ({err.strerror or err})")
    return EXIT_BAD_INPUT


def _flush_stdout() -> None:
    if sys.stdout is not None and not sys.stdout.closed:
        sys.stdout.flush()


def exit_on_input_error(main: F) -> F:
    """Decorate a CLI ``main`` (every command line passes through it): InputError -> one stderr line
    and exit code 2; stdout closed early -> a quiet exit; stdout or an output file that cannot be
    written (a full disk, a vanished folder) -> one line naming it, exit code 2. Never a traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int | None:
        try:
            result = main(*args, **kwargs)
            _flush_stdout()  # a full or closed stdout fails here, not in the interpreter's exit
            return result
        except InputError as err:
            _say(f"error: {err.one_line()}")
            raise SystemExit(EXIT_BAD_INPUT) from None
        except BrokenPipeError as err:
            raise SystemExit(_stdout_failure(err)) from None
        except OSError as err:
            if _is_stdout_error(err):
                raise SystemExit(_stdout_failure(err)) from None
            where = f": {one_line(err.filename)}" if err.filename else ""
            _say(f"error: cannot write or read{where} ({err.strerror or err})")
            raise SystemExit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


def _is_stdout_error(err: OSError) -> bool:
    """An OSError without a file name raised while flushing stdout (ENOSPC on a full device)."""
    if err.filename is not None or sys.stdout is None:
        return False
    try:
        sys.stdout.flush()
    except OSError:
        return True
    except ValueError:
        return False
    return err.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG)


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
        value = json.loads(text)
    except json.JSONDecodeError as err:
        at = f"{where}: " if where else ""
        raise InputError(f"{at}invalid JSON ({err.msg} at line {err.lineno})", path) from None
    except RecursionError:
        raise InputError(f"{where + ': ' if where else ''}JSON nested too deeply", path) from None
    # JSON may spell a lone UTF-16 surrogate (\ud800) that no UTF-8 file, XML or terminal can hold:
    # refused here, once, rather than as an encoding traceback wherever the string is written.
    if _SURROGATE_ESCAPE.search(text if isinstance(text, str) else text.decode("utf-8", "replace")):
        bad = _lone_surrogate(value)
        if bad is not None:
            raise InputError(
                f"{where + ': ' if where else ''}a string holds a lone surrogate "
                f"(\\u{ord(bad):04x}), which is not text",
                path,
            )
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(value: object) -> str | None:
    """The first lone surrogate in any string (key or value) of parsed JSON, else None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            for ch in item:
                if 0xD800 <= ord(ch) <= 0xDFFF:
                    return ch
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


class DeprecatedAlias(argparse.Action):
    """An old option name that still works for one release and says so once on stderr."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"note: {option_string} is deprecated; use --{self.dest} (the old name goes in the next release)",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)
