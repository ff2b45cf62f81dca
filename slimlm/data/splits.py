"""Locked calibration / evaluation splits, by document, identical everywhere.

Each document goes to evaluation when a sha256 of (seed, key), read as a
number in [0, 1), falls below ``eval_fraction``. The key is the document's
index and text, or a caller's stable key (a protocol uses the article
title, so refining the markup stripper cannot move an article across). The
assignment depends on nothing but the inputs (not on Python's salted
``hash``, the machine or the run), and calibration never sees a sentence of
an evaluation article because documents are never cut.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from slimlm.data.sources import SOURCES
from slimlm.errors import SlimlmError

__all__ = ["Split", "ProtocolText", "PROTOCOL_TEXTS", "split_documents", "protocol_texts"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    calibration: list[str]
    evaluation: list[str]


@dataclass(frozen=True)
class ProtocolText:
    """Which text a protocol uses and how it is split; part of the protocol's identity."""
    source: str
    eval_fraction: float = 0.25
    seed: int = 0


PROTOCOL_TEXTS: dict[str, ProtocolText] = {
    "wiki-v1": ProtocolText(source="wiki"),
    "pydoc-v1": ProtocolText(source="pydoc"),
}


def _unit_hash(seed: int, key: str) -> float:
    """A stable number in [0, 1) for one document key."""
    h = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_documents(docs: list[str], *, eval_fraction: float = 0.25, seed: int = 0,
                    keys: list[str] | None = None) -> Split:
    """Disjoint calibration/evaluation sets covering ``docs``, in their original order.

    ``keys`` (unique, one per document) replace the default key
    ``"<index>\\x00<text>"``. Both sides are non-empty: if the hash leaves one
    side empty (possible for a handful of documents), the document whose hash
    lies nearest the threshold moves across.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise SlimlmError(f"eval_fraction must lie strictly between 0 and 1, got {eval_fraction}")
    if len(docs) < 2:
        raise SlimlmError(f"splitting into calibration and evaluation text needs at least 2 "
                          f"documents, got {len(docs)}; split the text on blank lines or add more")
    if keys is None:
        keys = [f"{i}\x00{d}" for i, d in enumerate(docs)]
    elif len(keys) != len(docs) or len(set(keys)) != len(keys):
        raise SlimlmError(f"split keys must be unique and one per document: got {len(set(keys))} "
                          f"distinct keys for {len(docs)} documents")
    u = [_unit_hash(seed, k) for k in keys]
    is_eval = [x < eval_fraction for x in u]
    if not any(is_eval):
        is_eval[min(range(len(u)), key=u.__getitem__)] = True
    if all(is_eval):
        is_eval[max(range(len(u)), key=u.__getitem__)] = False
    split = Split(calibration=[d for d, e in zip(docs, is_eval) if not e],
                  evaluation=[d for d, e in zip(docs, is_eval) if e])
    logger.debug("split %d documents: %d calibration, %d evaluation (seed %d)",
                 len(docs), len(split.calibration), len(split.evaluation), seed)
    return split


def protocol_texts(name: str = "wiki-v1") -> Split:
    """The calibration/evaluation texts of a named protocol (see PROTOCOL_TEXTS)."""
    if name not in PROTOCOL_TEXTS:
        raise SlimlmError(f"unknown text protocol {name!r}; valid: {', '.join(PROTOCOL_TEXTS)}")
    spec = PROTOCOL_TEXTS[name]
    keyed = SOURCES[spec.source]()
    return split_documents([text for _, text in keyed], keys=[key for key, _ in keyed],
                           eval_fraction=spec.eval_fraction, seed=spec.seed)
