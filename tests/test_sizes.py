"""Issue 20, class 5: sizes. Long notes are cut to the token limit (said, recorded), odd containers refused.

``data.prompts.fit_case`` is the one rule: a case whose prompt (plus the generation budget, or
plus its answer) exceeds the limit keeps the longest prefix of its note that fits. Tested over
generated cases with the real Qwen3 tokenizer, then through ``infer.py`` with a stand-in
checkpoint of a small context; zips and keys of odd shapes are one line.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import infer
from data.archehr import load_key
from plumbing.errors import InputError
from data.prompts import case_tokens, fit_case, keep_note_sentences
from data.records import AnswerSentence, Case, NoteSentence
from data.submission import read_submission
from model.manifest import ExportManifest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
WORDS = [
    "fever",
    "pain",
    "the",
    "patient",
    "was",
    "given",
    "5",
    "mg",
    "of",
    "morphine",
    "CT",
    "scan",
    "normal",
    "hypertension",
    "q6h",
    "PRN",
    "stent",
    "kidney",
    "ü",
    "—",
    "日本",
]


@st.composite
def cases(draw, max_sentences: int = 60) -> Case:
    n = draw(st.integers(1, max_sentences))
    sentence = st.lists(st.sampled_from(WORDS), min_size=1, max_size=25).map(" ".join)
    notes = [NoteSentence(str(i + 1), draw(sentence)) for i in range(n)]
    answers = [
        AnswerSentence(
            str(j),
            draw(sentence),
            tuple(draw(st.lists(st.sampled_from([s.sentence_id for s in notes]), max_size=2, unique=True))),
        )
        for j in range(draw(st.integers(0, 3)))
    ]
    return Case(
        "c",
        draw(sentence),
        draw(sentence),
        notes,
        answer_sentences=answers,
        relevance={s.sentence_id: "essential" for s in notes[:2]},
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(), limit=st.integers(60, 1500), reserve=st.sampled_from([0, 16, 100]))
def test_fit_case_keeps_the_longest_prefix_that_fits(qwen_tokenizer, case, limit, reserve):
    tokens = case_tokens(qwen_tokenizer, case, reserve)
    try:
        fitted, cut = fit_case(qwen_tokenizer, case, limit, reserve)
    except ValueError as err:
        assert case_tokens(qwen_tokenizer, keep_note_sentences(case, 1), reserve) > limit
        assert "\n" not in str(err) and case.case_id in str(err)
        return
    if tokens <= limit:
        assert fitted is case and cut is None
        return
    k = len(fitted.note_sentences)
    assert cut is not None and (cut.kept, cut.note_sentences, cut.tokens, cut.limit) == (
        k,
        len(case.note_sentences),
        tokens,
        limit,
    )
    assert fitted.note_sentences == case.note_sentences[:k] and 1 <= k < len(case.note_sentences)
    assert case_tokens(qwen_tokenizer, fitted, reserve) <= limit
    assert case_tokens(qwen_tokenizer, keep_note_sentences(case, k + 1), reserve) > limit  # the longest
    kept = set(fitted.note_ids)
    assert all(set(a.citations) <= kept for a in fitted.answer_sentences) and set(fitted.relevance) <= kept


def test_a_five_thousand_sentence_note_is_cut_quickly(qwen_tokenizer):
    import time

    notes = [NoteSentence(str(i), f"Patient had fever on day {i} and received {i * 7} mg.") for i in range(5000)]
    case = Case(
        "big",
        "Was the fever treated?",
        "Was the fever treated?",
        notes,
        answer_sentences=[AnswerSentence("1", "It was.", ("3",))],
    )
    start = time.perf_counter()
    fitted, cut = fit_case(qwen_tokenizer, case, 8192, reserve=100)
    assert time.perf_counter() - start < 30
    assert cut.tokens > 100_000 and 100 < cut.kept < 1000
    assert case_tokens(qwen_tokenizer, fitted, 100) <= 8192


# --- through infer.py, with a stand-in checkpoint of a small context ------------------------------


class SmallContextCheckpoint:
    """A checkpoint stand-in with the real tokenizer and a 1024-token model context."""

    threshold = 0.5
    manifest = ExportManifest.from_dict(
        {
            "format": "archehr-export/1",
            "preset": "fake",
            "alignment": {"threshold": 0.5},
            "relevance": {"threshold": 0.5, "calibrated_on": "training cases"},
        }
    )

    def __init__(self, tokenizer, context: int = 1024):
        from types import SimpleNamespace

        self.tokenizer = tokenizer
        self.model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=context))
        self.seen: dict[str, int] = {}

    def generate_answers(self, cases, max_new_tokens=100, batch_size=8):
        return ["An answer." for _ in cases]

    def score_relevance(self, case):
        self.seen[case.case_id] = len(case.note_sentences)
        return np.linspace(0.0, 1.0, len(case.note_sentences))

    def score_pairs(self, case):
        self.seen[case.case_id] = len(case.note_sentences)
        s = np.full((len(case.answer_sentences), len(case.note_sentences)), 0.1)
        s[:, -1] = 0.9  # the last note sentence the model saw
        return s


def long_xml(path: Path, n: int) -> Path:
    sentences = "".join(
        f'<sentence id="{i}">Patient had fever on day {i} and received {i * 7} mg.</sentence>' for i in range(1, n + 1)
    )
    path.write_text(
        '<annotations><case id="long"><patient_narrative>Was my fever treated?</patient_narrative>'
        "<clinician_question>Was the fever treated?</clinician_question>"
        f"<note_excerpt_sentences>{sentences}</note_excerpt_sentences>"
        '<answer_sentences><sentence id="1">It was treated.</sentence></answer_sentences></case>'
        '<case id="short"><patient_narrative>Pain?</patient_narrative><clinician_question>Pain?</clinician_question>'
        '<note_excerpt_sentences><sentence id="1">No pain.</sentence></note_excerpt_sentences>'
        '<answer_sentences><sentence id="1">No.</sentence></answer_sentences></case></annotations>',
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("extra, limit", [([], 1024), (["--max-prompt-tokens", "600"], 600)])
def test_infer_cuts_a_long_note_says_so_and_records_it(tmp_path, capsys, monkeypatch, qwen_tokenizer, extra, limit):
    import model.loaded_export

    fake = SmallContextCheckpoint(qwen_tokenizer)
    monkeypatch.setattr(model.loaded_export, "load_export", lambda *a, **k: fake)
    (tmp_path / "export").mkdir()
    xml = long_xml(tmp_path / "long.xml", 400)
    out = tmp_path / "out"
    assert (
        infer.main(
            [
                str(xml),
                "--out",
                str(out),
                "--export",
                str(tmp_path / "export"),
                "--no-progress",
                "--max-new-tokens",
                "50",
                *extra,
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    (cut,) = run["context"]["notes_cut"]
    assert run["context"]["limit_tokens"] == limit
    assert cut["case_id"] == "long" and cut["note_sentences"] == 400 and cut["kept"] == fake.seen["long"] < 400
    assert fake.seen["short"] == 1
    assert sum("case long:" in line and "recorded in run.json" in line for line in err.splitlines()) == 1
    sub4 = json.loads((out / "subtask4" / "submission.json").read_text())
    cited = {e for entry in sub4 if entry["case_id"] == "long" for p in entry["prediction"] for e in p["evidence_id"]}
    assert cited == {str(cut["kept"])}  # the last sentence the model saw; nothing beyond it


def test_infer_refuses_a_case_that_cannot_fit_at_all(tmp_path, capsys, monkeypatch, qwen_tokenizer):
    import model.loaded_export

    monkeypatch.setattr(model.loaded_export, "load_export", lambda *a, **k: SmallContextCheckpoint(qwen_tokenizer, 300))
    (tmp_path / "export").mkdir()
    xml = long_xml(tmp_path / "long.xml", 5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        infer.main(
            [
                str(xml),
                "--out",
                str(tmp_path / "out"),
                "--export",
                str(tmp_path / "export"),
                "--no-progress",
                "--max-new-tokens",
                "290",
            ]
        )
    assert exc.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "needs more than 300 tokens" in lines[0]
    assert not (tmp_path / "out").exists()


# --- containers of odd shapes: one line ----------------------------------------------------------


def _zip(path: Path, members: list[tuple[str, bytes]], method=zipfile.ZIP_DEFLATED) -> Path:
    import warnings

    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", compression=method) as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": the point of one case
        for name, data in members:
            zf.writestr(name, data)
    return path


def _bad_zips(tmp: Path) -> list[tuple[Path, str]]:
    good = json.dumps([{"case_id": "101", "prediction": "x"}]).encode()
    ok = _zip(tmp / "ok.zip", [("submission.json", good)])
    raw = ok.read_bytes()
    crc = bytearray(raw)
    crc[raw.index(b"PK\x01\x02") + 16] ^= 0xFF  # the central directory's CRC
    (tmp / "crc.zip").write_bytes(bytes(crc))
    (tmp / "cut.zip").write_bytes(raw[: len(raw) // 2])
    (tmp / "empty.zip").write_bytes(b"")
    (tmp / "text.zip").write_bytes(b"not a zip at all")
    method = bytearray(raw)
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # compression method 99 (AES): not supported
        at = raw.index(sig) + (8 if sig == b"PK\x03\x04" else 10)
        method[at : at + 2] = (99).to_bytes(2, "little")
    (tmp / "aes.zip").write_bytes(bytes(method))
    encrypted = bytearray(raw)  # the "encrypted" bit of the general-purpose flags, in both headers
    encrypted[raw.index(b"PK\x03\x04") + 6] |= 0x1
    encrypted[raw.index(b"PK\x01\x02") + 8] |= 0x1
    (tmp / "enc.zip").write_bytes(bytes(encrypted))
    return [
        (tmp / "enc.zip", "encrypted"),
        (tmp / "crc.zip", "zip"),
        (tmp / "cut.zip", "zip"),
        (tmp / "empty.zip", "empty"),
        (tmp / "text.zip", "zip"),
        (tmp / "aes.zip", "zip"),
        (_zip(tmp / "none.zip", []), "no submission.json"),
        (_zip(tmp / "sub.zip", [("dir/submission.json", good)]), "no submission.json"),
        (_zip(tmp / "dir.zip", [("submission.json/", b"")]), "no submission.json"),
        (_zip(tmp / "two.zip", [("submission.json", good), ("submission.json", good)]), "keep one"),
        (_zip(tmp / "latin.zip", [("submission.json", '["caf\xe9"]'.encode("latin-1"))]), "UTF-8"),
        (
            _zip(tmp / "surrogate.zip", [("submission.json", b'[{"case_id": "\\ud800", "prediction": "x"}]')]),
            "lone surrogate",
        ),
        (_zip(tmp / "stored_empty.zip", [("submission.json", b"")], zipfile.ZIP_STORED), "empty"),
    ]


def test_odd_zips_are_one_line(tmp_path):
    cases = _bad_zips(tmp_path)
    assert len(cases) >= 10
    for path, words in cases:
        with pytest.raises(InputError) as err:
            read_submission(path, 3)
        line = err.value.one_line()
        assert "\n" not in line and words in line and str(path) in line, (path.name, line)


@pytest.mark.parametrize(
    "text, words",
    [
        ("[]", "no cases"),
        ("{}", "JSON list"),
        ("null", "JSON list"),
        ('""', "JSON list"),
        ("0", "JSON list"),
        ("[[]]", "object"),
        ("[{}]", "case_id"),
        ('[{"case_id": ""}]', "case_id"),
        ('[{"case_id": 5}]', "case_id"),
        ('[{"case_id": "\\udc80"}]', "lone surrogate"),
        ("[" * 100_000, "JSON"),
        ('[{"case_id": "1", "answers": {}}]', "'answers' must be a list"),
    ],
)
def test_odd_keys_are_one_line(tmp_path, text, words):
    path = tmp_path / "key.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_key(path)
    line = err.value.one_line()
    assert "\n" not in line and words in line, line
