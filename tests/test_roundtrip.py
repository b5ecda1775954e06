"""Issue 20, class 6: whatever the XML + key reader accepts, the writer writes back identically.

Property tests over generated official-layout files: random Unicode (every XML 1.0 character
plane), the predefined entities, character references (``&#13;`` among them), raw CR / LF /
TAB and surrounding whitespace in every text and attribute the reader keeps. Each generated
pair is read (``load_cases``), written as a cross-validation fold writes it
(``evaluation.folds.write_case_files``, which itself checks the read-back) and read again.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.archehr import load_cases, load_xml, write_cases
from plumbing.errors import InputError, parse_json
from evaluation.folds import write_case_files

# XML 1.0 characters (no surrogates, no U+FFFE/U+FFFF, no C0 controls but TAB/LF/CR).
XML_CHAR = st.characters(min_codepoint=0x20, blacklist_categories=("Cs",)).filter(lambda c: c not in "\ufffe\uffff")
ENTITIES = [
    "&amp;",
    "&lt;",
    "&gt;",
    "&quot;",
    "&apos;",
    "&#13;",
    "&#10;",
    "&#9;",
    "&#xD;",
    "&#x85;",
    "&#x2028;",
    "&#xA0;",
    "&#x1F600;",
    "&#32;",
    "&#x3000;",
]
ID_SUFFIXES = ["", " ", "-x", "&#10;", "&#13;", "\t", "&amp;", "&#x85;"]
RAW_WHITESPACE = ["\r\n", "\r", "\n", "\t", " ", "  ", "\u00a0", "\u2028", "\u0085"]


@st.composite
def xml_text(draw, max_fragments: int = 12) -> str:
    """Escaped XML character data: plain characters, entities, char refs and raw whitespace."""
    parts = draw(
        st.lists(
            st.one_of(
                XML_CHAR.filter(lambda c: c not in "<&>"),
                st.sampled_from(ENTITIES),
                XML_CHAR.map(lambda c: f"&#{ord(c)};"),
                XML_CHAR.map(lambda c: f"&#x{ord(c):X};"),
                st.sampled_from(RAW_WHITESPACE),
            ),
            max_size=max_fragments,
        )
    )
    return "".join(parts)


@st.composite
def official_files(draw) -> tuple[str, list]:
    """(XML text, key JSON) of 1-3 keyed cases."""
    n_cases = draw(st.integers(1, 3))
    cases_xml, key = [], []
    for c in range(n_cases):
        case_id = str(c) + draw(st.sampled_from(ID_SUFFIXES))
        n_sent = draw(st.integers(1, 4))
        sentences = []
        for s in range(n_sent):
            para = draw(st.one_of(st.none(), st.sampled_from(["0", "1", " 2", "p&#13;"])))
            start = draw(st.one_of(st.none(), st.integers(0, 10**6).map(str), st.just(" 7 ")))
            attrs = f' id="{s + 1}"'
            attrs += f' paragraph_id="{para}"' if para is not None else ""
            attrs += f' start_char_index="{start}"' if start is not None else ""
            sentences.append(f"<sentence{attrs}>{draw(xml_text())}</sentence>")
        phrases = "".join(f'<phrase id="{i}">{draw(xml_text(6))}</phrase>' for i in range(draw(st.integers(0, 2))))
        specialty = draw(st.one_of(st.none(), xml_text(4)))
        cases_xml.append(
            f'<case id="{case_id}">'
            + (f"<clinical_specialty>{specialty}</clinical_specialty>" if specialty is not None else "")
            + f"<patient_narrative>{draw(xml_text())}</patient_narrative>"
            + f"<patient_question>{phrases}</patient_question>"
            + f"<clinician_question>{draw(xml_text())}</clinician_question>"
            + f"<note_excerpt>{draw(xml_text())}</note_excerpt>"
            + f"<note_excerpt_sentences>{''.join(sentences)}</note_excerpt_sentences></case>"
        )
        labels = draw(
            st.lists(st.sampled_from(["essential", "supplementary", "not-relevant"]), min_size=n_sent, max_size=n_sent)
        )
        answer_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
        key.append(
            {
                "case_id": load_id(case_id),
                "answers": [{"sentence_id": str(i + 1), "relevance": lab} for i, lab in enumerate(labels)],
                "clinician_answer_without_citations": draw(st.one_of(st.none(), answer_text)),
                "clinician_answer_sentences": [
                    {
                        "id": str(j),
                        "text": draw(answer_text),
                        "citations": draw(
                            st.lists(st.sampled_from([str(i + 1) for i in range(n_sent)]), max_size=2, unique=True)
                        ),
                    }
                    for j in range(draw(st.integers(0, 2)))
                ],
            }
        )
    declaration = draw(st.sampled_from(['<?xml version="1.0" encoding="UTF-8"?>\n', "", "\ufeff"]))
    return declaration + "<annotations>" + "".join(cases_xml) + "</annotations>", key


def load_id(escaped: str) -> str:
    """The case id an XML parser reads from the escaped attribute value."""
    return (
        escaped.replace("\t", " ")
        .replace("&#10;", "\n")
        .replace("&#13;", "\r")
        .replace("&#x85;", "\x85")
        .replace("&amp;", "&")
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(files=official_files())
def test_reader_writer_round_trip_is_identical(tmp_path_factory, files):
    xml_text_, key = files
    folder = tmp_path_factory.mktemp("rt")
    (folder / "in.xml").write_bytes(xml_text_.encode("utf-8"))
    (folder / "in.json").write_text(json.dumps(key, ensure_ascii=False), encoding="utf-8")
    cases = load_cases(folder / "in.xml", folder / "in.json")
    write_case_files(cases, folder / "out.xml", folder / "out.json")  # raises unless it reads back
    assert load_cases(folder / "out.xml", folder / "out.json") == cases
    # Written twice, the bytes are the same: nothing drifts on a second round.
    again = load_cases(folder / "out.xml", folder / "out.json")
    write_cases(again, folder / "out2.xml", folder / "out2.json")
    assert (folder / "out2.xml").read_bytes() == (folder / "out.xml").read_bytes()


@pytest.mark.parametrize(
    "text",
    [
        "a&#13;b",
        "&#13;",
        "a&#13;&#10;b",
        "x\r\ny",
        "x\ry",
        "&#xD;&#xD;\n",
        "tab\tand&#9;",
        "&#x85;nel&#x2028;ls",
        "&lt;&amp;&gt;]]&gt;",
        "  padded  ",
        "&#x1F600;&#xE000;&#xFFFD;",
        "line1\n\nline2",
    ],
)
def test_note_text_examples_round_trip(tmp_path, text):
    xml = (
        f'<annotations><case id="1"><patient_narrative/><clinician_question/>'
        f'<note_excerpt_sentences><sentence id="1">{text}</sentence></note_excerpt_sentences>'
        f"</case></annotations>"
    )
    (tmp_path / "a.xml").write_text(xml, encoding="utf-8")
    (tmp_path / "a.json").write_text(
        json.dumps([{"case_id": "1", "answers": [{"sentence_id": "1", "relevance": "essential"}]}]), encoding="utf-8"
    )
    cases = load_cases(tmp_path / "a.xml", tmp_path / "a.json")
    write_case_files(cases, tmp_path / "b.xml", tmp_path / "b.json")
    assert load_xml(tmp_path / "b.xml")[0].note_sentences == cases[0].note_sentences


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=8), max_size=4))
def test_json_with_a_lone_surrogate_is_one_line(strings):
    """Any JSON string escape that yields a lone surrogate is refused when read, never later."""
    text = json.dumps(strings)  # ensure_ascii: a lone surrogate appears as a \\udxxx escape
    lone = any(0xD800 <= ord(ch) <= 0xDFFF for s in strings for ch in s)
    try:
        assert parse_json(text, "f.json") == strings
        assert not lone
    except InputError as err:
        assert lone and "lone surrogate" in err.one_line()


@pytest.mark.parametrize("case_id", ["\\ud800", "a\\udfff", "\\udbff\\u0041", "x\\uDC00y"])
def test_key_case_id_with_lone_surrogate(tmp_path, case_id):
    (tmp_path / "k.json").write_text('[{"case_id": "' + case_id + '", "answers": []}]', encoding="utf-8")
    from data.archehr import load_key

    with pytest.raises(InputError, match="lone surrogate"):
        load_key(tmp_path / "k.json")
