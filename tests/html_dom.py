"""A page as a browser's DOM, read with the stdlib parser, and the checks every report.html must pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = {"meta", "br", "img", "input", "link", "hr", "col", "source", "wbr"}
KINDS = ("predicted", "correct", "wrong", "missed", "gold")


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    section: str | None  # id of the enclosing <section class="case">
    text: list[str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    @property
    def content(self) -> str:
        return "".join(self.text)


class Dom(HTMLParser):
    """Every element with its attributes, its text and the case section it lies in."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.open: list[Element] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        parent = self.open[-1].section if self.open else None
        attrs = {k: v or "" for k, v in attrs}
        section = attrs.get("id") if tag == "section" and "case" in attrs.get("class", "").split() else parent
        el = Element(tag, attrs, section)
        self.elements.append(el)
        if tag not in VOID:
            self.open.append(el)

    def handle_endtag(self, tag):
        for i in range(len(self.open) - 1, -1, -1):
            if self.open[i].tag == tag:
                del self.open[i:]
                return

    def handle_data(self, data):
        for el in self.open:
            el.text.append(data)

    def find(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        return [e for e in self.elements if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)]

    @property
    def by_id(self) -> dict[str, Element]:
        return {e.attrs["id"]: e for e in self.elements if "id" in e.attrs}


def check_page_is_self_contained(dom: Dom) -> None:
    """No URL that leaves the file; a CSP that forbids every fetch; our one script, no inline handlers."""
    csp = [e for e in dom.find("meta") if e.attrs.get("http-equiv", "").lower() == "content-security-policy"]
    assert len(csp) == 1 and "default-src 'none'" in csp[0].attrs["content"]
    for el in dom.elements:
        for name, value in el.attrs.items():
            assert not name.startswith("on"), (el.tag, name)
            if name in ("src", "href", "action", "srcset", "poster", "formaction", "background", "xlink:href"):
                assert value.startswith("#") or value.startswith("data:image/png;base64,"), (el.tag, name, value)
            if name == "style":
                assert "url(" not in value, (el.tag, value)
    for style in dom.find("style"):
        assert "url(" not in style.content and "@import" not in style.content
    scripts = dom.find("script")
    assert len(scripts) == 1 and "src" not in scripts[0].attrs
    assert not dom.find("link") and not dom.find("iframe") and not dom.find("object")


def check_links(dom: Dom) -> dict[str, dict[str, dict[str, set[str]]]]:
    """Every answer sentence's cited ids exist as note sentences of its own case; returns
    case id -> answer id -> kind -> cited note sentence ids (the data's ids, read off the page)."""
    ids = dom.by_id
    out: dict[str, dict[str, dict[str, set[str]]]] = {}
    for section in dom.find("section", "case"):
        out[section.attrs["data-case-id"]] = {}
    case_of = {s.attrs["id"]: s.attrs["data-case-id"] for s in dom.find("section", "case")}
    for ans in dom.find("li", "ans"):
        assert ans.section is not None and "data-cites" in ans.attrs
        cited = ans.attrs["data-cites"].split()
        by_kind = {k: ans.attrs.get(f"data-{k}", "").split() for k in KINDS}
        assert sorted(cited) == sorted(x for k in KINDS for x in by_kind[k])  # every citation has one kind
        for anchor in cited:
            note = ids.get(anchor)
            assert note is not None and "note" in note.classes, anchor
            assert note.section == ans.section, (anchor, ans.attrs["id"])  # never another case's sentence
        out[case_of[ans.section]][ans.attrs["data-aid"]] = {
            k: {ids[a].attrs["data-sid"] for a in by_kind[k]} for k in KINDS
        }
    return out
