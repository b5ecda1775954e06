"""Prompt building with the real Qwen3 tokenizer: spans, labels, thinking disabled."""

from __future__ import annotations

from pathlib import Path

from data.archehr import load_cases
from data.emrqa import emrqa_to_prompt_example, load_emrqa
from data.prompts import IGNORE_INDEX, chat_prompt, encode_example, encode_examples, example_from_case

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _cases():
    return load_cases(EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json")


def _decoded(tok, ids, span):
    start, end = span
    assert 0 <= start < end <= len(ids)
    return tok.decode(ids[start:end]).strip()


def test_spans_decode_to_sentence_texts(qwen_tokenizer):
    for case in _cases():
        ex = example_from_case(case)
        enc = encode_example(qwen_tokenizer, ex)
        assert enc.note_ids == case.note_ids and enc.answer_ids == case.answer_ids
        assert len(enc.note_spans) == len(case.note_sentences)
        for span, sent in zip(enc.note_spans, case.note_sentences):
            assert _decoded(qwen_tokenizer, enc.input_ids, span) == " ".join(sent.text.split())
        for span, ans in zip(enc.answer_spans, case.answer_sentences):
            assert span[0] >= enc.prompt_length  # answers live after the prompt
            assert _decoded(qwen_tokenizer, enc.input_ids, span) == " ".join(ans.text.split())
        assert enc.pairs == case.gold_pairs()


def test_labels_mask_prompt_and_copy_answer(qwen_tokenizer):
    ex = example_from_case(_cases()[0])
    enc = encode_example(qwen_tokenizer, ex)
    p = enc.prompt_length
    assert 0 < p < len(enc)
    assert enc.labels[:p] == [IGNORE_INDEX] * p
    assert enc.labels[p:] == enc.input_ids[p:]
    assert qwen_tokenizer.decode(enc.input_ids[p:]).strip().endswith("<|im_end|>")
    # Without the answer nothing is learned from the prompt.
    bare = encode_example(qwen_tokenizer, ex, with_answer=False)
    assert set(bare.labels) == {IGNORE_INDEX} and bare.answer_spans == []


def test_generation_prompt_has_thinking_disabled(qwen_tokenizer):
    ex = example_from_case(_cases()[1], with_answer=False)
    text, spans = chat_prompt(qwen_tokenizer, ex)
    assert "<think>\n\n</think>" in text
    assert text.rstrip().endswith("</think>")
    for (start, end), sid, sentence in zip(spans, ex.note_ids, ex.note_texts):
        assert text[start:end] == " ".join(sentence.split())
        prefix = f"[{sid}] "  # sentences are numbered by their own ids
        assert text[start - len(prefix) : start] == prefix


def test_emrqa_example_encodes(qwen_tokenizer):
    rec = load_emrqa(EXAMPLES / "emrqa_sample.jsonl")[0]
    ex = emrqa_to_prompt_example(rec)
    enc = encode_example(qwen_tokenizer, ex)
    for span, text in zip(enc.note_spans, ex.note_texts):
        assert _decoded(qwen_tokenizer, enc.input_ids, span) == text
    assert _decoded(qwen_tokenizer, enc.input_ids, enc.answer_spans[0]) == rec.answer_text


def test_batch_encoding_equals_one_at_a_time(qwen_tokenizer):
    """One tokenizer call for many examples (what the fast engine and training data use) gives
    each example exactly what encoding it alone gives, with and without its answer."""
    cases = _cases()
    examples = [example_from_case(c, with_answer=w) for c in cases for w in (True, False)]
    wants = [w for _ in cases for w in (True, False)]
    batch = encode_examples(qwen_tokenizer, examples, with_answer=wants)
    alone = [encode_example(qwen_tokenizer, ex, with_answer=w) for ex, w in zip(examples, wants)]
    assert batch == alone and len(batch) == 2 * len(cases)
    assert any(enc.answer_spans for enc in batch) and any(not enc.answer_spans for enc in batch)
    assert encode_examples(qwen_tokenizer, []) == []
