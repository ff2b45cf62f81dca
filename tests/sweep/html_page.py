"""A parsed report page (stdlib html.parser): elements with their ancestors, and text with its ancestors."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser

_VOID = {"meta", "br", "img", "link", "input", "hr", "source", "area", "base", "col", "embed", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str | None]
    ancestors: tuple["Element", ...]
    text: list[str] = field(default_factory=list)  # all text inside it, descendants included

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def inside(self, tag: str) -> "Element | None":
        return next((a for a in reversed(self.ancestors) if a.tag == tag), None)

    @property
    def content(self) -> str:
        return "".join(self.text)


class Page(HTMLParser):
    def __init__(self, source: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(source)
        self.close()

    def handle_starttag(self, tag, attrs):
        el = Element(tag, dict(attrs), tuple(self._open))
        self.elements.append(el)
        if tag not in _VOID:
            self._open.append(el)

    def handle_startendtag(self, tag, attrs):
        self.elements.append(Element(tag, dict(attrs), tuple(self._open)))

    def handle_endtag(self, tag):
        for k in range(len(self._open) - 1, -1, -1):
            if self._open[k].tag == tag:
                del self._open[k:]
                return

    def handle_data(self, data):
        for el in self._open:
            el.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[Element]:
        return [e for e in self.elements if e.tag == tag and all(e.attrs.get(k.replace("_", "-")) == v
                                                                  for k, v in attrs.items())]  # fmt: skip
