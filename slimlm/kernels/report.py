"""Which kernel each layer of a model runs, and a check that the fast paths were taken.

A runtime linear (``slimlm.nn``) holds the kernel chosen for its device in
``module.kernel``; a fast kernel that failed its first-use check
(:func:`slimlm.kernels.weight_matmul`) runs the reference path instead, for
every layer on that device and dtype, with only one warning logged. This
report reads both facts back per layer, so a benchmark or an evaluation that
ran on the slow path says so: ``slimlm info`` prints it, the eval Result JSON
records it, and :func:`require_fast` turns it into an error.

It also says why each path was taken: the kernel choices made by measuring
(:mod:`slimlm.kernels.tune`: "measured 1.9x over f_linear at 1 row, cached",
"forced by SLIMLM_KERNELS=int4:reference", a fixed rule) are listed per key,
dense float matmuls included, and each layer carries the reason for its own
one-row (decode) path in ``LayerKernel.why``.

A layer is any module whose ``kernel`` has a ``name`` and ``is_reference``
and that exposes ``compute_dtype``, ``weight_device``, ``in_features`` and
``out_features``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.kernels import tune
from slimlm.kernels.base import check_state, fallback_reason
from slimlm.kernels.native.build import status as native_status

REFERENCE_PATH = "reference"  # what a layer runs when its fast kernel fell back


class LayerKernel(NamedTuple):
    layer: str  # full module name
    selected: str  # the kernel chosen for the layer's device
    runs: str  # the path that runs: ``selected``, or "reference" after a fallback
    reason: str | None  # why it runs a reference path (fallback, no fast kernel, measured slower); None on a fast path
    why: str | None = None  # how its one-row path was chosen: measured / cached / forced / fixed rule


def kernel_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer of ``model`` that runs a weight kernel (see the module docstring)."""
    for name, module in model.named_modules():
        kernel = getattr(module, "kernel", None)
        if hasattr(kernel, "is_reference") and hasattr(module, "weight_device"):
            yield name, module


@torch.no_grad()
def _probe(module: nn.Module) -> None:
    """One row through the layer, so a fast kernel's first-use check runs on its device and dtype."""
    x = torch.randn(1, module.in_features, generator=torch.Generator().manual_seed(0))  # (1, in)
    module(x.to(device=module.weight_device, dtype=module.compute_dtype))


FIXED_ORDER = "fixed rule: the first kernel in the table that supports it"


def _decode_key(module: nn.Module) -> tune.Key | None:
    """The tuner's key for one row through ``module`` (None when its kernel is not timed)."""
    op = getattr(module.kernel, "tune_op", None)  # sparse kernels have none
    if op is None or tune.tuner().uses_rule(op):
        return None
    return tune.make_key(op, (module.out_features, module.in_features), module.compute_dtype, 1, module.weight_device)


def layer_kernel(name: str, module: nn.Module, *, probe: bool = True) -> LayerKernel:
    """What layer ``name`` runs; ``probe`` runs its first-use check (and its one-row choice) if not done yet."""
    kernel, device, dtype = module.kernel, module.weight_device, module.compute_dtype
    if kernel.is_reference:
        what = getattr(module, "scheme", None) or getattr(module, "sparsity_label", None) or type(module).__name__
        reason = f"no fast kernel for {what} {module.out_features}x{module.in_features} on {device.type}"
        return LayerKernel(name, kernel.name, kernel.name, reason)
    key = _decode_key(module)
    if probe and check_state(kernel.name, device.type, dtype) is None:
        _probe(module)
    passed = check_state(kernel.name, device.type, dtype)
    if probe and passed and key is not None and tune.tuner().decision(key) is None:
        _probe(module)  # a call after the first-use check makes the one-row choice (weight_matmul times it)
    if check_state(kernel.name, device.type, dtype) is False:
        why = fallback_reason(kernel.name, device.type, dtype)
        reason = f"{kernel.name} {why} on {device.type}/{str(dtype).removeprefix('torch.')}"
        return LayerKernel(name, kernel.name, REFERENCE_PATH, reason)
    choice = tune.tuner().decision(key) if key is not None else None
    if choice is None:
        return LayerKernel(name, kernel.name, kernel.name, None, FIXED_ORDER if key is None else None)
    if choice.path == "reference":
        reason = f"{kernel.name} set aside for the reference path: {choice.why}"
        return LayerKernel(name, kernel.name, REFERENCE_PATH, reason, choice.why)
    row_op = getattr(kernel, "row_op", None)  # a kernel with its own measured one-row paths (int8.py)
    shape = (key.out_features, key.in_features)
    row = tune.tuner().decision(tune.make_key(row_op, shape, key.dtype, 1, device)) if row_op else None
    why = choice.why if row is None else f"{choice.why}; one row on its {row.path} path ({row.why})"
    return LayerKernel(name, kernel.name, kernel.name, None, why)


@dataclass(frozen=True)
class KernelReport:
    layers: tuple[LayerKernel, ...]
    choices: tuple[tune.Decision, ...] = ()  # every kernel choice made in this process, dense matmuls included
    native: str | None = None  # the native CPU kernels in this process: the build that loaded, or why none did

    @property
    def counts(self) -> dict[str, int]:
        """Path that runs -> number of layers running it, most used first."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.runs] = counts.get(layer.runs, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    @property
    def fallbacks(self) -> tuple[LayerKernel, ...]:
        """Layers whose fast kernel was selected but fell back to the reference at run time."""
        return tuple(layer for layer in self.layers if layer.runs != layer.selected)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"counts": {path: layers}, "fallbacks": {layer: reason}}``, plus
        ``"choices": {key: "path (why)"}`` when any choice was measured, cached or forced."""
        d: dict[str, Any] = {"counts": self.counts, "fallbacks": {f.layer: f.reason for f in self.fallbacks}}
        if self.choices:
            d["choices"] = {str(c.key): f"{c.path} ({c.why})" for c in self.choices}
        if self.native is not None:
            d["native"] = self.native
        return d

    def format(self) -> str:
        """One line of counts, then one line per layer that fell back, then one per kernel choice."""
        return format_kernels(self.to_dict())


def format_kernels(d: dict[str, Any]) -> str:
    """``KernelReport.to_dict()`` (as stored in a Result JSON) as text."""
    counts = ", ".join(f"{path} x{n}" for path, n in d["counts"].items()) or "none (no runtime linears)"
    lines = [counts]
    lines += [f"  fell back: {layer}: {reason}" for layer, reason in d.get("fallbacks", {}).items()]
    lines += [f"  chose: {key}: {what}" for key, what in d.get("choices", {}).items()]
    if "native" in d:
        lines.append(f"  native CPU kernels: {d['native']}")
    return "\n".join(lines)


def kernel_report(model: nn.Module, *, probe: bool = True) -> KernelReport:
    """Which kernel every runtime linear of ``model`` runs (see :class:`LayerKernel`).

    ``probe`` runs the first-use check of a fast kernel that has not run yet
    on a one-row input, so the report says what a forward pass would run."""
    return report_layers(kernel_layers(model), probe=probe)


def report_layers(layers: Iterable[tuple[str, Any]], *, probe: bool = True) -> KernelReport:
    """The report over given ``(name, layer)`` pairs, e.g. a fast decoder's fused matmuls beside the model's
    other runtime linears (``FastDecoder.kernel_report``)."""
    return KernelReport(tuple(layer_kernel(name, m, probe=probe) for name, m in layers), tune.decisions(),
                        native_status())


def kernel_summary(model: nn.Module) -> dict[str, Any] | None:
    """``kernel_report(model).to_dict()``, or None for a model without runtime linears whose matmuls made no
    measured or forced kernel choice (a Result's ``kernels``)."""
    report = kernel_report(model)
    return report.to_dict() if report.layers or report.choices else None


def require_fast(model: nn.Module, *, probe: bool = True) -> KernelReport:
    """The report, or a one-line :class:`SlimlmError` naming the first layer not on a fast kernel and why.

    For benchmarks that time a quantized model: a run on the reference path
    measures the wrong thing, so it must not finish quietly."""
    report = kernel_report(model, probe=probe)
    if not report.layers:
        raise SlimlmError("no layer runs a quantized kernel (the model holds no runtime linears); expected a fast path")
    slow = [layer for layer in report.layers if layer.reason is not None]
    if slow:
        first = slow[0]
        raise SlimlmError(f"{len(slow)} of {len(report.layers)} layers are not on a fast kernel, first "
                          f"{first.layer} ({first.runs}): {first.reason}")  # fmt: skip
    return report
