"""emrQA-MedSQuAD loader (SQuAD v2 records) for the domain-adaptation stage.

A record has ``id``, ``title``, ``context``, ``question`` and
``answers: {"text": [...], "answer_start": [...]}``; the first answer is used.

Sources: a local ``.jsonl`` / ``.json`` file (read with :mod:`json`, no ``datasets``
needed), a local ``.parquet`` file, or a datasets hub id such as ``Eladio/emrqa-msquad``
(both through ``datasets.load_dataset``, imported only then). A ``.json`` file may hold a
list of records, ``{"data": [records]}``, or the nested SQuAD layout
(``data -> paragraphs -> qas``).

Unanswerable questions (empty ``answers.text``), rule ``unanswerable=``:

* ``"abstain"`` (default): kept, with the fixed target :data:`ABSTAIN_ANSWER`, so the
  model learns to say the note does not hold the answer instead of inventing one;
* ``"skip"``: dropped.

The rule is applied first, then ``n`` records are sampled with ``random.Random(seed)``
and returned in their file order (the same ``n`` and ``seed`` always give the same set).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from plumbing.errors import InputError, parse_json, read_text_file
from .prompts import PromptExample
from .sentences import split_sentences

ABSTAIN_ANSWER = "The note does not contain this information."
UNANSWERABLE_RULES = ("abstain", "skip")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class EmrqaRecord:
    id: str
    title: str
    context: str
    question: str
    answer_text: str
    answer_start: int  # -1 for unanswerable records
    answerable: bool


def _record(raw: object, where: str | Path, index: int) -> EmrqaRecord:
    """One validated record; ``where`` names the file (or hub id) for error messages."""
    if not isinstance(raw, dict):
        raise InputError(f"record {index}: not an object", where)
    rid = raw.get("id", f"#{index}")
    rid = str(rid) if isinstance(rid, (str, int)) else f"#{index}"

    def bad(problem: str) -> InputError:
        return InputError(f"record {rid}: {problem}", where)

    context, question = raw.get("context"), raw.get("question")
    if not isinstance(context, str) or not context.strip():
        raise bad("'context' must be a non-empty string")
    if not isinstance(question, str) or not question.strip():
        raise bad("'question' must be a non-empty string")
    title = raw.get("title") or ""
    if not isinstance(title, str):
        raise bad("'title' must be a string")
    answers = raw.get("answers")
    if not isinstance(answers, dict):
        raise bad("'answers' must be an object with 'text' and 'answer_start'")
    texts, starts = answers.get("text"), answers.get("answer_start")
    if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
        raise bad("'answers.text' and 'answers.answer_start' must be lists of equal length")
    if not texts:
        return EmrqaRecord(rid, title, context, question, ABSTAIN_ANSWER, -1, False)
    text, start = texts[0], starts[0]
    if not isinstance(text, str) or not text.strip():
        raise bad("answer text must be a non-empty string")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < len(context):
        raise bad(f"answer_start {start!r} is not a position in the context")
    return EmrqaRecord(rid, title, context, question, text.strip(), start, True)


def _json_records(data: object, path: Path) -> Iterator[object]:
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise InputError('expected a list of records or {"data": [...]}', path)
    for item in data:
        if isinstance(item, dict) and "paragraphs" in item:  # nested SQuAD layout
            for para in item.get("paragraphs") or []:
                if not isinstance(para, dict):
                    raise InputError("a paragraph is not an object", path)
                for qa in para.get("qas") or []:
                    if not isinstance(qa, dict):
                        raise InputError("a 'qas' entry is not an object", path)
                    answers = qa.get("answers") or []
                    if not isinstance(answers, list):
                        raise InputError(f"record {qa.get('id')}: 'answers' must be a list", path)
                    yield {
                        "id": qa.get("id"),
                        "title": item.get("title", ""),
                        "context": para.get("context"),
                        "question": qa.get("question"),
                        "answers": {
                            "text": [a.get("text") if isinstance(a, dict) else None for a in answers],
                            "answer_start": [a.get("answer_start") if isinstance(a, dict) else None for a in answers],
                        },
                    }
        else:
            yield item


def _read_local_json(path: Path) -> Iterator[object]:
    text = read_text_file(path)
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            yield parse_json(line, path, f"line {lineno}")
        return
    data = parse_json(text, path)
    yield from _json_records(data, path)


def _read_with_datasets(source: str, split: str, local: bool) -> Iterable[object]:
    try:
        import datasets
    except ImportError:
        raise InputError("reading parquet files or hub ids needs the 'datasets' package", source) from None
    try:
        if local:
            return datasets.load_dataset("parquet", data_files=str(source), split=split)
        return datasets.load_dataset(source, split=split)
    except Exception as err:  # missing hub id, offline, bad parquet, unknown split: one clear line
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(f"could not load with datasets ({type(err).__name__}: {message})", source) from None


def load_emrqa(
    source: str | Path,
    n: int | None = None,
    seed: int = 0,
    unanswerable: str = "abstain",
    split: str = "train",
) -> list[EmrqaRecord]:
    """Records from ``source`` with the unanswerable rule applied, ``n`` sampled with ``seed``."""
    if unanswerable not in UNANSWERABLE_RULES:
        raise ValueError(f"unanswerable must be one of {UNANSWERABLE_RULES}, not {unanswerable!r}")
    if n is not None and n < 0:
        raise ValueError("n must be >= 0")
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        if path.stat().st_size == 0:
            raise InputError("file is empty", path)
        raw: Iterable[object] = (
            _read_with_datasets(str(path), split, local=True) if suffix == ".parquet" else _read_local_json(path)
        )
        where: str | Path = path
    elif suffix in LOCAL_SUFFIXES or path.is_dir():
        raise InputError("file not found" if not path.is_dir() else "is a directory, not a file", path)
    else:
        raw, where = _read_with_datasets(str(source), split, local=False), str(source)
    records = [_record(r, where, i) for i, r in enumerate(raw)]
    if unanswerable == "skip":
        records = [r for r in records if r.answerable]
    if n is not None and n < len(records):
        chosen = sorted(random.Random(seed).sample(range(len(records)), n))
        records = [records[i] for i in chosen]
    return records


def emrqa_to_prompt_example(rec: EmrqaRecord) -> PromptExample:
    """The context as numbered sentences ("1".."n"), the answer as one answer sentence."""
    sentences = split_sentences(rec.context)
    return PromptExample(
        example_id=rec.id,
        question=rec.question,
        note_ids=[str(i) for i in range(1, len(sentences) + 1)],
        note_texts=sentences,
        answer_ids=["1"],
        answer_texts=[rec.answer_text],
    )
