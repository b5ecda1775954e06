"""Prompt building and token spans for the alignment head.

One prompt layout serves every stage: the domain stage (emrQA contexts split into
sentences), the task stage and inference. Note sentences are always numbered by
their own ids as ``[id] text``, one per line. The answer follows the chat template's
generation prompt (thinking disabled), so what the model is trained on is exactly
what it sees at generation time.

:func:`encode_example` returns token ids, LM labels (answer tokens only) and, for
every note sentence and answer sentence, its ``[start, end)`` token span, computed
from the fast tokenizer's offset mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .records import Case

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SYSTEM_PROMPT = (
    "You are a clinician answering a patient's question about their hospital stay. "
    "Use only the numbered sentences of the clinical note. Answer in plain language, "
    "in at most 75 words."
)
IGNORE_INDEX = -100
# The Qwen chat format closes an assistant turn with this (what the template appends
# after the content); the model learns to emit it so generation stops by itself.
END_OF_TURN = "<|im_end|>\n"


@dataclass
class PromptExample:
    """Text-level example: question, numbered note sentences, optional answer sentences."""

    example_id: str
    question: str
    note_ids: list[str]
    note_texts: list[str]
    clinician_question: str = ""
    answer_ids: list[str] = field(default_factory=list)
    answer_texts: list[str] = field(default_factory=list)
    # Gold (answer_id, note_id) pairs, for the alignment loss; empty = LM loss only.
    pairs: set[tuple[str, str]] = field(default_factory=set)

    @property
    def answer(self) -> str:
        return " ".join(t.strip() for t in self.answer_texts if t.strip())


@dataclass
class EncodedExample:
    example_id: str
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    note_ids: list[str]
    note_spans: list[tuple[int, int]]
    answer_ids: list[str]
    answer_spans: list[tuple[int, int]]
    pairs: set[tuple[str, str]] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.input_ids)

    def pair_targets(self) -> list[list[float]]:
        """[answer][note] 0/1 matrix of gold links, in span order."""
        return [[1.0 if (a, n) in self.pairs else 0.0 for n in self.note_ids] for a in self.answer_ids]


def example_from_case(case: Case, with_answer: bool = True) -> PromptExample:
    answers = case.answer_sentences if with_answer else []
    return PromptExample(
        example_id=case.case_id,
        question=case.question_text,
        clinician_question=case.clinician_question,
        note_ids=case.note_ids,
        note_texts=[s.text for s in case.note_sentences],
        answer_ids=[a.sentence_id for a in answers],
        answer_texts=[a.text for a in answers],
        pairs=case.gold_pairs() if with_answer else set(),
    )


def user_message(ex: PromptExample) -> tuple[str, list[tuple[int, int]]]:
    """The user turn and the character span of each note sentence's text within it."""
    head = f"Patient question: {ex.question.strip()}\n"
    if ex.clinician_question.strip():
        head += f"Clinician question: {ex.clinician_question.strip()}\n"
    head += "Clinical note sentences:\n"
    parts = [head]
    spans = []
    pos = len(head)
    for sid, text in zip(ex.note_ids, ex.note_texts):
        prefix = f"[{sid}] "
        body = " ".join(text.split())
        spans.append((pos + len(prefix), pos + len(prefix) + len(body)))
        line = prefix + body + "\n"
        parts.append(line)
        pos += len(line)
    tail = "Answer the patient's question in at most 75 words."
    parts.append(tail)
    return "".join(parts), spans


def chat_prompt(tokenizer: PreTrainedTokenizerBase, ex: PromptExample) -> tuple[str, list[tuple[int, int]]]:
    """Generation prompt (chat template, thinking off) and note-sentence char spans in it."""
    user, spans = user_message(ex)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert isinstance(text, str)  # tokenize=False: the template's text
    offset = text.find(user)
    if offset < 0:  # a template that rewrites content would break every span below
        raise ValueError("chat template altered the user message; cannot locate note sentences")
    return text, [(s + offset, e + offset) for s, e in spans]


class _TokenOffsets:
    """Token character offsets as arrays: a span's tokens in one vectorised comparison (a
    Python scan per span was most of the time of encoding a case)."""

    def __init__(self, offsets: list[tuple[int, int]]):
        pairs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        self.starts, self.ends = pairs[:, 0], pairs[:, 1]
        self.nonempty = self.ends != self.starts

    def span(self, start: int, end: int) -> tuple[int, int]:
        """[first, last + 1) of the non-empty tokens overlapping characters [start, end)."""
        hit = np.flatnonzero(self.nonempty & (self.ends > start) & (self.starts < end))
        if hit.size == 0:
            raise ValueError(f"no token covers characters [{start}, {end})")
        return int(hit[0]), int(hit[-1]) + 1


def with_answer_text(prompt: str, ex: PromptExample) -> tuple[str, list[tuple[int, int]]]:
    """The prompt followed by the answer sentences and end-of-turn, and each answer's char span."""
    if not ex.answer_texts:
        return prompt, []
    pos = len(prompt)
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    for t in ex.answer_texts:
        body = " ".join(t.split())
        if pieces:
            pos += 1  # the joining space
        spans.append((pos, pos + len(body)))
        pieces.append(body)
        pos += len(body)
    return prompt + " ".join(pieces) + END_OF_TURN, spans


def encode_example(
    tokenizer: PreTrainedTokenizerBase, ex: PromptExample, max_length: int | None = None, with_answer: bool = True
) -> EncodedExample:
    """Tokenise prompt (+ answer + end-of-turn) and locate every sentence span."""
    return encode_examples(tokenizer, [ex], max_length, [with_answer])[0]


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[PromptExample],
    max_length: int | None = None,
    with_answer: Sequence[bool] | None = None,
) -> list[EncodedExample]:
    """:func:`encode_example` for many examples in one tokenizer call (the fast tokenizer
    encodes a batch on several threads); ``with_answer`` per example (default: all)."""
    texts, char_spans = [], []
    wants = list(with_answer) if with_answer is not None else [True] * len(examples)
    for ex, want in zip(examples, wants):
        prompt, note_char_spans = chat_prompt(tokenizer, ex)
        text, answer_char_spans = with_answer_text(prompt, ex) if want else (prompt, [])
        texts.append(text)
        char_spans.append((len(prompt), note_char_spans, answer_char_spans))
    if not texts:
        return []
    batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [
        _encoded(ex, want, ids, offsets, *spans, max_length)
        for ex, want, ids, offsets, spans in zip(
            examples, wants, batch["input_ids"], batch["offset_mapping"], char_spans
        )
    ]


def _encoded(
    ex: PromptExample,
    with_answer: bool,
    ids: list[int],
    offsets: list[tuple[int, int]],
    prompt_chars: int,
    note_char_spans: list[tuple[int, int]],
    answer_char_spans: list[tuple[int, int]],
    max_length: int | None,
) -> EncodedExample:
    # The first token that starts at or after the prompt's end: robust to a BPE merge
    # across the boundary, which re-tokenising the prompt alone would miss.
    token_offsets = _TokenOffsets(offsets)
    after = np.flatnonzero(token_offsets.starts >= prompt_chars)
    prompt_len = int(after[0]) if after.size else len(ids)
    if max_length is not None and len(ids) > max_length:
        raise ValueError(
            f"example {ex.example_id}: {len(ids)} tokens exceeds max_length={max_length}; "
            "raise max_length in the config"
        )
    labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
    return EncodedExample(
        example_id=ex.example_id,
        input_ids=list(ids),
        labels=labels if with_answer and ex.answer_texts else [IGNORE_INDEX] * len(ids),
        prompt_length=prompt_len,
        note_ids=list(ex.note_ids),
        note_spans=[token_offsets.span(s, e) for s, e in note_char_spans],
        answer_ids=list(ex.answer_ids) if with_answer else [],
        answer_spans=[token_offsets.span(s, e) for s, e in answer_char_spans],
        pairs=set(ex.pairs) if with_answer else set(),
    )


@dataclass(frozen=True)
class NoteCut:
    """A case whose note did not fit the model's context: only its first ``kept`` sentences are read."""

    case_id: str
    note_sentences: int
    kept: int
    tokens: int  # the whole case's tokens (prompt + answer or generation budget)
    limit: int

    def to_json(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "note_sentences": self.note_sentences,
            "kept": self.kept,
            "tokens": self.tokens,
            "limit": self.limit,
        }

    def message(self) -> str:
        return (
            f"case {self.case_id}: {self.tokens} tokens exceed the limit of {self.limit}; only the first "
            f"{self.kept} of {self.note_sentences} note sentences are read (the rest are predicted not "
            f"relevant and never cited)"
        )


def case_tokens(tokenizer: PreTrainedTokenizerBase, case: Case, reserve: int) -> int:
    """Tokens a case needs: its prompt plus ``reserve`` generated tokens, or prompt + answer if longer."""
    ex = example_from_case(case, with_answer=True)
    prompt, _ = chat_prompt(tokenizer, ex)
    full, _ = with_answer_text(prompt, ex)

    def count(text: str) -> int:  # verbose=False: no "longer than the model" notice; that is the point here
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    return max(count(prompt) + reserve, count(full) if full != prompt else 0)


def keep_note_sentences(case: Case, k: int) -> Case:
    """``case`` with its first ``k`` note sentences (citations of the others dropped)."""
    from dataclasses import replace

    kept = case.note_sentences[:k]
    ids = {s.sentence_id for s in kept}
    answers = [replace(a, citations=tuple(c for c in a.citations if c in ids)) for a in case.answer_sentences]
    relevance = {sid: label for sid, label in case.relevance.items() if sid in ids}
    return replace(case, note_sentences=kept, answer_sentences=answers, relevance=relevance)


def fit_case(
    tokenizer: PreTrainedTokenizerBase, case: Case, limit: int, reserve: int = 0
) -> tuple[Case, NoteCut | None]:
    """``case`` cut to the longest prefix of its note that fits ``limit`` tokens (with ``reserve`` to
    generate); unchanged (and no :class:`NoteCut`) when it fits whole. A case that cannot fit even
    with one note sentence raises ValueError (the CLI's one line)."""
    tokens = case_tokens(tokenizer, case, reserve)
    if tokens <= limit:
        return case, None
    n = len(case.note_sentences)

    def fits(k: int) -> bool:
        return case_tokens(tokenizer, keep_note_sentences(case, k), reserve) <= limit

    # The largest k in [1, n-1] that fits, by bisection between bounds found from the average
    # sentence length (a 100k-token note is tokenised a handful of times, not twenty).
    lo, hi = 0, min(n - 1, max(1, 2 * n * limit // tokens))  # fits(lo) (or lo = 0); the answer <= hi
    while hi < n - 1 and fits(hi):
        lo, hi = hi, min(n - 1, 2 * hi)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise ValueError(
            f"case {case.case_id}: even one note sentence with the question and answer needs more than {limit} tokens"
        )
    return keep_note_sentences(case, lo), NoteCut(case.case_id, n, lo, tokens, limit)
