"""Named, locked measurement protocols.

A protocol fixes everything that changes a number: which text, the window
length, how many tokens are scored, the calibration draw, and the speed
workload. Its name is printed beside every result so runs can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.errors import SlimlmError


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

    def __post_init__(self) -> None:
        if self.eval_tokens % self.window:
            raise ValueError(f"eval_tokens {self.eval_tokens} must be a multiple of window {self.window}")


PROTOCOLS: dict[str, Protocol] = {
    "wiki-v1": Protocol(name="wiki-v1", text="wiki-v1"),
    # Zero-dependency fallback text (Python's own pydoc topics), same workload.
    "pydoc-v1": Protocol(name="pydoc-v1", text="pydoc-v1"),
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise SlimlmError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}") from None
