"""Wikitext -> plain English prose, for language-model perplexity.

gensim's ``filter_wiki`` keeps case, but it leaves ``'''bold'''`` quotes and
``== heading ==`` markers, turns table rows into stray lines and deletes
every ``[``/``]`` in the prose, and importing it pulls in all of gensim. This
stripper keeps the text natural instead:

- dropped: comments, ``<ref>`` footnotes, ``<math>``/``<gallery>``-style
  blocks, templates ``{{..}}`` (nested), tables ``{|..|}``,
  ``[[File:..]]``/``[[Image:..]]``/``[[Category:..]]``/interlanguage links
  (nested captions included), magic words, the trailing reference-like
  sections ("References", "External links", ...);
- kept as text: ``[[target|label]]`` -> label, ``[[target]]`` -> target,
  ``[http://url label]`` -> label, ``'''bold'''``/``''italic''`` -> plain,
  ``== Heading ==`` -> a plain ``Heading`` line, list items without their
  ``*``/``#``/``:`` markers, the content of inline html tags, entities
  decoded.
"""

from __future__ import annotations

import html
import re

__all__ = ["strip_wikitext"]

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
# Footnotes: self-closing <ref name=x/> first, then <ref ...>...</ref>.
_REF_EMPTY = re.compile(r"<ref\b[^>]*/\s*>", re.IGNORECASE)
_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
# Tags whose content is not prose: dropped with what they enclose.
_BLOCK_TAGS = ("math", "gallery", "timeline", "score", "syntaxhighlight", "source",
               "imagemap", "references", "chem", "hiero", "graph", "mapframe")
_BLOCK = re.compile(
    r"<(%s)\b[^>]*?(?:/>|>.*?</\1\s*>)" % "|".join(_BLOCK_TAGS), re.IGNORECASE | re.DOTALL)
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^>]*>")
# Template / table delimiters; table delimiters count only at a line start.
_BRACES = re.compile(r"\{\{|\}\}|^[ \t]*\{\||^[ \t]*\|\}", re.MULTILINE)
_BRACKETS = re.compile(r"\[\[|\]\]")
# [[File:..]], [[Image:..]], [[Category:..]], [[fr:..]] and friends: dropped.
_DROP_LINK = re.compile(
    r"\[\[\s*(?:file|image|media|category|[a-z]{2,3}(?:-[a-z]+)?)\s*:", re.IGNORECASE)
_LINK_LABEL = re.compile(r"\[\[([^\[\]|]*)\|([^\[\]]*)\]\]")
_LINK_BARE = re.compile(r"\[\[:?([^\[\]|]*)\]\]")
_EXT_LINK_LABEL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s+([^\]]*)\]")
_EXT_LINK_BARE = re.compile(r"\[(?:https?|ftp)://[^\s\]]*\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_LIST_MARKER = re.compile(r"^[*#:;]+[ \t]*", re.MULTILINE)
_MAGIC = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"[ \t]+([,.;:!?)])")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")
# Sections after which an article holds only citations, links and lists.
_TAIL_SECTIONS = re.compile(
    r"^=+\s*(references|external links|see also|further reading|notes|bibliography|"
    r"sources|citations|footnotes|notes and references|references and notes)\s*=+\s*$",
    re.IGNORECASE | re.MULTILINE)


def _drop_nested(text: str) -> str:
    """Remove ``{{templates}}`` and ``{|tables|}``, nested in any order.

    A stack of open delimiters; text is kept only where the stack is empty.
    ``|}`` closes a table only while a table is innermost (inside a template
    ``|}}`` is a parameter end followed by ``}}``). A stray closer is dropped;
    an opener left open at the end drops only its own paragraph.
    """
    out: list[str] = []
    stack: list[tuple[str, int]] = []  # (kind, start offset)
    keep_from = 0
    pos = 0
    while (m := _BRACES.search(text, pos)) is not None:
        tok = m.group().strip()
        pos = m.end()
        if tok in ("{{", "{|"):
            if not stack:
                out.append(text[keep_from:m.start()])
            stack.append((tok, m.start()))
            continue
        want = "{{" if tok == "}}" else "{|"
        if stack and stack[-1][0] == want:
            stack.pop()
            if not stack:
                keep_from = pos
        elif tok == "|}" and stack:
            pos = m.start() + len(m.group()) - 1  # re-read the "}" as part of "}}"
        elif not stack:  # a stray closer: drop it, keep the text before it
            out.append(text[keep_from:m.start()])
            keep_from = pos
    if stack:
        start = stack[0][1]
        para_end = text.find("\n\n", start)
        if para_end == -1:
            return "".join(out)
        return "".join(out) + _drop_nested(text[para_end:])
    out.append(text[keep_from:])
    return "".join(out)


def _drop_namespaced_links(text: str) -> str:
    """Remove ``[[File:...]]``-style links, captions with nested links included."""
    out: list[str] = []
    pos = 0
    while (m := _DROP_LINK.search(text, pos)) is not None:
        out.append(text[pos:m.start()])
        depth, scan = 1, m.end()
        while depth and (b := _BRACKETS.search(text, scan)) is not None:
            depth += 1 if b.group() == "[[" else -1
            scan = b.end()
        if depth == 0:
            pos = scan
        else:  # unclosed: drop the rest of the line only
            newline = text.find("\n", m.end())
            pos = len(text) if newline == -1 else newline
    out.append(text[pos:])
    return "".join(out)


def _link_label(m: re.Match) -> str:
    target, label = m.group(1), m.group(2)
    if label.strip():
        return label
    return re.sub(r"\s*\(.*?\)\s*$", "", target.lstrip(":"))  # pipe trick [[Foo (bar)|]] -> Foo


def _cut_tail_sections(text: str) -> str:
    m = _TAIL_SECTIONS.search(text)
    return text[:m.start()] if m else text


def _tidy(text: str) -> str:
    text = _EMPTY_PARENS.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    lines = [line.strip() for line in text.split("\n")]
    # Lines of leftover punctuation only (e.g. "|" or "," after a removed template).
    lines = [line for line in lines if not line or re.search(r"\w", line)]
    text = "\n".join(lines)
    return _BLANK_LINES.sub("\n\n", text).strip()


def strip_wikitext(raw: str) -> str:
    """Plain prose from one article's wikitext; case and punctuation kept."""
    text = _COMMENT.sub("", raw)
    text = _cut_tail_sections(text)
    text = _REF_EMPTY.sub("", text)
    text = _REF.sub("", text)
    text = _BLOCK.sub("", text)
    text = _drop_nested(text)
    text = _drop_namespaced_links(text)
    text = _LINK_LABEL.sub(_link_label, text)
    text = _LINK_BARE.sub(r"\1", text)
    text = _EXT_LINK_LABEL.sub(r"\1", text)
    text = _EXT_LINK_BARE.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _LIST_MARKER.sub("", text)
    text = _MAGIC.sub("", text)
    text = _BR.sub("\n", text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    return _tidy(text)
