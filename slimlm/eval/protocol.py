"""Named, locked measurement protocols, and ad-hoc ones on a user's own text.

A protocol fixes everything that changes a number: which text, the window
length, how many tokens are scored, the calibration draw, and the speed
workload. Its name is printed beside every result so runs can be compared.

``with_user_text(protocol, calib_data=..., eval_data=...)`` derives an
ad-hoc protocol with the same window, calibration and speed settings that
reads a user's text instead; when it scores a user's text its name carries
the text's hash (``wiki-v1+text:<sha256[:12]>``), so results on different
texts never share a name, a cache entry or a comparison table.

``for_tokenizer(protocol, tokenizer)`` is the protocol as measured with one
tokenizer: when the tokenizer starts inputs with BOS every window begins with
it (see ``slimlm.data.tokens``) and the name gains ``+bos``
(``wiki-v1+bos``), since those numbers differ from the plain windows'. A
tokenizer without BOS (the built-in SmolLM2's) keeps ``wiki-v1`` and its
numbers bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from slimlm.data import PROTOCOL_TEXTS, Text, bos_id, calibration_batch, protocol_texts, user_texts
from slimlm.errors import SlimlmError
from slimlm.validate import check_pos_int


@dataclass(frozen=True)
class Protocol:
    name: str
    text: str  # a name in slimlm.data.PROTOCOL_TEXTS
    window: int = 512  # tokens per non-overlapping perplexity window
    eval_tokens: int = 16_384  # default budget; --full scores the whole evaluation set
    kl_top_k: int = 128  # base distribution kept per position for KL (plus a tail bucket)
    calib_samples: int = 128
    calib_seq_len: int = 512
    calib_seed: int = 0
    prompt_tokens: int = 512  # speed: prefill length
    new_tokens: int = 128  # speed: greedy decode length
    speed_runs: int = 3  # timed runs after one warm-up; the median is reported
    calib_text: Text | None = field(default=None, repr=False)  # a user's text instead of the calibration split
    eval_text: Text | None = field(default=None, repr=False)  # a user's text instead of the evaluation split
    derived_from: str | None = None  # the named protocol an ad-hoc one keeps the settings of
    bos: int | None = None  # the BOS id each window starts with (set by for_tokenizer), None for none

    def __post_init__(self) -> None:
        if self.eval_tokens % self.window:
            raise ValueError(f"eval_tokens {self.eval_tokens} must be a multiple of window {self.window}")

    def calibration_documents(self) -> list[str]:
        return list(self.calib_text.documents) if self.calib_text else protocol_texts(self.text).calibration

    def evaluation_documents(self) -> list[str]:
        return list(self.eval_text.documents) if self.eval_text else protocol_texts(self.text).evaluation


PROTOCOLS: dict[str, Protocol] = {
    "wiki-v1": Protocol(name="wiki-v1", text="wiki-v1"),
    # Zero-dependency fallback text (Python's own pydoc topics), same workload.
    "pydoc-v1": Protocol(name="pydoc-v1", text="pydoc-v1"),
}


def get_protocol(name: str | Protocol) -> Protocol:
    if isinstance(name, Protocol):
        return name
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise SlimlmError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}") from None


BOS_SUFFIX = "+bos"


def for_tokenizer(protocol: str | Protocol, tokenizer: Any) -> Protocol:
    """``protocol`` as measured with ``tokenizer``: BOS-first windows and a ``+bos`` name when it adds BOS."""
    proto = get_protocol(protocol)
    if proto.bos is not None:  # measured with another tokenizer before: start from the plain protocol
        plain = proto.name.removesuffix(BOS_SUFFIX)
        derived = None if proto.derived_from == plain else proto.derived_from  # None: set by this function
        proto = dataclasses.replace(proto, name=plain, bos=None, derived_from=derived)
    bos = bos_id(tokenizer)
    if bos is None:
        return proto
    return dataclasses.replace(proto, name=proto.name + BOS_SUFFIX, bos=bos,
                               derived_from=proto.derived_from or proto.name)


def with_user_text(protocol: str | Protocol, *, calib_data: str | None = None,
                   eval_data: str | None = None) -> Protocol:
    """``protocol`` reading a user's calibration and/or evaluation text (see ``slimlm.data.user_texts``).

    The same source for both is split by document like the protocol's own
    text; different sources are each used whole. Only the evaluation text
    renames the protocol: calibration changes the model, not the measurement.
    """
    proto = get_protocol(protocol)
    if calib_data is None and eval_data is None:
        return proto
    split = PROTOCOL_TEXTS[proto.text]
    calib, evaluation = user_texts(calib_data, eval_data, eval_fraction=split.eval_fraction, seed=split.seed)
    named = proto.derived_from or proto.name
    name = f"{named}+text:{evaluation.sha256[:12]}" if evaluation else proto.name
    if evaluation and proto.bos is not None:
        name += BOS_SUFFIX
    return dataclasses.replace(proto, name=name, calib_text=calib or proto.calib_text,
                               eval_text=evaluation or proto.eval_text,
                               derived_from=named)  # fmt: skip


def calibration_ids(tokenizer: Any, protocol: str | Protocol = "wiki-v1", *,
                    n_samples: int | None = None) -> torch.Tensor:
    """The protocol's calibration batch: (n_samples, seq_len) token ids, seeded by ``calib_seed``.

    Drawn from the protocol's calibration split (disjoint, by document, from
    its evaluation text) or from the user's calibration text of an ad-hoc
    protocol.
    """
    proto = get_protocol(protocol)
    if n_samples is not None:
        check_pos_int("--calib-samples", n_samples, "calibration sequences")
    name = f"the calibration text {proto.calib_text.source}" if proto.calib_text else "the calibration text"
    return calibration_batch(tokenizer, proto.calibration_documents(), n_samples=n_samples or proto.calib_samples,
                             seq_len=proto.calib_seq_len, seed=proto.calib_seed, name=name)  # fmt: skip


def calibration_record(protocol: str | Protocol, calib: torch.Tensor, *, bos: bool = False) -> dict[str, Any]:
    """What a checkpoint's manifest says about its calibration batch ``calib`` (N, L); ``bos``: BOS first."""
    proto = get_protocol(protocol)
    record: dict[str, Any] = {"protocol": proto.derived_from or proto.name}
    if proto.calib_text is not None:
        record.update(proto.calib_text.record())
    record.update(samples=calib.shape[0], seq_len=calib.shape[1], seed=proto.calib_seed)
    if bos:  # absent without BOS, so manifests stay as they were
        record["bos"] = True
    return record
