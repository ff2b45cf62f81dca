"""One forward per block: each group of linears is rewritten the moment its inputs are complete.

The two-pass walk (:func:`slimlm.calib.runner.calibrate_blocks`) runs a
block once for the statistics of every linear (float weights), rewrites
them, and runs it again for the next block's inputs. Here ("true
sequential", as AutoGPTQ and GPTQModel call it) the block runs once:

    every mini-batch's forward runs as a greenlet of its own, one at a time,
    until it reaches the first linear of a group, adds that input to the
    group's statistics and waits;
    when all mini-batches wait at the same group, the group is rewritten and
    the forwards go on, each calling the rewritten linears.

So q/k/v are rewritten from the block's input, o_proj from attention outputs
of the rewritten q/k/v, gate/up after o_proj, down_proj last, and the forwards'
outputs are already the next block's inputs: about half the matmuls of the
two-pass walk. The mini-batches' forwards are suspended together at each
group, so what they hold there (the MLP's intermediate activations at
down_proj) is in memory for all of them at once.

Every mini-batch must reach the same groups in the same order (dense
decoder blocks do); a block that does not is refused with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import greenlet
import torch
from torch import Tensor, nn

from slimlm.calib.heap import trim_heap
from slimlm.calib.stats import LinearStats, StatsSpec
from slimlm.errors import SlimlmError
from slimlm.nn.quant_linear import in_features_of
from slimlm.nn.runtime import replace_module


class _Gate(nn.Module):
    """Stands in for one linear of a group during the walk: statistics, a wait, then the current linear."""

    def __init__(self, inner: nn.Module, group: int, walk: _Walk) -> None:
        super().__init__()
        self.inner = inner
        self.group = group
        self._walk = [walk]  # in a list: not a submodule

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._walk[0].arrive(self.group, x)
        return self.inner(x, *args, **kwargs)


@dataclass(frozen=True)
class _TorchMode:
    """torch's per-thread modes that a forward's context managers set (grad, autocast per device type).

    Greenlets share their thread's modes, so each side of a switch puts its own
    back: a forward suspended inside ``torch.autocast`` keeps it, and the rewrite
    between groups runs without it.
    """

    grad: bool
    autocast: tuple[tuple[str, bool, torch.dtype], ...]

    @classmethod
    def capture(cls, device_types: tuple[str, ...]) -> _TorchMode:
        return cls(torch.is_grad_enabled(),
                   tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in device_types))

    def restore(self) -> None:
        torch.set_grad_enabled(self.grad)
        for d, enabled, dtype in self.autocast:
            torch.set_autocast_enabled(d, enabled)
            torch.set_autocast_dtype(d, dtype)


class _Walk:
    """Runs one block's mini-batch forwards in lockstep, from group to group.

    Each forward is a greenlet (a stack of its own on the calling thread), so a
    forward is suspended inside the block's code without a second OS thread:
    torch's thread pool and allocator see one thread, as in the two-pass walk.
    """

    def __init__(self, run: Callable[[int], Tensor], n: int, stats: list[LinearStats],
                 device_types: tuple[str, ...] = ("cpu",)) -> None:  # fmt: skip
        self._run, self.n, self.stats = run, n, stats
        self._device_types = tuple(dict.fromkeys(("cpu", *device_types)))
        self._coordinator = greenlet.getcurrent()
        self._workers = [greenlet.greenlet(self._worker, parent=self._coordinator) for _ in range(n)]
        self._arrived: list[set[int]] = [set() for _ in range(n)]  # groups each worker has passed

    def arrive(self, group: int, x: Tensor) -> None:
        """In a worker: the first linear of ``group`` this forward calls; add its input and wait for the rewrite."""
        w = self._workers.index(greenlet.getcurrent())
        if group in self._arrived[w]:  # another linear of a group already rewritten
            return
        self._arrived[w].add(group)
        self.stats[group].add(x)
        mode = _TorchMode.capture(self._device_types)
        self._coordinator.switch(("group", group, None))
        mode.restore()

    def _worker(self, w: int) -> tuple[str, int, Any]:
        return "done", -1, self._run(w)

    def _resume(self, w: int) -> tuple[str, int, Any]:
        """Run forward ``w`` to its next group (or its end); an error in it raises here."""
        mode = _TorchMode.capture(self._device_types)
        try:
            return self._workers[w].switch(w)
        finally:
            mode.restore()

    def run(self, rewrite: Callable[[int], None], where: str) -> list[Tensor]:
        """Every forward to its end, calling ``rewrite(group)`` when all of them wait at that group."""
        try:
            while True:
                events = [self._resume(w) for w in range(self.n)]
                kinds = {(kind, group) for kind, group, _ in events}
                if len(kinds) > 1:
                    raise SlimlmError(f"{where}: the calibration mini-batches reached different linears "
                                      f"({sorted(kinds)}); one-pass calibration needs every sequence to run the "
                                      "same linears in the same order: set true_sequential: false")  # fmt: skip
                kind, group = kinds.pop()
                if kind == "done":
                    return [out for _, _, out in events]
                rewrite(group)
        finally:
            mode = _TorchMode.capture(self._device_types)
            for g in self._workers:  # forwards left waiting (an error): unwound now, not at garbage collection
                if g:
                    g.throw(greenlet.GreenletExit)
            mode.restore()


def walk_block_sequential(model: nn.Module, ctx: Any, spec: StatsSpec, names: set[str],
                          fix: Callable[[str, LinearStats], None]) -> tuple[list[Tensor], list[str]]:  # fmt: skip
    """Run block ``ctx.block`` once over ``ctx.inputs``, calling ``fix(name, stats)`` for every linear of
    ``names`` in it as its group's inputs complete. Returns the outputs (the next block's inputs) and
    the names fixed, in order."""
    groups = [{n: m for n, m in g.linears.items() if n in names} for g in ctx.groups]
    groups = [(g, members) for g, members in zip(ctx.groups, groups) if members]
    stats = [LinearStats(in_features=in_features_of(next(iter(g.linears.values()))), spec=spec) for g, _ in groups]
    walk = _Walk(lambda i: ctx.run(ctx.inputs[i], i).to(ctx.inputs[i].device), len(ctx.inputs), stats,
                 (torch.device(ctx.device).type,))
    gates: dict[str, _Gate] = {}
    for k, (g, _) in enumerate(groups):
        for name, module in g.linears.items():  # every member: whichever a forward calls first waits
            gates[name] = _Gate(module, k, walk)
            replace_module(model, name, gates[name])
    fixed: list[str] = []

    def rewrite(k: int) -> None:
        for name in groups[k][1]:
            ctx.stats[name] = stats[k]
            fix(name, stats[k])
            fixed.append(name)
        for name in groups[k][0].linears:
            _ungate(model, name, gates.pop(name))
        trim_heap()  # the rewrite's temporaries, before the forwards allocate again (slimlm.calib.heap)

    try:
        with torch.no_grad():  # greenlets share the thread's grad mode
            return walk.run(rewrite, ctx.prefix), fixed
    finally:
        for name, gate in gates.items():  # groups not reached (an error): their linears go back as they were
            _ungate(model, name, gate)


def _ungate(model: nn.Module, name: str, gate: _Gate) -> None:
    """Put the linear at ``name`` back in place of its gate (or keep what ``fix`` put there), and let the gate call it."""
    current = model.get_submodule(name)
    if current is gate:
        replace_module(model, name, gate.inner)
    else:
        gate.inner = current
