"""Speculative generation with slimlm's decoder: measure what a round costs with a ready draft,
generate (streaming), and time plain decoding through the same loop for the speedup.

    report = run_speculative(model, prompt_ids, PromptLookupDraft(), max_new_tokens=128)
    report.summary()  # acceptance, tokens per target call, speedup, whether greedy output is unchanged
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.generation.sampling import Sampling
from slimlm.generation.speculative.adaptive import Costs
from slimlm.generation.speculative.loop import Draft, SpecConfig, SpecStats, speculative_generate
from slimlm.generation.speculative.runner import DecoderRunner

log = logging.getLogger("slimlm.generation")


def measure_costs(target: DecoderRunner, draft: Any, context: Tensor, *, k_max: int = 8,
                  reps: int = 3) -> Costs:  # fmt: skip
    """Time one target step, target forwards over 2..k_max+1 tokens and one drafted token
    (best of ``reps``, after the context is in both caches), as a ``Costs`` table.

    Leaves both caches empty. ``context`` (L,) needs at least k_max + 2 tokens.
    """
    if context.numel() < k_max + 2:
        raise SlimlmError(f"measuring costs needs a context of >= {k_max + 2} tokens, got {context.numel()}")
    target.crop(0)
    target.feed(context[:-1], n_logits=1)
    L = target.length

    def forward(T: int) -> float:  # seconds for a target forward over T tokens, rolled back after
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            target.feed(context[-T:])
            best = min(best, time.perf_counter() - t0)
            target.crop(L)
        return best

    forward(1)  # warm-up
    step = forward(1)
    verify = tuple(forward(T) / step for T in range(2, k_max + 2))
    draft.rollback(0)
    draft.propose(context, 1, Sampling())  # the draft reads the context once
    per_token = float("inf")
    for _ in range(reps):
        draft.rollback(context.numel())
        t0 = time.perf_counter()
        draft.propose(context, 4, Sampling())
        per_token = min(per_token, (time.perf_counter() - t0) / 4)
    target.crop(0)
    draft.rollback(0)
    costs = Costs(draft=per_token / step, verify=verify)
    log.info("costs in target steps (%.1f ms): draft %.2f, verify %s", 1e3 * step, costs.draft,
             ", ".join(f"{v:.2f}" for v in verify))  # fmt: skip
    return costs




@dataclass
class SpecReport:
    draft: str
    tokens: list[int]
    stats: SpecStats
    costs: Costs | None = None
    plain: SpecStats | None = None  # plain decoding through the same loop, when measured
    identical: bool | None = None  # greedy: the output equals plain greedy decoding

    @property
    def speedup(self) -> float | None:
        if self.plain is None or not self.stats.decode_seconds:
            return None
        return self.plain.decode_seconds / self.stats.decode_seconds

    def summary(self) -> str:
        st = self.stats
        line = (f"draft {self.draft}: acceptance {st.acceptance_rate:.0%} ({st.accepted}/{st.proposed} drafted), "
                f"{st.tokens_per_call:.2f} tokens per target call ({st.new_tokens} tokens, {st.target_calls} calls), "
                f"{st.new_tokens / st.decode_seconds:.1f} tokens/s")
        if self.plain is not None:
            line += f" vs {self.plain.new_tokens / self.plain.decode_seconds:.1f} plain: {self.speedup:.2f}x"
        if self.identical is not None:
            line += "; output identical to plain greedy" if self.identical else "; OUTPUT DIFFERS from plain greedy"
        return line

    def to_dict(self) -> dict:
        costs = None if self.costs is None else {"draft": self.costs.draft, "verify": list(self.costs.verify)}
        return {"draft": self.draft, "tokens": self.tokens, "stats": self.stats.to_dict(), "costs": costs,
                "plain": self.plain.to_dict() if self.plain else None, "speedup": self.speedup,
                "identical": self.identical}  # fmt: skip


def run_speculative(
    model: nn.Module,
    prompt_ids: Sequence[int],
    draft: Draft,
    *,
    max_new_tokens: int = 128,
    sampling: Sampling = Sampling(),
    config: SpecConfig = SpecConfig(),
    stop_ids: Sequence[int] = (),
    baseline: bool = True,
    measure: bool = True,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> SpecReport:
    """Generate with a ready draft (a shorthand is made one by ``slimlm.pipelines.drafts.make_draft``)
    and report what it bought.

    ``measure``: time a round's pieces first (``measure_costs``) so adaptive k optimises real
    costs. ``baseline``: then decode plainly through the same loop, for the speedup and (greedy)
    the check that the output is unchanged. Measured costs make adaptive k depend on timings:
    sampled output follows the target's distribution exactly either way, but a seed repeats it
    only with fixed k or with ``config.costs`` given.
    """
    prompt = torch.tensor(list(prompt_ids), dtype=torch.long)
    max_len = prompt.numel() + max_new_tokens + config.k_max + 1

    def runner() -> DecoderRunner:
        return DecoderRunner(model, max_len=max_len)

    costs = config.costs
    if measure and config.adaptive and costs is None:
        context = prompt.repeat(math.ceil((config.k_max + 2) / prompt.numel()))  # long enough to time k_max + 1
        costs = measure_costs(runner(), draft, context, k_max=config.k_max)
        config = dataclasses.replace(config, costs=costs)
    gen = dict(max_new_tokens=max_new_tokens, sampling=sampling, config=config, stop_ids=stop_ids)
    out, stats = speculative_generate(runner(), draft, prompt, on_tokens=on_tokens, **gen)
    report = SpecReport(draft.name, out.tolist(), stats, costs)
    if baseline:
        plain, report.plain = speculative_generate(runner(), None, prompt, **gen)
        report.identical = plain.tolist() == report.tokens if sampling.greedy else None
    return report


def text_writer(tokenizer: Any, out: Any) -> Callable[[list[int]], None]:
    """An ``on_tokens`` callback writing the text of each new batch of tokens to ``out`` as it comes
    (held back while a multi-byte character is incomplete)."""
    tokens: list[int] = []
    shown = [""]

    def write(new: list[int]) -> None:
        tokens.extend(new)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > len(shown[0]) and text.startswith(shown[0]):
            out.write(text[len(shown[0]):])
            out.flush()
        shown[0] = text

    return write
