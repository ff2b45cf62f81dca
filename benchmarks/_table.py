"""The quality cells every benchmark table row shares."""

from __future__ import annotations

from slimlm.eval import Result


def quality_cells(r: Result, base_ppl: float, *, bpw_digits: int = 2) -> list[str]:
    """perplexity, its change vs the base, KLD, top-1 agreement, bits per weight."""
    q = r.quality
    return [f"{q.perplexity:.2f}", f"{q.perplexity / base_ppl - 1:+.1%}", f"{q.kld:.4f}",
            f"{q.top1_agreement:.1%}", f"{r.size.bits_per_weight:.{bpw_digits}f}"]  # fmt: skip
