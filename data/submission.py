"""The organizers' submission formats for Subtasks 2, 3 and 4: build, validate, write, read.

Subtask 2: ``[{"case_id": "121", "prediction": ["3", "5"]}, ...]``; the note sentence
ids judged relevant (possibly none), each a string that exists in that case, no repeats.

Subtask 3: ``[{"case_id": "121", "prediction": "answer text"}, ...]``; the prediction is
a non-empty string of at most 75 whitespace-separated words with no citation markers and
at least one 13a token (the official BLEU crashes on e.g. ``"<skipped>"``).
Subtask 4: ``[{"case_id": "121", "prediction": [{"answer_id": "1", "evidence_id": ["3"]}]}]``;
every answer sentence of the case listed exactly once (``[]`` where unsupported), every
id a string that exists in that case.

Each submission is written as ``subtask{N}/submission.json`` plus ``subtask{N}.zip`` that
holds ``submission.json`` at its root (what the leaderboard expects). Validation happens
before anything touches the disk, and every file is written to a temporary name in the
same directory and renamed, so a failure never leaves a partial file behind.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import json
import re
import zipfile
import zlib
from pathlib import Path

from plumbing.atomic import atomic_write
from plumbing.errors import InputError, check_input_file, parse_json
from .records import Case

MAX_WORDS = 75
SUBMISSION_NAME = "submission.json"
# A real submission is well under 1 MB; refuse to inflate anything far bigger or a zip
# bomb (a member that decompresses to over MAX_RATIO times its stored size).
MAX_SUBMISSION_BYTES = 64 * 2**20
MAX_RATIO = 200

# "|3|", "|3,5|", "[3]", "[3, 7a]": the citation styles of the key and of common prompts.
_ID = r"[0-9][0-9A-Za-z]*"
CITATION_MARKER = re.compile(rf"\|\s*{_ID}(?:\s*,\s*{_ID})*\s*\||\[\s*{_ID}(?:\s*,\s*{_ID})*\s*\]")
_SENTENCE_END = re.compile(r"""[.!?]["')\]]*$""")


def strip_citation_markers(text: str) -> str:
    """``text`` without "[3]" / "|3|"-style markers (which a Subtask 3 answer may not hold),
    whitespace collapsed. For text we generate or extract from notes, never the user's input."""
    return " ".join(CITATION_MARKER.sub(" ", text).split())


def count_words(text: str) -> int:
    """Whitespace-separated words, the unit of the official 75-word limit."""
    return len(text.split())


def has_13a_tokens(text: str) -> bool:
    """False when the 13a tokenizer of the official BLEU leaves nothing (``"<skipped>"``,
    ``"-\\n"``): the organizers' scorer divides by zero on such a prediction."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return bool(Tokenizer13a()(text).split())  # type: ignore[no-untyped-call]  # sacrebleu is untyped


def truncate_words(text: str, max_words: int = MAX_WORDS) -> str:
    """At most ``max_words`` words, ending on a sentence boundary when the kept part has one.

    Text within the limit is returned unchanged. Longer text is cut after the last kept
    word that ends a sentence (``.``, ``!``, ``?``); with no such word, after
    ``max_words`` words. Never empty for non-empty input.
    """
    if max_words < 1:
        raise ValueError("max_words must be at least 1")
    words = text.split()
    if len(words) <= max_words:
        return text
    kept = words[:max_words]
    last_end = max((i for i, w in enumerate(kept) if _SENTENCE_END.search(w)), default=-1)
    if last_end >= 0:
        kept = kept[: last_end + 1]
    return " ".join(kept)


def subtask3_entries(answers: dict[str, str]) -> list[dict[str, Any]]:
    """Subtask 3 entries, in the dict's order."""
    return [{"case_id": str(case_id), "prediction": text} for case_id, text in answers.items()]


def subtask4_entries(links: dict[str, dict[str, list[str]]]) -> list[dict[str, Any]]:
    """Subtask 4 entries from ``case_id -> answer_id -> evidence ids``, in the given order."""
    return [
        {
            "case_id": str(case_id),
            "prediction": [
                {"answer_id": str(answer_id), "evidence_id": [str(e) for e in evidence]}
                for answer_id, evidence in per_answer.items()
            ],
        }
        for case_id, per_answer in links.items()
    ]


def subtask2_entries(evidence: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Subtask 2 entries from ``case_id -> relevant note sentence ids``, in the given order."""
    return [{"case_id": str(case_id), "prediction": [str(s) for s in ids]} for case_id, ids in evidence.items()]


def check_entry_types(entries: object, subtask: int, path: str | Path | None = None) -> list[dict[str, Any]]:
    """Structural check (JSON types only, no case knowledge); returns the entries."""
    if subtask not in (2, 3, 4):
        raise ValueError(f"subtask must be 2, 3 or 4, not {subtask!r}")
    if not isinstance(entries, list):
        raise InputError("submission must be a JSON list of entries", path)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"entry {i} is not an object", path)
        case_id = entry.get("case_id")
        if not isinstance(case_id, str) or not case_id:
            raise InputError(f"entry {i}: case_id must be a non-empty string, got {case_id!r}", path)
        if "prediction" not in entry:
            raise InputError("entry has no 'prediction'", path, case_id)
        prediction = entry["prediction"]
        if subtask == 3:
            if not isinstance(prediction, str):
                raise InputError("prediction must be a string", path, case_id)
            continue
        if subtask == 2:
            if not isinstance(prediction, list):
                raise InputError("prediction must be a list of sentence ids", path, case_id)
            for s in prediction:
                if not isinstance(s, str) or not s:
                    raise InputError(f"sentence id {s!r} is not a string id", path, case_id)
            continue
        if not isinstance(prediction, list):
            raise InputError("prediction must be a list of {answer_id, evidence_id}", path, case_id)
        for item in prediction:
            if not isinstance(item, dict):
                raise InputError("each prediction item must be an object", path, case_id)
            answer_id = item.get("answer_id")
            if not isinstance(answer_id, str) or not answer_id:
                raise InputError(f"answer_id must be a non-empty string, got {answer_id!r}", path, case_id)
            evidence = item.get("evidence_id")
            if not isinstance(evidence, list):
                raise InputError(f"answer {answer_id}: evidence_id must be a list", path, case_id)
            for e in evidence:
                if not isinstance(e, str) or not e:
                    raise InputError(f"answer {answer_id}: evidence id {e!r} is not a string id", path, case_id)
    return entries


def _check_case_set(entries: list[dict[str, Any]], cases: list[Case], path: str | Path | None) -> dict[str, Case]:
    by_id = {c.case_id: c for c in cases}
    seen: set[str] = set()
    for entry in entries:
        cid = entry["case_id"]
        if cid in seen:
            raise InputError("case listed twice", path, cid)
        if cid not in by_id:
            raise InputError("case is not among the cases", path, cid)
        seen.add(cid)
    missing = [cid for cid in by_id if cid not in seen]
    if missing:
        raise InputError(f"case missing from the submission ({len(missing)} missing)", path, missing[0])
    return by_id


def validate_subtask2(entries: object, cases: list[Case], path: str | Path | None = None) -> None:
    """Raise :class:`InputError` unless ``entries`` is a valid Subtask 2 submission for ``cases``."""
    checked = check_entry_types(entries, 2, path)
    by_id = _check_case_set(checked, cases, path)
    for entry in checked:
        case = by_id[entry["case_id"]]
        ids = entry["prediction"]
        if len(set(ids)) != len(ids):
            raise InputError("duplicate sentence ids", path, case.case_id)
        note_ids = set(case.note_ids)
        for s in ids:
            if s not in note_ids:
                raise InputError(f"unknown sentence id {s!r}", path, case.case_id)


def validate_subtask3(entries: object, cases: list[Case], path: str | Path | None = None) -> None:
    """Raise :class:`InputError` unless ``entries`` is a valid Subtask 3 submission for ``cases``."""
    checked = check_entry_types(entries, 3, path)
    _check_case_set(checked, cases, path)
    for entry in checked:
        cid, text = entry["case_id"], entry["prediction"]
        if not text.strip():
            raise InputError("prediction is empty", path, cid)
        if not has_13a_tokens(text):
            raise InputError(
                "prediction has no tokens after 13a tokenization (the official scorer would crash on it)", path, cid
            )
        n = count_words(text)
        if n > MAX_WORDS:
            raise InputError(f"prediction has {n} words, more than {MAX_WORDS}", path, cid)
        marker = CITATION_MARKER.search(text)
        if marker:
            raise InputError(f"prediction contains a citation marker {marker.group(0)!r}", path, cid)


def validate_subtask4(entries: object, cases: list[Case], path: str | Path | None = None) -> None:
    """Raise :class:`InputError` unless ``entries`` is a valid Subtask 4 submission for ``cases``."""
    checked = check_entry_types(entries, 4, path)
    by_id = _check_case_set(checked, cases, path)
    for entry in checked:
        case = by_id[entry["case_id"]]
        cid = case.case_id
        answer_ids = set(case.answer_ids)
        note_ids = set(case.note_ids)
        listed: set[str] = set()
        for item in entry["prediction"]:
            aid = item["answer_id"]
            if aid not in answer_ids:
                raise InputError(f"unknown answer_id {aid!r}", path, cid)
            if aid in listed:
                raise InputError(f"answer_id {aid!r} listed twice", path, cid)
            listed.add(aid)
            evidence = item["evidence_id"]
            if len(set(evidence)) != len(evidence):
                raise InputError(f"answer {aid}: duplicate evidence ids", path, cid)
            for e in evidence:
                if e not in note_ids:
                    raise InputError(f"answer {aid}: unknown evidence id {e!r}", path, cid)
        missing = [a for a in case.answer_ids if a not in listed]
        if missing:
            raise InputError(f"answer sentence {missing[0]!r} is not listed", path, cid)


def write_submission(
    entries: list[dict[str, Any]], out_dir: Path, subtask: int, cases: list[Case]
) -> tuple[Path, Path]:
    """Validate, then write ``out_dir/subtask{N}/submission.json`` and ``out_dir/subtask{N}.zip``."""
    if subtask == 2:
        validate_subtask2(entries, cases)
    elif subtask == 3:
        validate_subtask3(entries, cases)
    elif subtask == 4:
        validate_subtask4(entries, cases)
    else:
        raise ValueError(f"subtask must be 2, 3 or 4, not {subtask!r}")
    payload = (json.dumps(entries, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    out_dir = Path(out_dir)
    json_path = out_dir / f"subtask{subtask}" / SUBMISSION_NAME
    zip_path = out_dir / f"subtask{subtask}.zip"
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def write_zip(fh: BinaryIO) -> None:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(SUBMISSION_NAME, payload)

    atomic_write(json_path, lambda fh: fh.write(payload))
    atomic_write(zip_path, write_zip)
    return json_path, zip_path


def _decode(raw: bytes, path: Path) -> object:
    if not raw.strip():
        raise InputError("file is empty", path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", path) from None
    return parse_json(text, path)  # malformed, too deep or a lone surrogate: one line


def _read_zip_member(path: Path) -> bytes:
    """``submission.json`` from the zip root: exactly one such member, size and ratio capped."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if i.filename == SUBMISSION_NAME]
            if not members:
                raise InputError(f"zip has no {SUBMISSION_NAME} at its root", path)
            if len(members) > 1:
                raise InputError(f"zip holds {len(members)} members named {SUBMISSION_NAME}; keep one", path)
            info = members[0]
            if info.flag_bits & 0x1:  # zipfile would ask for a password (RuntimeError)
                raise InputError(f"{SUBMISSION_NAME} in the zip is encrypted; zip it without a password", path)
            if info.file_size > MAX_SUBMISSION_BYTES:
                raise InputError(
                    f"{SUBMISSION_NAME} in the zip is {info.file_size} bytes, more than {MAX_SUBMISSION_BYTES}", path
                )
            if info.file_size > 2**20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise InputError(
                    f"{SUBMISSION_NAME} in the zip expands {info.file_size // max(info.compress_size, 1)}"
                    f"-fold (a zip bomb?)",
                    path,
                )
            with zf.open(info) as fh:  # the header's size may lie: never read past the cap
                raw = fh.read(MAX_SUBMISSION_BYTES + 1)
    except InputError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        EOFError,
        zlib.error,
        OSError,
        RuntimeError,
        ValueError,
    ) as err:  # RuntimeError: encrypted; ValueError: a corrupt header
        detail = str(err).splitlines()[0][:80] if str(err) else type(err).__name__
        raise InputError(f"not a valid zip file ({detail})", path) from None
    if len(raw) > MAX_SUBMISSION_BYTES:
        raise InputError(f"{SUBMISSION_NAME} in the zip is more than {MAX_SUBMISSION_BYTES} bytes", path)
    return raw


def read_submission(path: str | Path, subtask: int) -> list[dict[str, Any]]:
    """Entries of a submission ``.json`` or ``.zip`` (``submission.json`` at the zip root).

    Only JSON types are checked here; check against cases with ``validate_subtask{N}``.
    """
    path = Path(path)
    check_input_file(path)
    if path.suffix.lower() == ".zip":
        raw = _read_zip_member(path)
    else:
        if path.stat().st_size > MAX_SUBMISSION_BYTES:
            raise InputError(f"file is more than {MAX_SUBMISSION_BYTES} bytes; not a submission", path)
        raw = path.read_bytes()
    return check_entry_types(_decode(raw, path), subtask, path)
