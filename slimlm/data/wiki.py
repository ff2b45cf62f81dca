"""The Wikipedia articles shipped in gensim's wheel, parsed once and cached.

gensim's test data holds a shortened dump of the first English Wikipedia
pages (about 105 articles, CC BY-SA). The file is found through
``importlib.util.find_spec`` so gensim itself (numpy, scipy, ...) is never
imported. Parsing (bz2 + XML + markup stripping) runs once; the result is
cached as JSON under ``cache_dir()/text/``, keyed by the dump's sha256 and
the stripper's version.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator
from xml.etree.ElementTree import ParseError, iterparse

from slimlm.data.wikimarkup import strip_wikitext
from slimlm.errors import SlimlmError
from slimlm.fsutil import atomic_write_text, cache_dir

__all__ = ["Article", "wiki_articles", "wiki_dump_path", "parse_wiki_dump"]

logger = logging.getLogger(__name__)

WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when strip_wikitext or the page filter changes: old caches are then ignored.
PARSER_VERSION = 1


@dataclass(frozen=True)
class Article:
    title: str
    text: str


def wiki_dump_path() -> Path:
    """The gensim dump's path, or a SlimlmError naming the fix."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError(
            "the 'wiki' text needs gensim's bundled Wikipedia articles: run `pip install gensim`, "
            "or use the zero-dependency 'pydoc' text (protocol 'pydoc-v1')")
    for root in spec.submodule_search_locations:
        path = Path(root) / WIKI_DUMP
        if path.is_file():
            return path
    raise SlimlmError(
        f"gensim is installed but its test data {WIKI_DUMP} is missing: reinstall it with "
        "`pip install --force-reinstall gensim`, or use the 'pydoc' text")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _iter_pages(path: Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of each main-namespace, non-redirect page, in file order."""
    with bz2.open(path, "rb") as f:
        for _, elem in iterparse(f, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in elem}
            ns = fields.get("ns")
            revision = fields.get("revision")
            is_article = ns is not None and (ns.text or "").strip() == "0" and "redirect" not in fields
            if is_article and revision is not None:
                text = next((c.text for c in revision if _local(c.tag) == "text"), None) or ""
                title = fields["title"].text if "title" in fields else ""
                yield title or "", text
            elem.clear()


def parse_wiki_dump(path: Path) -> list[Article]:
    """Parse and strip a MediaWiki XML dump (.bz2); empty articles are dropped."""
    articles = []
    try:
        for title, wikitext in _iter_pages(path):
            if wikitext.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = strip_wikitext(wikitext)
            if text:
                articles.append(Article(title, text))
    except (OSError, EOFError, ParseError) as e:
        raise SlimlmError(f"cannot parse the Wikipedia dump {path}: {e}; reinstall gensim") from e
    return articles


def _cache_path(dump: Path) -> Path:
    digest = hashlib.sha256(dump.read_bytes()).hexdigest()[:16]
    return cache_dir() / "text" / f"wiki-{digest}-v{PARSER_VERSION}.json"


def _read_cache(path: Path) -> list[Article] | None:
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        return [Article(a["title"], a["text"]) for a in payload["articles"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        logger.warning("ignoring unreadable text cache %s (%s); parsing again", path, e)
        return None


def wiki_articles(*, use_cache: bool = True) -> list[Article]:
    """The gensim Wikipedia articles as plain text, in file order."""
    dump = wiki_dump_path()
    cache = _cache_path(dump)
    if use_cache and (cached := _read_cache(cache)) is not None:
        return cached
    t0 = time.perf_counter()
    articles = parse_wiki_dump(dump)
    logger.info("parsed %d Wikipedia articles from %s in %.2f s", len(articles), dump.name,
                time.perf_counter() - t0)
    if use_cache:
        payload = {"parser_version": PARSER_VERSION, "source": dump.name,
                   "articles": [asdict(a) for a in articles]}
        atomic_write_text(cache, json.dumps(payload, ensure_ascii=False))
    return articles
