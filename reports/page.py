"""``report.html``: one self-contained file (inline CSS and JS, images as data URIs, no network).

A Content-Security-Policy forbids every fetch, so the page cannot reach a server even
if some text in it tried to. Every string from the data is HTML-escaped; element ids
are built from positions (``c0-n3``: case 0, note sentence 3), never from the data's ids.

Hovering or focusing an answer sentence highlights the note sentences it cites; a click
pins the selection (click again to release); ``report.html#focus=c0-a1`` opens the page
with answer sentence 1 of case 0 selected.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from plumbing.atomic import write_text_atomic

from .cases import AnswerView, CaseView, NoteView
from .markdown import markdown_to_html

REPORT_NAME = "report.html"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
GOLD_MARK = {
    "essential": ("E", "essential"),
    "supplementary": ("S", "supplementary"),
    "not-relevant": ("–", "not relevant"),
}
CITE_MARK = {"predicted": "", "correct": " ✓", "wrong": " ✗", "missed": " ?", "gold": ""}
CITE_TITLE = {
    "predicted": "predicted link",
    "correct": "correct: predicted and gold",
    "wrong": "wrong: predicted, not gold",
    "missed": "missed: gold, not predicted",
    "gold": "gold link (Subtask 4 not predicted)",
}


@dataclass
class ReportPage:
    title: str
    notices: Sequence[str] = ()  # shown at the top, as given (what ran, on which data)
    facts: Sequence[tuple[str, str]] = ()  # a key-value table of the run (engine, thresholds, files)
    scores: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # overall: table -> name -> value
    summary_markdown: str | None = None  # e.g. the cross-validation ladder (ladder.md)
    images: Sequence[tuple[str, Path]] = ()  # (caption, PNG) embedded as data URIs; missing files skipped
    cases_title: str = "Cases"
    cases_note: str | None = None  # what the case sections show (which system, held-out or not)
    cases: Sequence[CaseView] = ()


def e(value: object) -> str:
    """HTML-escaped text (quotes included: safe in attributes too)."""
    return html.escape(str(value), quote=True)


def _num(value: float) -> str:
    return f"{value:.1f}" if isinstance(value, float) else e(value)


def _score_table(scores: Mapping[str, Mapping[str, float]], cls: str = "scores") -> str:
    if not scores:
        return ""
    rows = "".join(
        f"<tr><th>{e(group)}</th><td>"
        + " &middot; ".join(f"{e(name)} <b>{_num(v)}</b>" for name, v in values.items() if isinstance(v, (int, float)))
        + "</td></tr>"
        for group, values in scores.items()
    )
    return f'<table class="{cls}">{rows}</table>'


def _note(n: NoteView, first_of_paragraph: bool) -> str:
    classes = ["note"]
    if n.predicted is not None:
        classes.append("pred-yes" if n.predicted else "pred-no")
    if n.gold is not None:
        classes.append("gold-" + n.gold)
    if n.outcome:
        classes.append("s2-" + n.outcome)
    if first_of_paragraph:
        classes.append("para")
    style = f' style="--r:{min(max(n.score, 0.0), 1.0):.3f}"' if n.score is not None else ""
    if n.predicted is None:
        pred = '<span class="mark" title="Subtask 2 not predicted"></span>'
    else:
        tip = "predicted relevant" if n.predicted else "predicted not relevant"
        if n.score is not None:
            tip += f" (score {n.score:.2f})"
        pred = f'<span class="mark pred" title="{e(tip)}">{"●" if n.predicted else "○"}</span>'
    gold = ""
    if n.gold is not None:
        mark, name = GOLD_MARK.get(n.gold, ("?", n.gold))
        gold = f'<span class="mark gold" title="gold: {e(name)}">{e(mark)}</span>'
    return (
        f'<div class="{" ".join(classes)}" id="{n.anchor}" data-sid="{e(n.sentence_id)}"{style}>'
        f'<span class="sid">{e(n.sentence_id)}</span>{pred}{gold}<span class="text">{e(n.text)}</span></div>'
    )


def _answer_sentence(a: AnswerView) -> str:
    by_kind: dict[str, list[str]] = {}
    for c in a.citations:
        by_kind.setdefault(c.outcome, []).append(c.anchor)
    data = "".join(f' data-{kind}="{" ".join(ids)}"' for kind, ids in by_kind.items())
    cites = "".join(
        f'<a class="cite cite-{c.outcome}" href="#{c.anchor}" title="{e(CITE_TITLE[c.outcome])}">'
        f"{e(c.sentence_id)}{CITE_MARK[c.outcome]}</a>"
        for c in a.citations
    )
    if not a.citations:
        cites = '<span class="cite cite-none">no citation</span>'
    cited = " ".join(c.anchor for c in a.citations)
    return (
        f'<li class="ans" id="{a.anchor}" tabindex="0" data-aid="{e(a.sentence_id)}" data-cites="{cited}"{data}>'
        f'<span class="aid">{e(a.sentence_id)}</span><span class="text">{e(a.text)}</span>'
        f'<span class="cites">{cites}</span></li>'
    )


def _case(c: CaseView) -> str:
    notes, paragraph = [], object()
    for n in c.notes:
        notes.append(_note(n, n.paragraph_id != paragraph and bool(notes)))
        paragraph = n.paragraph_id
    question = f'<p class="q"><b>Patient:</b> {e(c.patient_question)}</p>' if c.patient_question else ""
    question += f'<p class="q"><b>Clinician:</b> {e(c.clinician_question)}</p>' if c.clinician_question else ""
    answer = (
        f'<h4>Generated answer (Subtask 3)</h4><p class="answer">{e(c.answer)}</p>'
        if c.answer is not None
        else '<h4>Generated answer (Subtask 3)</h4><p class="none">not generated</p>'
    )
    if c.reference_answer:
        answer += (
            f'<details><summary>Clinician answer (key)</summary><p class="answer">{e(c.reference_answer)}</p></details>'
        )
    if c.answer_sentences:
        which = (
            "predicted links, marked against the key"
            if c.has_key
            and c.links_predicted
            and any(x.outcome != "predicted" for a in c.answer_sentences for x in a.citations)
            else "predicted links"
            if c.links_predicted
            else "gold links (no prediction)"
        )
        answer += (
            f"<h4>Answer sentences &rarr; note (Subtask 4: {e(which)})</h4>"
            '<p class="hint">Hover or click a sentence to highlight the note sentences it cites.</p>'
            f'<ol class="answers">{"".join(_answer_sentence(a) for a in c.answer_sentences)}</ol>'
        )
    else:
        answer += '<p class="none">No answer sentences to align (Subtask 4 skipped for this case).</p>'
    title = f"Case {e(c.case_id)}" + (f' <span class="spec">{e(c.specialty)}</span>' if c.specialty else "")
    return (
        f'<section class="case" id="{c.anchor}" data-case-id="{e(c.case_id)}"><h2>{title}</h2>{question}'
        f"<details><summary>Patient narrative</summary><p>{e(c.narrative)}</p></details>"
        f'{_score_table(c.scores)}<div class="cols"><div class="notecol"><h4>Note sentences</h4>'
        f'{"".join(notes)}</div><div class="anscol">{answer}</div></div></section>'
    )


def _overview(cases: Sequence[CaseView]) -> str:
    """The cases in a table (each links to its section) with the F1 of each subtask scored per case."""
    groups = list(dict.fromkeys(g for c in cases for g, values in c.scores.items() if "F1" in values))
    head = "".join(f"<th>{e(g)} F1</th>" for g in groups)
    rows = []
    for c in cases:
        n_pred = sum(1 for n in c.notes if n.predicted)
        cells = "".join(f"<td>{_num(c.scores[g]['F1']) if g in c.scores else '–'}</td>" for g in groups)
        rows.append(
            f'<tr><td><a href="#{c.anchor}">{e(c.case_id)}</a></td><td>{e(c.specialty or "")}</td>'
            f"<td>{len(c.notes)}</td><td>{n_pred}</td><td>{len(c.answer_sentences)}</td>{cells}</tr>"
        )
    return (
        '<div class="table"><table class="overview"><thead><tr><th>case</th><th>specialty</th>'
        f"<th>note sentences</th><th>predicted relevant</th><th>answer sentences</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _image(caption: str, path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{e(caption)}</figcaption></figure>"
    )


def render_report(page: ReportPage) -> str:
    """The whole page as one string."""
    parts = [f"<h1>{e(page.title)}</h1>"]
    parts += [f'<p class="notice">{e(line)}</p>' for line in page.notices]
    parts.append(
        '<p class="private">This file holds note text. It was written for you only: keep it where '
        "the data may be kept. It loads nothing from the network.</p>"
    )
    if page.facts:
        parts.append(
            '<table class="facts">'
            + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in page.facts)
            + "</table>"
        )
    if page.scores:
        parts.append("<h2>Scores</h2>" + _score_table(page.scores, "scores overall"))
    if page.summary_markdown:
        parts.append(f'<div class="summary">{markdown_to_html(page.summary_markdown)}</div>')
    figures = "".join(_image(caption, path) for caption, path in page.images)
    if figures:
        parts.append(f'<h2>Plots</h2><div class="figures">{figures}</div>')
    if page.cases:
        parts.append(f"<h2>{e(page.cases_title)}</h2>")
        if page.cases_note:
            parts.append(f'<p class="notice">{e(page.cases_note)}</p>')
        parts.append(LEGEND + _overview(page.cases))
        parts += [_case(c) for c in page.cases]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="referrer" content="no-referrer">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(page.title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(parts)
        + f"\n<script>{JS}</script>\n</body></html>\n"
    )


def write_report(path: Path, page: ReportPage) -> Path:
    """Write the page atomically to ``path`` (a folder gets ``report.html`` inside); returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    write_text_atomic(path, render_report(page))
    return path


LEGEND = """<div class="legend">
<span><span class="sw sw-rel"></span>predicted relevant (Subtask 2: ● yes, ○ no; graded shade: the relevance
score, where the run keeps one)</span>
<span><span class="mark gold">E</span>/<span class="mark gold">S</span>/<span class="mark gold">–</span>
gold essential / supplementary / not relevant</span>
<span><span class="cite cite-correct">✓</span> correct link</span>
<span><span class="cite cite-wrong">✗</span> wrong link (not gold)</span>
<span><span class="cite cite-missed">?</span> missed (gold, not predicted)</span>
<span><span class="cite cite-predicted">n</span> predicted link (no key)</span>
<span><span class="cite cite-gold">n</span> gold link (Subtask 4 not predicted)</span>
</div>"""

CSS = """
:root{--rel:255,190,40;--ok:22,140,60;--bad:205,40,40;--miss:230,130,0;--pred:40,100,220;--ink:#1d2330;--mute:#667}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);margin:0 auto;
 max-width:1360px;padding:12px 20px 60px;background:#fafafa}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:22px 0 8px}h3{font-size:15px}
h4{font-size:13px;margin:10px 0 4px;color:var(--mute);text-transform:uppercase;letter-spacing:.03em}
.notice{background:#eef3fb;border-left:4px solid #6b8fd6;padding:6px 10px;margin:6px 0}
.private{color:var(--mute);font-size:12px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}
th,td{border:1px solid #dde;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f1f5}.table{overflow-x:auto}
table.scores{margin:4px 0 8px}table.scores th{font-weight:600}
blockquote{margin:6px 0;padding:6px 10px;background:#fff8e6;border-left:4px solid #e0b040}
code{background:#eef;padding:0 3px;border-radius:3px}.summary td:not(:first-child){white-space:nowrap}
.figures{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;background:#fff;border:1px solid #dde;padding:6px}
figure img{max-width:560px;width:100%}figcaption{font-size:12px;color:var(--mute)}
.legend{display:flex;flex-wrap:wrap;gap:6px 16px;font-size:12px;background:#fff;border:1px solid #dde;padding:6px 10px;
 margin:6px 0}
.sw{display:inline-block;width:14px;height:10px;background:rgba(var(--rel),.6);margin-right:4px;vertical-align:middle}
section.case{background:#fff;border:1px solid #d8dbe4;border-radius:6px;padding:10px 16px 14px;margin:18px 0}
section.case h2{margin:4px 0 6px}.spec{font-size:12px;font-weight:normal;color:var(--mute);border:1px solid #ccd;
 border-radius:9px;padding:1px 7px;margin-left:6px}
.q{margin:3px 0}details{margin:4px 0;font-size:13px}summary{cursor:pointer;color:#345}
.cols{display:grid;grid-template-columns:minmax(0,1.35fr) minmax(0,1fr);gap:18px}
.anscol{position:sticky;top:6px;align-self:start}
.note{display:flex;align-items:flex-start;gap:6px;padding:3px 6px;margin:1px 0;border-radius:4px;
 border:2px solid transparent;background:rgba(var(--rel),calc(var(--r,0) * .32))}
.note.pred-yes{background:rgba(var(--rel),calc(.30 + var(--r,1) * .40))}
.note.para{margin-top:9px}
.note .text{flex:1}
.sid,.aid{font:11px/18px ui-monospace,monospace;color:var(--mute);min-width:22px;text-align:right}
.mark{display:inline-block;min-width:14px;text-align:center;font-size:12px;line-height:18px}
.mark.gold{font:bold 11px/16px ui-monospace,monospace;border:1px solid #99a;border-radius:3px;padding:0 3px;
 background:#fff;color:#334}
.note.gold-essential .mark.gold{background:#334;color:#fff}
.note.s2-fn .mark.gold{outline:2px solid rgb(var(--miss))}.note.s2-fp .mark.pred{color:rgb(var(--bad))}
.case.focus .note{opacity:.42}.case.focus .note.hl{opacity:1}
.note.hl-predicted{border-color:rgb(var(--pred));box-shadow:0 0 0 2px rgba(var(--pred),.25)}
.note.hl-correct{border-color:rgb(var(--ok));box-shadow:0 0 0 2px rgba(var(--ok),.25)}
.note.hl-wrong{border-color:rgb(var(--bad));box-shadow:0 0 0 2px rgba(var(--bad),.25)}
.note.hl-missed{border-color:rgb(var(--miss));border-style:dashed}
.note.hl::after{font:bold 11px/18px system-ui;padding:0 4px;border-radius:3px;color:#fff;white-space:nowrap}
.note.hl-predicted::after{content:"cited";background:rgb(var(--pred))}
.note.hl-gold{border-color:#445}.note.hl-gold::after{content:"gold";background:#445}
.note.hl-correct::after{content:"cited ✓";background:rgb(var(--ok))}
.note.hl-wrong::after{content:"cited, not gold ✗";background:rgb(var(--bad))}
.note.hl-missed::after{content:"gold, missed";background:rgb(var(--miss))}
.answer{background:#f4f6fb;border-radius:4px;padding:6px 9px;margin:4px 0}
ol.answers{list-style:none;padding:0;margin:4px 0}
.ans{display:flex;flex-wrap:wrap;align-items:flex-start;gap:4px 8px;padding:5px 8px;margin:3px 0;
 border:2px solid #e3e6ee;border-radius:5px;cursor:pointer;background:#fff}
.ans:hover,.ans:focus{border-color:#9ab;outline:none}.ans.active{border-color:rgb(var(--pred));background:#eef3ff}
.ans.pinned{box-shadow:0 0 0 3px rgba(var(--pred),.3)}
.ans .text{flex:1 1 70%}.cites{display:flex;flex-wrap:wrap;align-items:flex-start;gap:3px}
.cite{font:11px/17px ui-monospace,monospace;padding:0 5px;border-radius:8px;text-decoration:none;border:1px solid;
 white-space:nowrap}
.cite-predicted{color:rgb(var(--pred));border-color:rgb(var(--pred))}
.cite-correct{color:#fff;background:rgb(var(--ok));border-color:rgb(var(--ok))}
.cite-wrong{color:#fff;background:rgb(var(--bad));border-color:rgb(var(--bad))}
.cite-missed{color:rgb(var(--miss));border-color:rgb(var(--miss));border-style:dashed}
.cite-none{color:var(--mute);border-color:#ccd}.cite-gold{color:#334;border-color:#445}
.hint,.none{color:var(--mute);font-size:12px;margin:2px 0}
@media (max-width:900px){.cols{grid-template-columns:1fr}.anscol{position:static}}
"""

JS = """
(function(){
  var KINDS=['predicted','correct','wrong','missed','gold'];var pinned=null;
  function clear(){
    document.querySelectorAll('.note.hl').forEach(function(n){
      n.classList.remove('hl');KINDS.forEach(function(k){n.classList.remove('hl-'+k);});});
    document.querySelectorAll('.ans.active').forEach(function(a){a.classList.remove('active','pinned');});
    document.querySelectorAll('.case.focus').forEach(function(c){c.classList.remove('focus');});
  }
  function show(a){
    clear();a.classList.add('active');if(a===pinned)a.classList.add('pinned');
    var box=a.closest('.case');if(box)box.classList.add('focus');
    KINDS.forEach(function(k){(a.getAttribute('data-'+k)||'').split(' ').forEach(function(id){
      var n=id&&document.getElementById(id);if(n){n.classList.add('hl','hl-'+k);}});});
  }
  function toggle(a){if(pinned===a){pinned=null;clear();}else{pinned=a;show(a);}}
  document.querySelectorAll('.ans').forEach(function(a){
    a.addEventListener('mouseenter',function(){if(!pinned)show(a);});
    a.addEventListener('mouseleave',function(){if(!pinned)clear();else show(pinned);});
    a.addEventListener('click',function(ev){if(ev.target.closest('a'))return;toggle(a);});
    a.addEventListener('keydown',function(ev){if(ev.key==='Enter'||ev.key===' '){ev.preventDefault();toggle(a);}});
  });
  function fromHash(){
    var m=/^#focus=([A-Za-z0-9-]+)$/.exec(location.hash);if(!m)return;
    var a=document.getElementById(m[1]);if(!a||!a.classList.contains('ans'))return;
    pinned=a;show(a);var r=a.getBoundingClientRect();
    if(r.top<0||r.bottom>window.innerHeight)a.closest('.case').scrollIntoView();
  }
  window.addEventListener('hashchange',fromHash);
  if(document.readyState==='complete')fromHash();else window.addEventListener('load',fromHash);
})();
"""
