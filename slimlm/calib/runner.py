"""Block-by-block calibration: the one driver every calibrated method uses.

    capture the inputs of decoder block 0 (embeddings run, then a hook stops the model)
    for each block i:
        run block i on its inputs while the statistics its linears need accumulate
        let the method rewrite block i (on_block)
        run block i again: the compressed outputs are the inputs of block i+1

Only the current block needs to be on the compute device; the others stay where
they are (``offload=True`` moves each block back to the CPU when done), so the
memory this takes is one block plus N x L x hidden activations, not the model.
A model from :func:`slimlm.models.lazy.load_lazy` goes further: block i is read
from its safetensors just before it runs and, once its outputs are computed,
handed to the model's sink (a shard writer) and freed, so the model itself
never needs to fit in memory.
Where blocks sit is read from the family adapter table, never hard-coded.

Most methods rewrite linears one at a time from their own statistics
(GPTQ, Wanda, SparseGPT): :func:`calibrate_linears` is that walk, followed
by the pass for linears outside the blocks (``lm_head``), whose statistics
need one more forward of the model compressed so far.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.calib.heap import trim_heap
from slimlm.calib.sequential import walk_block_sequential
from slimlm.calib.stats import LinearStats, StatsSpec
from slimlm.models.adapters import Adapter, block_linears, decoder_blocks, get_adapter
from slimlm.models.lazy import lazy_blocks
from slimlm.nn.packed import PackedLinear
from slimlm.nn.quant_linear import in_features_of

log = logging.getLogger("slimlm.calib")


class _Stop(Exception):
    """Raised by the hook on block 0 once its inputs are captured."""


@dataclass
class Group:
    """Linears of one block that read the same input, and the norm that produces it."""

    norm: nn.Module | None
    norm_name: str | None
    linears: dict[str, nn.Module]  # full name -> linear


@dataclass
class BlockContext:
    index: int
    prefix: str  # full name of the block, e.g. "model.layers.3"
    block: nn.Module
    adapter: Adapter
    groups: list[Group]
    stats: dict[str, LinearStats]  # full linear name -> its input statistics
    inputs: list[Tensor]  # block inputs, one (B, L, hidden) tensor per mini-batch
    kwargs: list[dict[str, Any]]  # the block's keyword arguments per mini-batch
    device: torch.device
    autocast: torch.dtype | None = None  # run the block under torch.autocast in this dtype (None: as it is)

    @property
    def linears(self) -> dict[str, nn.Module]:
        return {n: m for g in self.groups for n, m in g.linears.items()}

    def run(self, x: Tensor, i: int) -> Tensor:
        """The block's output for mini-batch ``i`` given input ``x``."""
        with _autocast(self.device, self.autocast):
            out = self.block(x.to(self.device), **self.kwargs[i])
        return out[0] if isinstance(out, tuple) else out


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Matmuls and attention in ``dtype`` (norms, softmax and the residual stream stay float32); None: a no-op."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@dataclass
class CalibReport:
    blocks: int
    seconds: float
    peak_activation_mb: float
    per_block_seconds: list[float] = field(default_factory=list)
    # model tensors resident (parameters, buffers, packed weights; meta excluded) + activations
    # + statistics, at its largest (after a block's re-run, before it is released)
    peak_tracked_mb: float = 0.0
    peak_rss_mb: float | None = None  # the process's peak resident set so far (None: not measurable here)
    lazy: bool = False  # blocks were read from disk one at a time


def peak_rss_mb() -> float | None:
    """The process's peak resident set size in MB (getrusage), or None where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB on Linux


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors that are not on meta: parameters, buffers and packed weights."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, PackedLinear) and m._weight:  # packed weights are plain attributes, not parameters
            total += m.weight_storage()[1]
    return total


def _stats_bytes(stats: dict[str, LinearStats]) -> int:
    unique = {id(s): s for s in stats.values()}.values()  # linears of one group share theirs
    tensors = [t for s in unique for t in (s.H, s.absmax, s.sq_sum, *s.sample) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def _groups(block: nn.Module, prefix: str, adapter: Adapter) -> list[Group]:
    linears = block_linears(block, adapter)
    return [
        Group(
            norm=block.get_submodule(g.norm) if g.norm else None,
            norm_name=f"{prefix}.{g.norm}" if g.norm else None,
            linears={f"{prefix}.{rel}": linears[rel] for rel in g.linears},
        )
        for g in adapter.groups
    ]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: Tensor, *, batch_size: int) -> tuple[list[Tensor], list[dict]]:
    """Run the model up to block 0 for each mini-batch of ``calib`` (N, L) token ids."""
    block0 = decoder_blocks(model)[0]
    device = next(block0.parameters()).device
    if device.type == "meta":  # lazily loaded: block 0 is still on disk; the ids go where the embeddings are
        device = model.get_input_embeddings().weight.device
    inputs, kwargs = [], []

    def hook(_module, args, kw):
        hidden = args[0] if args else kw.pop("hidden_states")
        inputs.append(hidden.detach())
        kwargs.append({k: v for k, v in kw.items() if k not in ("cache", "past_key_values", "use_cache")})
        raise _Stop

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calib.shape[0], batch_size):
            try:
                model(input_ids=calib[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


def _collect(ctx: BlockContext, spec: StatsSpec, *, stop_early: bool = False) -> list[Tensor] | None:
    """Run the block on every mini-batch with hooks that feed the statistics; return its outputs.

    The linears of a group read the same input, so they share one
    :class:`LinearStats` (one ``X^T X`` for q, k and v, not three); methods
    read statistics and never write them (GPTQ and SparseGPT clone H).
    With ``stop_early`` each forward stops as soon as every group has seen its
    input (down_proj's matmul and what follows it are skipped) and None is
    returned: for a block whose outputs will be recomputed anyway."""
    handles, pending, hooked = [], set(), []

    def hook(stats: LinearStats, g: int, x: Tensor) -> None:
        stats.add(x)
        pending.discard(g)
        if stop_early and not pending:
            raise _Stop

    for g, group in enumerate(ctx.groups):
        first = next(iter(group.linears.values()), None)
        if first is None:
            continue
        stats = LinearStats(in_features=in_features_of(first), spec=spec)
        ctx.stats.update(dict.fromkeys(group.linears, stats))
        hooked.append(g)
        handles.append(first.register_forward_pre_hook(lambda _m, args, s=stats, g=g: hook(s, g, args[0])))
    try:
        if not stop_early:
            return [ctx.run(x, i).to(x.device) for i, x in enumerate(ctx.inputs)]
        for i, x in enumerate(ctx.inputs):
            pending.update(hooked)
            try:
                ctx.run(x, i)
            except _Stop:
                pass
        return None
    finally:
        for h in handles:
            h.remove()


def _walk_block(ctx: BlockContext, spec: StatsSpec, on_block: Callable[[BlockContext], bool], *,
                last: bool, rewrites: Callable[[BlockContext], bool] | None) -> list[Tensor] | None:
    """Statistics pass, ``on_block``, and the re-run that gives the next block's inputs (None after the last block).

    Both shortcuts leave every statistic and every next input as they were:
    a block that ``rewrites`` says will change gets its statistics from a
    pass that stops once all groups have seen their inputs (its outputs are
    recomputed after the rewrite anyway), and the last block is not re-run
    (nothing reads its outputs; ``lm_head`` statistics take a forward of their own)."""
    stop_early = rewrites is not None and rewrites(ctx)
    outputs = _collect(ctx, spec, stop_early=stop_early)
    changed = on_block(ctx)
    if last:
        return None
    if changed or outputs is None:
        outputs = None  # the pre-rewrite outputs are stale: not held through the re-run
        for j, x in enumerate(ctx.inputs):  # each output replaces its input: one block's activations alive, not two
            ctx.inputs[j] = ctx.run(x, j).to(x.device)
        outputs = ctx.inputs
    return outputs


@torch.no_grad()
def calibrate_blocks(
    model: nn.Module,
    calib: Tensor,
    *,
    on_block: Callable[[BlockContext], bool],
    spec: StatsSpec = StatsSpec(),
    batch_size: int = 8,
    device: str | torch.device | None = None,
    offload: bool = False,
    desc: str = "calibrate",
    rewrites: Callable[[BlockContext], bool] | None = None,
    autocast: torch.dtype | None = None,
    walk: Callable[[BlockContext, bool], list[Tensor] | None] | None = None,
) -> CalibReport:
    """Walk the decoder blocks with calibration token ids ``calib`` (N, L).

    ``on_block(ctx)`` rewrites ``ctx.block`` using ``ctx.stats`` and returns
    True if it changed the block's function (its outputs are then recomputed
    so the next block sees the compressed model's activations). On a lazily
    loaded model each block is read from disk before it runs and released
    (to the model's sink, see :class:`slimlm.models.lazy.LazyBlocks`) after.
    ``rewrites(ctx)``, if given, says before the statistics pass whether
    ``on_block`` will change that block (that pass then skips what follows the
    last statistics hook). ``autocast``: every block forward under
    ``torch.autocast`` in that dtype (bfloat16: faster, not exact). ``walk(ctx, last)``
    replaces a block's statistics pass, ``on_block`` and re-run (:mod:`slimlm.calib.sequential`).
    """
    adapter = get_adapter(model)
    blocks = decoder_blocks(model)
    lazy = lazy_blocks(model)
    default = lazy.device if lazy is not None else next(model.parameters()).device
    dev = torch.device(device) if device is not None else default
    t_start = time.perf_counter()
    inputs, kwargs = capture_block_inputs(model, calib, batch_size=batch_size)
    act_bytes = sum(x.numel() * x.element_size() for x in inputs) * 2  # inputs + outputs alive at once
    per_block, tracked = [], 0
    for i in tqdm(range(len(blocks)), desc=desc, unit="block", leave=False):
        t0 = time.perf_counter()
        if lazy is not None:
            block = lazy.materialize(i, dev)
        else:
            block = blocks[i]
            home = next(block.parameters()).device
            block.to(dev)
        prefix = f"{adapter.blocks}.{i}"
        ctx = BlockContext(i, prefix, block, adapter, _groups(block, prefix, adapter), {}, inputs, kwargs, dev,
                           autocast=autocast)  # fmt: skip
        last = i == len(blocks) - 1
        outputs = walk(ctx, last) if walk else _walk_block(ctx, spec, on_block, last=last, rewrites=rewrites)
        tracked = max(tracked, resident_bytes(model) + act_bytes + _stats_bytes(ctx.stats))
        ctx.stats.clear()
        if lazy is not None:
            lazy.release(i)  # to the sink, then freed
            del ctx, block  # drop the last references to what the block held
        elif offload:
            block.to(home)
        inputs = outputs
        trim_heap()  # the block's freed activations (slimlm.calib.heap)
        per_block.append(time.perf_counter() - t0)
    return _report(desc, time.perf_counter() - t_start, act_bytes, per_block, tracked, lazy=lazy is not None)


def _report(desc: str, seconds: float, act_bytes: int, per_block: list[float], tracked: int, *,
            lazy: bool) -> CalibReport:  # fmt: skip
    report = CalibReport(len(per_block), seconds, act_bytes / 1e6, per_block, peak_tracked_mb=tracked / 1e6,
                         peak_rss_mb=peak_rss_mb(), lazy=lazy)  # fmt: skip
    log.info("%s: %d blocks in %.1f s, peak tracked %.0f MB, process peak RSS %s MB", desc, report.blocks,
             report.seconds, report.peak_tracked_mb, f"{report.peak_rss_mb:.0f}" if report.peak_rss_mb else "?")
    return report


@torch.no_grad()
def head_stats(model: nn.Module, head: nn.Module, calib: Tensor, spec: StatsSpec, batch_size: int, *,
               autocast: torch.dtype | None = None) -> LinearStats:  # fmt: skip
    """Statistics of ``head``'s inputs (lm_head lies outside the blocks): one more forward over ``calib``."""
    stats = LinearStats(in_features=in_features_of(head), spec=spec)
    handle = head.register_forward_pre_hook(lambda _m, args: stats.add(args[0]))
    device = model.get_input_embeddings().weight.device  # where the token ids go
    try:
        with _autocast(device, autocast):
            for start in range(0, calib.shape[0], batch_size):
                model(input_ids=calib[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return stats


def calibrate_linears(
    model: nn.Module,
    calib: Tensor,
    names: Collection[str],
    fix: Callable[[str, LinearStats], None],
    *,
    spec: StatsSpec,
    batch_size: int = 8,
    desc: str = "calibrate",
    autocast: torch.dtype | None = None,
    sequential: bool = False,
) -> CalibReport:
    """Call ``fix(name, stats)`` once for every full linear name in ``names``, with that linear's input statistics.

    Inside the decoder blocks ``fix`` runs as each block is reached (the block
    is then re-run, so later blocks calibrate on the rewritten model); the
    names left over (``lm_head``) get theirs afterwards from one more forward
    of the rewritten model, in the order of ``names``. ``autocast``: as in
    :func:`calibrate_blocks` (the ``lm_head`` pass too). ``sequential``: one
    forward per block, each group of linears fixed as soon as its inputs are
    complete, from the outputs of the linears fixed before it
    (:mod:`slimlm.calib.sequential`); else every linear of a block is fixed
    from the block's float forward and the block is run again.
    """
    done: set[str] = set()

    def on_block(ctx: BlockContext) -> bool:
        mine = [n for n in ctx.linears if n in names]
        for name in mine:
            fix(name, ctx.stats[name])
            done.add(name)
        return bool(mine)

    def one_pass(ctx: BlockContext, last: bool) -> list[Tensor]:
        outputs, fixed = walk_block_sequential(model, ctx, spec, set(names), fix)
        done.update(fixed)
        return outputs

    report = calibrate_blocks(model, calib, on_block=on_block, spec=spec, batch_size=batch_size, desc=desc,
                              rewrites=lambda ctx: any(n in names for n in ctx.linears), autocast=autocast,
                              walk=one_pass if sequential else None)  # fmt: skip
    for name in [n for n in names if n not in done]:  # outside the blocks: lm_head
        fix(name, head_stats(model, model.get_submodule(name), calib, spec, batch_size, autocast=autocast))
    return report
