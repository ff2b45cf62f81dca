"""Text sources: named built-ins, a user's text/JSONL file, an hf: dataset.

``load_documents(source)`` is the one entry point. It resolves, in order:

1. a name in ``SOURCES`` (``wiki``, ``pydoc``);
2. ``hf:<path>[:<config>]:<split>[:<column>]`` (see ``slimlm.data.hf``);
3. a file path: ``.jsonl`` reads one JSON object with a ``text`` field per
   line; any other file is plain UTF-8 text, split into documents on blank
   lines (one paragraph = one document, so the calibration/evaluation split
   has units to divide). A directory is read as a ``save_to_disk`` dataset.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable

from slimlm.data.hf import load_hf_documents
from slimlm.data.wiki import wiki_articles
from slimlm.errors import SlimlmError

__all__ = ["SOURCES", "load_documents", "wiki_documents", "pydoc_documents",
           "read_text_file", "read_jsonl_file"]

logger = logging.getLogger(__name__)

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def wiki_keyed() -> list[tuple[str, str]]:
    """(title, text) of gensim's Wikipedia articles, in file order."""
    return [(a.title, a.text) for a in wiki_articles()]


def pydoc_keyed() -> list[tuple[str, str]]:
    """(topic, text) of Python's own help topics (``pydoc_data.topics``), in module order.

    The text differs between Python versions, so 'pydoc' numbers are only
    comparable under the same Python minor version.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data
        raise SlimlmError("this Python has no pydoc_data module; use the 'wiki' text "
                          "(pip install gensim) or a text file") from e
    return [(name, text.strip()) for name, text in topics.items() if text.strip()]


# The named built-in texts, as (stable key, text) pairs: the key (article
# title, topic name) is what a protocol's split hashes, so the split does not
# move when the text extraction is refined. load_documents dispatches here first.
SOURCES: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "wiki": wiki_keyed,
    "pydoc": pydoc_keyed,
}


def wiki_documents() -> list[str]:
    """gensim's Wikipedia articles (title dropped; the text is the document)."""
    return [text for _, text in wiki_keyed()]


def pydoc_documents() -> list[str]:
    """Python's help topics as documents."""
    return [text for _, text in pydoc_keyed()]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SlimlmError(f"{path} is not UTF-8 text ({e}); convert it or pass a .jsonl file") from e
    except OSError as e:
        raise SlimlmError(f"cannot read {path}: {e.strerror or e}") from e


def read_text_file(path: str | Path) -> list[str]:
    """Paragraphs (blank-line separated, stripped, non-empty) of a UTF-8 text file."""
    text = _read_utf8(Path(path))
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def read_jsonl_file(path: str | Path) -> list[str]:
    """The ``text`` field of each line of a JSONL file; blank lines are skipped."""
    path = Path(path)
    docs = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlimlmError(f"{path} line {lineno} is not valid JSON ({e.msg}); "
                              'each line must be an object like {"text": "..."}') from e
        if not isinstance(record, dict) or "text" not in record:
            raise SlimlmError(f'{path} line {lineno} has no "text" field; '
                              'each line must be an object like {"text": "..."}')
        if not isinstance(record["text"], str):
            raise SlimlmError(f'{path} line {lineno}: "text" is {type(record["text"]).__name__}, '
                              "not a string")
        if record["text"].strip():
            docs.append(record["text"])
    return docs


def _looks_like_path(source: str) -> bool:
    return "/" in source or "\\" in source or Path(source).suffix != "" or Path(source).exists()


def _load_path(source: str) -> list[str]:
    path = Path(source).expanduser()
    if path.is_dir():
        return load_hf_documents(str(path))
    if not path.is_file():
        raise SlimlmError(f"text file {source} does not exist; pass an existing .txt or .jsonl "
                          f"file, or one of: {', '.join(SOURCES)}")
    if path.suffix.lower() == ".jsonl":
        return read_jsonl_file(path)
    return read_text_file(path)


def load_documents(source: str) -> list[str]:
    """Documents (non-empty strings) of a named text, an hf: dataset or a file."""
    if source in SOURCES:
        docs = [text for _, text in SOURCES[source]()]
    elif source.startswith("hf:"):
        docs = load_hf_documents(source[len("hf:"):])
    elif _looks_like_path(source):
        docs = _load_path(source)
    else:
        raise SlimlmError(
            f"unknown text source {source!r}; valid: {', '.join(SOURCES)}, "
            "hf:<path>[:<config>]:<split>[:<column>], or a path to a .txt/.jsonl file")
    if not docs:
        raise SlimlmError(f"text source {source!r} holds no text; pass a non-empty source")
    logger.debug("loaded %d documents from %s", len(docs), source)
    return docs
