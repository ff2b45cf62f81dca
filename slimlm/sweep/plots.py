"""The report's trade-off plots: matplotlib drawn on its SVG canvas (no pyplot, no GUI backend), each
figure returned as SVG text to inline in the page, the Pareto frontier drawn and highlighted,
every point labelled by recipe and the base marked."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

from slimlm.errors import SlimlmError
from slimlm.eval.result import Result
from slimlm.sweep.folder import SweepRun
from slimlm.sweep.pareto import pareto_front

BASE_LABEL = "base"
# No <metadata> block: no date (the page is reproducible) and no URIs beside the SVG namespaces.
_NO_METADATA = {"Date": None, "Format": None, "Type": None, "Creator": None}


@dataclass(frozen=True)
class PlotSpec:
    key: str
    title: str
    x_label: str
    y_label: str
    x: Callable[[Result], float | None]
    y: Callable[[Result], float | None]
    x_higher_is_better: bool = False  # y is always lower-is-better here
    x_log2: bool = False


def _decode(r: Result) -> float | None:
    return r.speed.decode_tokens_per_s if r.speed else None


# Size on the perplexity plot is megabytes, not bits per weight: structured pruning shrinks a model
# by removing weights, which bits per weight (of the linears that remain) does not see.
PLOTS = (
    PlotSpec("bpw-kld", "KLD vs bits per weight", "bits per weight (decoder linears, log2 scale)",
             "KLD vs base (nats/token)", lambda r: r.size.bits_per_weight, lambda r: r.quality.kld, x_log2=True),
    PlotSpec("mb-ppl", "Perplexity vs model size", "model size (MB)", "perplexity",
             lambda r: r.size.model_bytes / 1e6, lambda r: r.quality.perplexity),
    PlotSpec("tps-ppl", "Perplexity vs decode speed", "decode tokens/s (batch 1; right is better)", "perplexity",
             _decode, lambda r: r.quality.perplexity, x_higher_is_better=True),
)  # fmt: skip


@dataclass(frozen=True)
class Point:
    label: str
    x: float
    y: float
    is_base: bool = False


@dataclass(frozen=True)
class Plot:
    spec: PlotSpec
    svg: str | None  # None: skipped, `note` says why
    note: str  # what was left out, or why the plot is skipped ("" when nothing)
    frontier: tuple[str, ...]  # labels of the frontier's points, in drawing order


def plot_points(run: SweepRun, spec: PlotSpec) -> tuple[list[Point], list[str]]:
    """(the base and every finished job that has both fields, the labels of those that lack one)."""
    named = [(BASE_LABEL, run.base, True)] + [(j.recipe, j.result, False) for j in run.with_status("done")]
    points, missing = [], []
    for label, result, is_base in named:
        x, y = spec.x(result), spec.y(result)
        if x is None or y is None:
            missing.append(label)
        else:
            points.append(Point(label, float(x), float(y), is_base))
    return points, missing


def make_plot(run: SweepRun, spec: PlotSpec) -> Plot:
    points, missing = plot_points(run, spec)
    if not any(not p.is_base for p in points):
        return Plot(spec, None, f"skipped: no finished job has {spec.x_label.split(' (')[0]} and {spec.y_label}", ())
    sign = -1.0 if spec.x_higher_is_better else 1.0
    front = pareto_front([(sign * p.x, p.y) for p in points])
    note = f"not plotted (field not measured): {', '.join(missing)}" if missing else ""
    return Plot(spec, render_svg(spec, points, front), note, tuple(points[i].label for i in front))


def _tex_safe(label: str) -> str:
    return label.replace("$", r"\$")  # a literal dollar, not matplotlib mathtext


def _same_place(points: list[Point]) -> dict[tuple[float, float], list[Point]]:
    places: dict[tuple[float, float], list[Point]] = {}
    for p in points:
        places.setdefault((p.x, p.y), []).append(p)
    return places


def render_svg(spec: PlotSpec, points: list[Point], front: list[int]) -> str:
    """One scatter plot as inline SVG text (no XML prolog; ids salted per plot so several share a page)."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise SlimlmError("the report's plots need matplotlib: pip install 'matplotlib>=3.8'") from None
    on_front = set(front)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"slimlm-{spec.key}"}):
        fig = Figure(figsize=(7.5, 4.6), layout="constrained")
        ax = fig.add_subplot()
        rest = [p for i, p in enumerate(points) if i not in on_front and not p.is_base]
        ax.scatter([p.x for p in rest], [p.y for p in rest], s=28, color="#9aa0a6", label="dominated", zorder=2)
        fx, fy = [points[i].x for i in front], [points[i].y for i in front]
        ax.plot(fx, fy, color="#1a73e8", linewidth=1.5, zorder=3, label="Pareto frontier")
        ax.scatter(fx, fy, s=46, color="#1a73e8", edgecolors="black", linewidths=0.6, zorder=4)
        base = [p for p in points if p.is_base]
        ax.scatter([p.x for p in base], [p.y for p in base], s=160, marker="*", color="#d93025", zorder=5,
                   label="base (uncompressed)")  # fmt: skip
        for (x, y), group in _same_place(points).items():  # one label per place: "int8, int8-copy"
            ax.annotate(_tex_safe(", ".join(p.label for p in group)), (x, y), xytext=(5, 4), textcoords="offset points",
                        fontsize=7, color="#d93025" if any(p.is_base for p in group) else "#202124")  # fmt: skip
        if spec.x_log2:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(spec.x_label)
        ax.set_ylabel(spec.y_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata=_NO_METADATA)
    text = buf.getvalue()
    return text[text.index("<svg"):]
