"""report.html: checked as a DOM on every run (stdlib parser), and rendered in headless Chromium (slow).

The DOM checks read the page as a browser would build it: one section per case, every
answer sentence naming the note sentences it cites (ids that exist, in its own case, the
very links of the submission and the key), the relevance classes of Subtask 2, escaping
of hostile text, and nothing that could reach the network.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import infer
from html_dom import KINDS, Dom, check_links, check_page_is_self_contained
from data.archehr import load_cases
from data.records import AnswerSentence, Case, NoteSentence, QuestionPhrase
from reports.cases import CasePrediction, case_views
from reports.markdown import markdown_to_html
from reports.page import ReportPage, render_report

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_XML = ROOT / "examples" / "archehr-qa.xml"
EXAMPLE_KEY = ROOT / "examples" / "archehr-qa_key.json"
HOSTILE = [
    '<script>alert("x")</script>',
    '"><img src=x onerror=alert(1)>',
    "' onmouseover='alert(2)",
    "</section></div><u>bold</u>",
    "&amp; &lt;",
    "https://example.com/leak.png",
]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """infer.py on the bundled example with its key (a lexical ensemble: quick, and it makes mistakes)."""
    tmp = tmp_path_factory.mktemp("report")
    ensemble = tmp / "bm25.json"
    ensemble.write_text(
        json.dumps(
            {
                "format": "archehr-retrieval-ensemble/1",
                "weights": {"bm25": 1.0},
                "threshold": 0.5,
                "mode": "relative",
                "max_per_answer": 3,
            }
        ),
        encoding="utf-8",
    )
    out = tmp / "run"
    import contextlib
    import io

    console = io.StringIO()
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        assert (
            infer.main(
                [
                    str(EXAMPLE_XML),
                    "--out",
                    str(out),
                    "--key",
                    str(EXAMPLE_KEY),
                    "--ensemble",
                    str(ensemble),
                    "--no-progress",
                ]
            )
            == 0
        )
    return out, console.getvalue()


def test_infer_report_has_a_section_per_case_with_the_submissions_links(example_run):
    out, console = example_run
    cases = load_cases(EXAMPLE_XML, EXAMPLE_KEY)
    page = (out / "report.html").read_text(encoding="utf-8")
    run = json.loads((out / "run.json").read_text())
    assert run["outputs"]["report"] == str(out / "report.html")
    dom = Dom(page)
    check_page_is_self_contained(dom)
    assert [s.attrs["data-case-id"] for s in dom.find("section", "case")] == [c.case_id for c in cases]

    links = check_links(dom)
    submitted4 = {
        e["case_id"]: {p["answer_id"]: set(p["evidence_id"]) for p in e["prediction"]}
        for e in json.loads((out / "subtask4" / "submission.json").read_text())
    }
    for case in cases:
        assert sorted(links[case.case_id]) == sorted(case.answer_ids)
        for a in case.answer_sentences:
            seen = links[case.case_id][a.sentence_id]
            assert seen["predicted"] == set()  # with a key every link is marked against it
            assert seen["correct"] | seen["wrong"] == submitted4[case.case_id][a.sentence_id]
            assert seen["correct"] | seen["missed"] == set(a.citations)
            assert not seen["correct"] & (seen["wrong"] | seen["missed"])
    marked = {k for case in links.values() for a in case.values() for k in KINDS if a[k]}
    assert {"correct", "wrong", "missed"} <= marked  # the example exercises all three

    # Subtask 2: shading classes follow the submission; gold labels follow the key.
    submitted2 = {
        e["case_id"]: set(e["prediction"]) for e in json.loads((out / "subtask2" / "submission.json").read_text())
    }
    section_of = {s.attrs["data-case-id"]: s.attrs["id"] for s in dom.find("section", "case")}
    for case in cases:
        notes = [n for n in dom.find("div", "note") if n.section == section_of[case.case_id]]
        assert [n.attrs["data-sid"] for n in notes] == case.note_ids
        threshold = run["subtask2"]["threshold"]
        for n in notes:
            sid = n.attrs["data-sid"]
            assert ("pred-yes" if sid in submitted2[case.case_id] else "pred-no") in n.classes
            shade = float(n.attrs["style"].removeprefix("--r:"))  # graded by the score behind the prediction
            assert (shade >= threshold - 1e-3) == (sid in submitted2[case.case_id]), (case.case_id, sid, shade)
            assert f"gold-{case.relevance[sid]}" in n.classes
            assert n.content.endswith(dict((s.sentence_id, s.text) for s in case.note_sentences)[sid])
    assert dom.find(cls="pred-yes") and dom.find(cls="pred-no")
    # Per-case scores: the official per-case Subtask 4 F1 of each case is on its section.
    from metrics.subtask4 import score_subtask4_per_case

    per_case = score_subtask4_per_case(out / "subtask4" / "submission.json", EXAMPLE_KEY)
    for section in dom.find("section", "case"):
        f1 = per_case[section.attrs["data-case-id"]]["f1"]
        assert f"F1 {f1:.1f}" in " ".join(section.content.split()), section.attrs["data-case-id"]
    # The note text is in the page, never on the console.
    for case in cases:
        for s in case.note_sentences:
            assert s.text in page and s.text not in console


def hostile_case(text: str, case_id: str = "9") -> Case:
    notes = [
        NoteSentence("1", f"First {text} sentence."),
        NoteSentence('2" x="y', f"Second {text}."),
        NoteSentence("3 <u>", "Third."),
    ]
    answers = [AnswerSentence("1", f"Answer {text}.", ("1",)), AnswerSentence("2 '", "Other.", ('2" x="y', "3 <u>"))]
    return Case(
        case_id,
        f"Narrative {text}",
        f"Question {text}?",
        notes,
        [QuestionPhrase("0", f"Why {text}?")],
        clinical_specialty=text,
        answer_sentences=answers,
        relevance={"1": "essential", '2" x="y': "supplementary", "3 <u>": "not-relevant"},
        clinician_answer_without_citations=f"Reference {text}.",
        has_key=True,
    )


@pytest.mark.parametrize("text", HOSTILE)
def test_every_string_from_the_data_is_escaped(text):
    case = hostile_case(text, case_id=text)
    pred = CasePrediction(
        answer=f"Generated {text}.",
        relevant_ids=["1", "3 <u>"],
        relevance_scores=[0.9, 0.2, 0.7],
        links={"1": ["1", '2" x="y'], "2 '": ["3 <u>"]},
    )
    ladder = f"# {text}\n\n| a | {text} |\n|---|---|\n| `{text}` | {text} |\n"
    page = render_report(
        ReportPage(
            title=f"Title {text}",
            notices=[f"Notice {text}"],
            facts=[(text, text)],
            scores={text: {text: 1.0}},
            summary_markdown=ladder,
            cases=case_views([case], {case.case_id: pred}),
        )
    )
    dom = Dom(page)
    check_page_is_self_contained(dom)
    assert not dom.find("img") and not dom.find("u")  # the hostile markup stayed text
    assert [s.attrs["data-case-id"] for s in dom.find("section", "case")] == [text]
    texts = " ".join(e.content for e in dom.elements if e.tag in ("p", "span", "td", "th", "h1", "h2"))
    for expected in (
        f"Title {text}",
        f"First {text} sentence.",
        f"Answer {text}.",
        f"Generated {text}.",
        f"Why {text}?",
        f"Notice {text}",
    ):
        assert expected in texts, expected  # round trip: the reader sees the data's exact text
    assert all(
        re.fullmatch(r"c\d+(-[na]\d+)?", e.attrs["id"])
        for e in dom.elements
        if "id" in e.attrs and e.tag in ("section", "div", "li")
    )
    links = check_links(dom)
    assert links[text]["1"]["correct"] == {"1"} and links[text]["1"]["wrong"] == {'2" x="y'}
    assert links[text]["2 '"]["correct"] == {"3 <u>"} and links[text]["2 '"]["missed"] == {'2" x="y'}


def test_relevance_scores_shade_and_no_key_means_plain_predicted_links():
    case = hostile_case("x")
    case.relevance, case.has_key = {}, False
    case.answer_sentences = [AnswerSentence(a.sentence_id, a.text) for a in case.answer_sentences]
    pred = CasePrediction(relevant_ids=["1"], relevance_scores=[0.9, 0.25, 0.0], links={"1": ["1"], "2 '": []})
    dom = Dom(render_report(ReportPage(title="t", cases=case_views([case], {case.case_id: pred}))))
    notes = dom.find("div", "note")
    assert [n.attrs.get("style") for n in notes] == ["--r:0.900", "--r:0.250", "--r:0.000"]
    assert [("pred-yes" in n.classes) for n in notes] == [True, False, False]
    assert not any(c.startswith("gold-") for n in notes for c in n.classes)
    links = check_links(dom)
    assert links["9"]["1"]["predicted"] == {"1"} and links["9"]["2 '"] == {k: set() for k in KINDS}
    assert "no citation" in dom.by_id["c0-a1"].content


def test_markdown_subset_renders_the_ladder_constructs():
    md = "# Title `x`\n\n> quoted <i>\n> two\n\ntext & more\n\n| a | b |\n|---|---|\n| `c` | 1.0 [0.5, 2.0] |\n"
    out = markdown_to_html(md)
    assert "<h2>Title <code>x</code></h2>" in out
    assert "<blockquote>quoted &lt;i&gt;<br>two</blockquote>" in out
    assert "<p>text &amp; more</p>" in out
    assert "<th>a</th><th>b</th>" in out and "<td><code>c</code></td><td>1.0 [0.5, 2.0]</td>" in out


# --- in a browser ---------------------------------------------------------------------------


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=3000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_chromium_highlights_the_cited_note_sentences(example_run, tmp_path):
    """Headless Chromium opens the example's report with ``#focus=c0-a0``: the page's script marks exactly
    that answer sentence's citations, and the screenshot shows them (docs/report.png is made this way)."""
    if chromium() is None:
        pytest.skip("no chromium (Debian: apt-get install chromium)")
    out, _ = example_run
    url = (out / "report.html").resolve().as_uri()
    dom = Dom(run_chromium("--dump-dom", url + "#focus=c0-a0").stdout)  # the DOM after the script ran
    ans = dom.by_id["c0-a0"]
    assert {"active", "pinned"} <= ans.classes
    highlighted = {e.attrs["id"] for e in dom.find("div", "hl")}
    assert highlighted == set(ans.attrs["data-cites"].split()) and highlighted
    for kind in ("correct", "wrong", "missed"):
        assert {e.attrs["id"] for e in dom.find("div", f"hl-{kind}")} == set(ans.attrs.get(f"data-{kind}", "").split())
    assert "focus" in dom.by_id["c0"].classes and "focus" not in dom.by_id["c1"].classes
    plain = Dom(run_chromium("--dump-dom", url).stdout)
    assert not plain.find("div", "hl")

    from PIL import Image

    shots = {}
    for name, fragment in (("focus", "#focus=c0-a0"), ("plain", "")):
        png = tmp_path / f"{name}.png"
        run_chromium("--window-size=1300,1500", f"--screenshot={png}", url + fragment)
        shots[name] = Image.open(png).convert("RGB")
    # The frames and labels of correct, wrong and missed citations (green, red, orange in the page's CSS).
    frames = ((22, 140, 60), (205, 40, 40), (230, 130, 0))

    def count(img):
        return sum(1 for px in img.getdata() if any(all(abs(a - b) < 12 for a, b in zip(px, c)) for c in frames))

    assert count(shots["focus"]) > count(shots["plain"]) + 1000


def test_readme_shows_the_report_screenshot():
    """docs/report.png (made as in the Chromium test: infer.py on the example with --key, opened at
    ``report.html#focus=c0-a0``, window 1200 wide, cropped to the cases) stays small and in the README."""
    png = ROOT / "docs" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000
    assert "](docs/report.png)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_without_a_subtask4_prediction_the_key_links_are_shown_as_gold_not_missed():
    case = hostile_case("x")
    dom = Dom(
        render_report(
            ReportPage(title="t", cases=case_views([case], {case.case_id: CasePrediction(answer="An answer.")}))
        )
    )
    links = check_links(dom)
    assert links["9"]["1"]["gold"] == {"1"} and links["9"]["2 '"]["gold"] == {'2" x="y', "3 <u>"}
    assert not any(a[k] for a in links["9"].values() for k in KINDS if k != "gold")
    assert "Subtask 4" not in " ".join(t.content for t in dom.find("table", "scores"))
