"""Hidden-state (layer-wise) distillation: pull chosen student layers' outputs towards teacher layers'.

TinyBERT (Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language
Understanding", arXiv:1909.10351) matches each student layer m to teacher
layer g(m) = m * N / M (the uniform map) with an MSE on hidden states, through
a learnt linear map W_h when the widths differ. Minitron (Muralidharan et al.
2024, "Compact Language Models via Pruning and Knowledge Distillation",
arXiv:2407.14679) distils pruned LLMs from their parents with a logit loss plus
intermediate-state losses on matched layers.

States are Hugging Face ``output_hidden_states`` tuples of ``L + 1`` tensors
``(B, T, H)``: index 0 is the embedding output, index i+1 the output of layer i
(for Llama-style models the last one is taken after the final norm, on both
sides alike). A pair (i, j) compares student state i+1 with teacher state j+1.

``mse`` is normalised by the teacher state's mean square,

    ||P(h_s) - h_t||^2 / ||h_t||^2   (both as means over B, T, H),

because the residual stream of an LLM grows with depth and carries a few
outlier channels with huge magnitudes: a plain MSE would be dominated by the
deepest pairs and those channels, and its scale would change per model. The
normalised form is scale-free (0 = equal, 1 = as far as predicting zeros).
``cosine`` is 1 - the mean over positions of the cosine similarity (in [0, 2]).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.models.adapters import decoder_blocks, get_adapter

log = logging.getLogger("slimlm.distill")

__all__ = ["HIDDEN_KINDS", "HiddenProjection", "check_layer_map", "hidden_loss", "layer_map"]

HIDDEN_KINDS = ("mse", "cosine")
LayerPairs = Sequence[tuple[int, int]]  # (student layer, teacher layer), 0-based decoder layer indices


class HiddenProjection(nn.Linear):
    """TinyBERT's W_h: student width -> teacher width, no bias, the identity on the shared dims at start.

    Trainable with the student but held outside it (never saved with the student checkpoint).
    """

    def __init__(self, d_student: int, d_teacher: int):
        super().__init__(d_student, d_teacher, bias=False)
        with torch.no_grad():
            self.weight.copy_(torch.eye(d_teacher, d_student))  # (d_teacher, d_student)


def check_layer_map(pairs: LayerPairs, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """``pairs`` as a list of int tuples, each index in range, or a one-line SlimlmError."""
    pairs = list(pairs)
    if not pairs:
        raise SlimlmError("layer_map is empty; give at least one (student_layer, teacher_layer) pair")
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
            raise SlimlmError(f"layer_map pair {pair!r} must be two ints (student_layer, teacher_layer)")
        for who, index, n in (("student", pair[0], n_student), ("teacher", pair[1], n_teacher)):
            if not 0 <= index < n:
                raise SlimlmError(f"layer_map pair {tuple(pair)}: {who} has {n} layers (0-{n - 1}); "
                                  "pairs are 0-based decoder layer indices")  # fmt: skip
    return [tuple(p) for p in pairs]


def hidden_loss(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor], pairs: LayerPairs, *,
                kind: str = "mse", projection: nn.Module | None = None) -> Tensor:
    """Mean over ``pairs`` of the ``kind`` distance between matched states, each ``(B, T, H)``."""
    if kind not in HIDDEN_KINDS:
        raise SlimlmError(f"hidden loss kind {kind!r} is unknown; valid: {', '.join(HIDDEN_KINDS)}")
    pairs = check_layer_map(pairs, len(student_states) - 1, len(teacher_states) - 1)
    losses = []
    for i, j in pairs:
        s, t = student_states[i + 1].float(), teacher_states[j + 1].float()  # (B, T, Hs), (B, T, Ht)
        if projection is not None:
            s = projection(s)  # (B, T, Ht)
        if s.shape != t.shape:
            raise SlimlmError(f"student state {tuple(s.shape)} and teacher state {tuple(t.shape)} differ "
                              f"(layer pair {(i, j)}); pass projection=HiddenProjection(d_student, d_teacher)")
        if kind == "mse":
            losses.append((s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
        else:
            losses.append(1 - F.cosine_similarity(s, t, dim=-1).mean())  # cosine per (B, T) position
    return torch.stack(losses).mean()


def _norm_params(block: nn.Module, norms: tuple[str, ...]) -> list[Tensor]:
    return [p for name in norms for p in block.get_submodule(name).parameters()]


def _equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y.to(x.device)) for x, y in zip(a, b))


def _block_origin(student_block: nn.Module, teacher_blocks: nn.ModuleList, norms: tuple[str, ...],
                  after: int) -> int | None:
    """The first teacher block past ``after`` whose norm weights equal this block's, or None.

    Norms are a cheap fingerprint; when several teacher blocks share them (fresh models: all ones), the
    candidates are narrowed to blocks whose every parameter is equal.
    """
    mine = _norm_params(student_block, norms)
    found = [j for j in range(after + 1, len(teacher_blocks)) if _equal(mine, _norm_params(teacher_blocks[j], norms))]
    if len(found) > 1:
        params = list(student_block.parameters())
        found = [j for j in found if _equal(params, list(teacher_blocks[j].parameters()))]
    return found[0] if found else None


def _block_norms(model: nn.Module) -> tuple[str, ...]:
    """Block-relative names of the norm modules (from the adapter's groups; any module named *norm* else)."""
    adapter = get_adapter(model)
    norms = tuple(dict.fromkeys(g.norm for g in adapter.groups if g.norm is not None))
    if norms:
        return norms
    block = decoder_blocks(model)[0]
    return tuple(n for n, m in block.named_modules() if n and "norm" in type(m).__name__.lower())


def layer_map(student: nn.Module, teacher: nn.Module) -> list[tuple[int, int]]:
    """Default (student layer, teacher layer) pairs for two HF causal LMs of one family.

    Equal depth: the identity. A shallower student: each student block matched to the teacher block it
    came from (depth pruning keeps blocks intact: equal norm weights, distinct teacher blocks, increasing
    order); if that fails (trained or quantized since), TinyBERT's uniform map
    ``i -> floor((i + 1) * N / n + 1/2) - 1`` (the last student layer meets the last teacher layer).
    """
    s_blocks, t_blocks = decoder_blocks(student), decoder_blocks(teacher)
    n, N = len(s_blocks), len(t_blocks)
    if n == N:
        return [(i, i) for i in range(n)]
    if n > N:
        raise SlimlmError(f"the student has {n} decoder layers, more than the teacher's {N}; give the layer "
                          "pairs explicitly (layer_map)")  # fmt: skip
    norms = _block_norms(student)
    pairs, after = [], -1
    for i, block in enumerate(s_blocks):
        j = _block_origin(block, t_blocks, norms, after)
        if j is None:
            break
        pairs.append((i, j))
        after = j
    if len(pairs) == n:
        log.info("layer map: student blocks found in the teacher at %s", [j for _, j in pairs])
        return pairs
    log.info("layer map: student block %d is not a teacher block (trained or quantized since); uniform map",
             len(pairs))  # fmt: skip
    return [(i, int((i + 1) * N / n + 0.5) - 1) for i in range(n)]  # round half up, not to even
