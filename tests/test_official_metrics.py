"""Subtask 3 BLEU / ROUGE / SARI equal to the organizers' definitions.

The issue's test vectors, hand-checkable cases, and random submissions scored by
``metrics/`` and by independent implementations written here from the official
definitions (sacrebleu's corpus BLEU with smoothing and effective order off; ROUGE
re-implemented from rouge_score's documented rules; SARI from the EASSE/evaluate
SARIngram definition), agreeing to 1e-6.
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data.archehr import load_cases
from metrics.bleu import EmptyTokenization, case_bleu, tokenize_13a
from metrics.generation import score_generation
from metrics.rouge import case_rouge
from metrics.subtask3 import reference_answer, score_subtask3

ROOT = Path(__file__).resolve().parents[1]
XML = ROOT / "examples" / "archehr-qa.xml"
KEY = ROOT / "examples" / "archehr-qa_key.json"


# --- the test vectors (each differed from our old values)


def test_vector_bleu_yes():
    assert case_bleu("Yes.", "Yes.") == 0.0  # 2 tokens: no 3-grams, unsmoothed BLEU is 0


def test_vector_rouge1_no_stemming():
    assert case_rouge("stone", "stones")["rouge1"] == 0.0


def test_vector_rouge2_no_stemming():
    assert case_rouge("kidney stone", "kidney stones")["rouge2"] == 0.0


def test_vector_rougelsum_no_added_sentence_split():
    r = case_rouge("Fever resolved. Pain improved.", "Pain improved. Fever resolved.")
    assert r["rougeLsum"] == pytest.approx(50.0) and r["rougeL"] == pytest.approx(50.0)


# --- hand-checkable cases


def test_bleu_brevity_penalty():
    # All n-gram precisions are 1; 4 predicted tokens against 8: BP = exp(1 - 8/4).
    assert case_bleu("a b c d", "a b c d e f g h") == pytest.approx(100 * math.exp(-1), abs=1e-12)


def test_bleu_longer_prediction_has_no_penalty():
    # Precisions 4/5, 3/4, 2/3, 1/2: geometric mean (1/5) ** (1/4); ratio > 1 so BP = 1.
    assert case_bleu("a b c d e", "a b c d") == pytest.approx(100 * 0.2**0.25, abs=1e-12)


def test_bleu_zero_ngram_precision_is_zero():
    # Unigrams and bigrams match, but no 3-gram does: the geometric mean is 0, no smoothing.
    assert case_bleu("a b c d e", "a b x d e") == 0.0
    assert case_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)


def test_bleu_13a_tokenization():
    assert tokenize_13a("Take 2.5 mg, twice-daily.") == ["Take", "2.5", "mg", ",", "twice-daily", "."]
    assert tokenize_13a("<skipped>") == [] and tokenize_13a("a &amp; b") == ["a", "&", "b"]
    with pytest.raises(EmptyTokenization):
        case_bleu("<skipped>", "a b c d")


def test_rougelsum_multi_line():
    # Newlines in the texts are the sentence breaks: per-sentence LCS unions recover all 6 tokens.
    r = case_rouge("d e f\na b c", "a b c\nd e f")
    assert r["rougeLsum"] == pytest.approx(100.0)
    assert r["rougeL"] == pytest.approx(50.0)  # plain LCS "a b c" (or "d e f") of 6


def test_unicode():
    # rouge_score keeps only a-z0-9 runs: "café" is "caf", "naïve" is "na ve".
    assert case_rouge("café", "caf")["rouge1"] == pytest.approx(100.0)
    assert case_rouge("café", "cafe")["rouge1"] == 0.0
    assert case_rouge("naïve", "na ve")["rouge2"] == pytest.approx(100.0)
    # 13a leaves letters alone: an identical unicode answer scores 100 BLEU.
    text = "Die Nierensteine sind zurückgegangen, naïve Übung."
    assert case_bleu(text, text) == pytest.approx(100.0)
    assert tokenize_13a("zurückgegangen, naïve") == ["zurückgegangen", ",", "naïve"]


def test_truncation_at_75_words(tmp_path):
    cases = [c for c in load_cases(XML, KEY) if c.has_key]
    words = [f"w{i}" for i in range(80)]
    long_text = " ".join(words)
    entries = [
        {"case_id": c.case_id, "prediction": long_text if i == 0 else reference_answer(c)} for i, c in enumerate(cases)
    ]
    path = tmp_path / "sub.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    result, truncated = score_subtask3(path, KEY, XML)
    assert truncated == 1
    first = cases[0]
    kept = " ".join(words[:75])
    assert result.per_case[first.case_id]["bleu"] == pytest.approx(case_bleu(kept, reference_answer(first)))
    expected_rouge1 = case_rouge(kept, reference_answer(first))["rouge1"]
    assert result.per_case[first.case_id]["rouge1"] == pytest.approx(expected_rouge1)
    # 75 words exactly: left alone.
    entries[0]["prediction"] = kept
    path.write_text(json.dumps(entries), encoding="utf-8")
    assert score_subtask3(path, KEY, XML)[1] == 0


def test_empty_13a_prediction_is_refused_with_one_line(tmp_path):
    cases = [c for c in load_cases(XML, KEY) if c.has_key]
    entries = [
        {"case_id": c.case_id, "prediction": "<skipped>" if i == 1 else "An answer."} for i, c in enumerate(cases)
    ]
    path = tmp_path / "sub.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    out = tmp_path / "scores.json"
    proc = subprocess.run(
        [
            sys.executable,
            "score.py",
            "--subtask",
            "3",
            "--submission",
            str(path),
            "--key",
            str(KEY),
            "--xml",
            str(XML),
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"case {cases[1].case_id}" in lines[0] and "13a" in lines[0]
    assert not out.exists()


# --- independent implementations of the official definitions


def _sacrebleu_bleu(prediction: str, reference: str) -> float:
    from sacrebleu.metrics import BLEU

    bleu = BLEU(tokenize="13a", smooth_method="none", effective_order=False)
    return bleu.corpus_score([prediction], [[reference]]).score


def _rouge_tokens(text: str) -> list[str]:
    return [t for t in re.sub(r"[^a-z0-9]+", " ", text.lower()).split() if re.fullmatch(r"[a-z0-9]+", t)]


def _f(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _rouge_n(pred: list[str], ref: list[str], n: int) -> float:
    grams = lambda t: Counter(tuple(t[i : i + n]) for i in range(len(t) - n + 1))  # noqa: E731
    gp, gr = grams(pred), grams(ref)
    overlap = sum((gp & gr).values())
    return _f(overlap / max(sum(gp.values()), 1), overlap / max(sum(gr.values()), 1))


def _lcs_table(a: list[str], b: list[str]) -> list[list[int]]:
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t


def _rouge_l(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        return 0.0
    lcs = _lcs_table(ref, pred)[len(ref)][len(pred)]
    return _f(lcs / len(pred), lcs / len(ref))


def _lcs_ref_indices(ref: list[str], cand: list[str]) -> list[int]:
    t = _lcs_table(ref, cand)
    i, j, out = len(ref), len(cand), []
    while i > 0 and j > 0:
        if ref[i - 1] == cand[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif t[i][j - 1] > t[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out


def _rouge_lsum(pred_text: str, ref_text: str) -> float:
    pred_sents = [_rouge_tokens(s) for s in pred_text.split("\n") if s]
    ref_sents = [_rouge_tokens(s) for s in ref_text.split("\n") if s]
    m, n = sum(map(len, ref_sents)), sum(map(len, pred_sents))
    if not m or not n:
        return 0.0
    left_ref = Counter(t for s in ref_sents for t in s)
    left_pred = Counter(t for s in pred_sents for t in s)
    hits = 0
    for r in ref_sents:
        union = sorted(set().union(*[_lcs_ref_indices(r, c) for c in pred_sents]))
        for tok in (r[i] for i in union):
            if left_pred[tok] > 0 and left_ref[tok] > 0:
                hits += 1
                left_pred[tok] -= 1
                left_ref[tok] -= 1
    return _f(hits / n, hits / m)


def _sari_ngram(src: list[str], cand: list[str], refs: list[list[str]]) -> tuple[float, float, float]:
    """SARIngram written type by type with explicit min/max (the library uses Counter algebra)."""
    k = len(refs)
    s, c = Counter(src), Counter(cand)
    r: Counter = Counter()
    for ref in refs:
        for g in ref:
            r[g] += 1
    kept_types = [g for g in s if c[g] > 0]
    keep_prec = [min(k * s[g], k * c[g], r[g]) / min(k * s[g], k * c[g]) for g in kept_types]
    keep_hits = sum(min(k * s[g], k * c[g], r[g]) for g in kept_types)
    keep_total = sum(min(k * s[g], r[g]) for g in s)
    kp = sum(keep_prec) / len(keep_prec) if keep_prec else 1.0
    kr = keep_hits / keep_total if keep_total else 1.0
    deleted_types = [g for g in s if k * s[g] > k * c[g]]
    del_prec = [max(0, k * s[g] - k * c[g] - r[g]) / (k * s[g] - k * c[g]) for g in deleted_types]
    dp = sum(del_prec) / len(del_prec) if del_prec else 1.0
    added = [g for g in c if s[g] == 0]
    wanted = [g for g in r if s[g] == 0]
    ap = sum(1 for g in added if r[g] > 0) / len(added) if added else 1.0
    ar = sum(1 for g in wanted if c[g] > 0) / len(wanted) if wanted else 1.0
    return _f(kp, kr), dp, _f(ap, ar)


def _sari(source: str, prediction: str, reference: str) -> float:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    s, c, r = (tok(x.lower()).split(" ") for x in (source, prediction, reference))
    grams = lambda t, n: [" ".join(t[i : i + n]) for i in range(len(t) - n + 1)]  # noqa: E731
    parts = [_sari_ngram(grams(s, n), grams(c, n), [grams(r, n)]) for n in range(1, 5)]
    keep, dele, add = (sum(p[k] for p in parts) / 4 for k in range(3))
    return 100 * (keep + dele + add) / 3


VOCAB = [
    "the",
    "The",
    "stone",
    "stones",
    "kidney",
    "pain",
    "improved",
    "fever",
    "resolved",
    "was",
    "is",
    "a",
    "tube",
    "stent",
    "blood",
    "thinners",
    "2.5",
    "mg",
    "10",
    "twice-daily",
    "café",
    "naïve",
    "Übung",
    "(CT)",
    "scan",
    "she's",
    "&amp;",
    "don't",
    "x-ray",
    "left",
    "flank",
]
PUNCT = [".", ",", "?", "!", ";", ":", ""]


def _random_text(rng: random.Random, max_words: int) -> str:
    words = []
    for _ in range(rng.randint(1, max_words)):
        w = rng.choice(VOCAB) + rng.choice(PUNCT + [""] * 6)
        words.append(w)
        if rng.random() < 0.08:
            words.append("\n")
    text = " ".join(words).replace(" \n ", "\n").strip()
    return text if tokenize_13a(text) else "stone ."


@pytest.mark.parametrize("seed", range(4))
def test_random_submissions_match_independent_implementations(seed):
    rng = random.Random(seed)
    n = 30
    preds = {str(i): _random_text(rng, 40) for i in range(n)}
    refs = {str(i): _random_text(rng, 40) for i in range(n)}
    # Some near copies, so BLEU and ROUGE-2 are not all zero.
    for i in range(0, n, 3):
        words = refs[str(i)].split(" ")
        preds[str(i)] = " ".join(words[: max(1, len(words) - rng.randint(0, 3))])
    srcs = {str(i): _random_text(rng, 60) for i in range(n)}
    result = score_generation(preds, refs, srcs)
    expected = {name: 0.0 for name in ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "sari")}
    for cid in preds:
        p, r = preds[cid], refs[cid]
        pt, rt = _rouge_tokens(p), _rouge_tokens(r)
        case = {
            "bleu": _sacrebleu_bleu(p, r),
            "rouge1": 100 * _rouge_n(pt, rt, 1),
            "rouge2": 100 * _rouge_n(pt, rt, 2),
            "rougeL": 100 * _rouge_l(pt, rt),
            "rougeLsum": 100 * _rouge_lsum(p, r),
            "sari": _sari(srcs[cid], p, r),
        }
        for name, value in case.items():
            assert result.per_case[cid][name] == pytest.approx(value, abs=1e-6), (name, p, r)
            expected[name] += value / n
    for name, value in expected.items():
        assert result.scores[name] == pytest.approx(value, abs=1e-6), name
    assert max(result.per_case[c]["bleu"] for c in preds) > 0  # the comparison covers non-zero BLEU
