"""The small Markdown our own reports are written in (``ladder.md``), as HTML.

Headings (``#``..``####``), ``>`` quotes, pipe tables, paragraphs and ```code``` spans:
exactly what :func:`evaluation.ladder.ladder_markdown` writes, so the ladder has one
source. Every piece of text is HTML-escaped; nothing else of Markdown is interpreted.
"""

from __future__ import annotations

import html
import re

_HEADING = re.compile(r"^(#{1,4})\s+(.*)$")
_CODE = re.compile(r"`([^`]*)`")


def inline(text: str) -> str:
    """Escaped text with ```code``` spans."""
    parts = _CODE.split(text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    header, body = _cells(lines[0]), [_cells(r) for r in lines[2:]]
    head = "".join(f"<th>{inline(c)}</th>" for c in header)
    rows = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def markdown_to_html(text: str, heading_offset: int = 1) -> str:
    """HTML of ``text``; headings move down ``heading_offset`` levels (the page has its own h1)."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading:
            level = min(len(heading.group(1)) + heading_offset, 6)
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
            i += 1
            continue
        block = [line]
        i += 1
        kind = "table" if line.startswith("|") else "quote" if line.startswith(">") else "p"
        while i < len(lines) and lines[i].strip() and not _HEADING.match(lines[i]):
            follows = "table" if lines[i].startswith("|") else "quote" if lines[i].startswith(">") else "p"
            if follows != kind:
                break
            block.append(lines[i])
            i += 1
        if kind == "table" and len(block) >= 2:
            out.append(_table(block))
        elif kind == "quote":
            out.append("<blockquote>" + "<br>".join(inline(b.lstrip(">").strip()) for b in block) + "</blockquote>")
        else:
            out.append("<p>" + "<br>".join(inline(b) for b in block) + "</p>")
    return "\n".join(out)
