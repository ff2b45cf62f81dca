"""A user's own text for calibration and evaluation, named by its source and a content hash.

``load_text("notes.txt")`` reads any source ``load_documents`` accepts and
keeps a sha256 of the documents, so a result can say exactly which text it
was measured on and two results are comparable only when the hashes agree.

``user_texts(calib_source, eval_source)`` decides what each side reads: one
source given for both is split by document like a protocol's text (so no
calibration sentence is ever scored); two different sources are used whole.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from slimlm.data.sources import load_documents
from slimlm.data.splits import split_documents

__all__ = ["Text", "load_text", "text_sha256", "user_texts"]

logger = logging.getLogger(__name__)


def text_sha256(docs: list[str] | tuple[str, ...]) -> str:
    """A hash of the documents themselves: each one's UTF-8 length, then its bytes.

    The length prefix makes the boundaries part of the hash, so two texts
    that differ only in how they are cut into documents hash differently.
    """
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class Text:
    """Documents with their provenance. ``part`` is "all", or the side of a split it is."""

    source: str
    documents: tuple[str, ...] = field(repr=False)
    sha256: str = ""
    part: str = "all"

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", text_sha256(self.documents))

    def record(self) -> dict[str, str]:
        """What a manifest or result says about this text."""
        rec = {"source": self.source, "sha256": self.sha256}
        if self.part != "all":
            rec["part"] = self.part
        return rec


def load_text(source: str) -> Text:
    """Every document of ``source`` (a .txt/.jsonl file, ``hf:...``, or a built-in name)."""
    return Text(source=source, documents=tuple(load_documents(source)))


def user_texts(calib_source: str | None, eval_source: str | None, *, eval_fraction: float = 0.25,
               seed: int = 0) -> tuple[Text | None, Text | None]:
    """(calibration text, evaluation text); None where the caller gave no source.

    When both sources hold the same documents, they are split by document
    with ``eval_fraction``/``seed`` (a protocol's split settings); otherwise
    each text is used whole.
    """
    calib = load_text(calib_source) if calib_source is not None else None
    evaluation = load_text(eval_source) if eval_source is not None else None
    if calib is None or evaluation is None or calib.sha256 != evaluation.sha256:
        return calib, evaluation
    split = split_documents(list(calib.documents), eval_fraction=eval_fraction, seed=seed)
    logger.info("splitting %s by document: %d for calibration, %d for evaluation", calib.source,
                len(split.calibration), len(split.evaluation))
    return (Text(calib.source, tuple(split.calibration), part="calibration"),
            Text(evaluation.source, tuple(split.evaluation), part="evaluation"))
