"""Allowed ranges of numbers a user gives: one factory for CLI options and config fields.

A :class:`Range` says what a number may be (integer or finite float, lower and upper bound,
open or closed) in words a user reads (``an integer in [1, 8192]``); it tells whether a value
is in range (:meth:`Range.contains`), parses command-line text (:meth:`Range.parse`), serves as an argparse
``type=`` (:meth:`Range.argtype`, refused with the words) and appends itself to an option's
``--help`` (:meth:`Range.help`). ``training/validation.py`` builds its TrainConfig rules from
the same factory, so ``train.py``, ``infer.py`` and ``score.py`` refuse out-of-range numbers
with the same words, before any work starts. Every bound is finite: a number that would hang
or overflow a run (``--max-new-tokens 1e9``, ``--epochs 1e309``, seed ``2**32``) is refused.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

# numpy / torch seeds are unsigned 32-bit.
SEED_MAX = 2**32 - 1
_INT_TEXT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class Range:
    integer: bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""  # what a special value means, e.g. "0 = all"

    def contains(self, x: object) -> bool:
        """``x`` is a number of the right kind (never a bool, nan or inf) within the bounds."""
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        if self.integer and not isinstance(x, int):
            return False
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        if self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi):
            return False
        return True

    def words(self) -> str:
        """Completes "--name must be ...": ``an integer in [1, 8192]``, ``a finite number > 0``."""
        kind = "an integer" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            span = f" in {'(' if self.lo_open else '['}{_fmt(self.lo)}, {_fmt(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            span = f" {'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        elif self.hi is not None:
            span = f" {'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        else:
            span = ""
        return kind + span + (f" ({self.note})" if self.note else "")

    def parse(self, text: str) -> int | float:
        """Command-line text -> the number, or ValueError in the range's words.

        Integers may be written in exponent form when whole (``1e3``); anything else that
        is not a number in range (``1e309``, ``nan``, ``2.5`` for an integer) is refused.
        """
        raw = str(text).strip()
        value: int | float | None = None
        try:
            if self.integer:
                if _INT_TEXT.match(raw):
                    value = int(raw)
                else:
                    f = float(raw)
                    value = int(f) if math.isfinite(f) and f.is_integer() else None
            else:
                value = float(raw)
        except (ValueError, OverflowError):
            value = None
        if value is None or not self.contains(value):
            raise ValueError(f"must be {self.words()}, got {text!r}")
        return value

    def argtype(self) -> Callable[[str], Any]:
        """An argparse ``type=``: refuses with the range's words (argparse names the option)."""

        def parse(text: str) -> int | float:
            try:
                return self.parse(text)
            except ValueError as err:
                raise argparse.ArgumentTypeError(str(err)) from None

        parse.__name__ = "integer" if self.integer else "number"  # argparse's fallback wording
        return parse

    def help(self, text: str = "") -> str:
        """``text`` plus the range, for an option's ``--help`` line."""
        return f"{text}; {self.words()}" if text else self.words()

    def option(self, text: str = "") -> dict[str, Any]:
        """``type=`` and ``help=`` for ``add_argument``: ``p.add_argument("--steps", **STEPS.option("..."))``."""
        return {"type": self.argtype(), "help": self.help(text)}


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def integer(lo: int | None = None, hi: int | None = None, note: str = "") -> Range:
    return Range(True, lo, hi, note=note)


def number(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False, note: str = ""
) -> Range:
    return Range(False, lo, hi, lo_open, hi_open, note)


# Shared by every CLI that takes them (one source for each bound).
SEED = integer(0, SEED_MAX)
PROBABILITY = number(0, 1)
# Answers are at most 75 words (about 100 tokens); 8192 leaves room for any experiment and
# stops a typo from decoding for hours.
MAX_NEW_TOKENS = integer(1, 8192)
DEFAULT_NEW_TOKENS = 100  # the generation budget every CLI and engine starts from
GENERATION_BATCH = integer(1, 4096)
PROMPT_TOKENS = integer(256, 1_048_576)
MEMORY_GB = number(0, 4096, lo_open=True)
LINKS_PER_ANSWER = integer(1, 10_000)
FOLDS = integer(1, 100_000, note="1 = train and score on every case, refused without --allow-train-cases")
RESAMPLES = integer(1, 100_000)
