"""A versioned, self-describing evaluation result and its text tables."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

import slimlm
from slimlm.errors import SlimlmError
from slimlm.eval.quality import Quality
from slimlm.models.size import SizeReport
from slimlm.eval.speed import Speed
from slimlm.fsutil import atomic_write_text
from slimlm.kernels import format_kernels

SCHEMA = "slimlm.result/1"
COMPARISON_SCHEMA = "slimlm.comparison/1"


def environment() -> dict[str, Any]:
    return {
        "slimlm": slimlm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


@dataclass(frozen=True)
class Result:
    protocol: str
    model: str  # the model source as given (built-in name, directory, hub id, .gguf)
    base: str  # the model the KL divergence is measured against
    quality: Quality
    size: SizeReport
    speed: Speed | None
    recipe: Any = None
    text_source: str | None = None  # a user's evaluation text (ad-hoc protocol), as given
    text_sha256: str | None = None  # and the hash of its documents (slimlm.data.text_sha256)
    kernels: dict[str, Any] | None = None  # KernelReport.to_dict(): path -> layers, fallbacks; None: no runtime linears
    training: list[dict[str, Any]] | None = None  # each training step's TrainReport.to_json() (config, losses, ...)
    tasks: dict[str, dict[str, Any]] | None = None  # lm-eval task -> {acc, acc_stderr, ..., samples} (eval.accuracy)
    env: dict[str, Any] = field(default_factory=environment)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.text_sha256 is None:  # a built-in protocol text: the JSON stays as it always was
            del d["text_source"], d["text_sha256"]
        if self.kernels is None:  # an uncompressed model: no kernel field, as before
            del d["kernels"]
        if self.training is None:  # nothing trained: no training field, as before
            del d["training"]
        if self.tasks is None:  # no task accuracy asked for: no tasks field, as before
            del d["tasks"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        if d.get("schema") != SCHEMA:
            raise SlimlmError(f"not a slimlm result (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        return cls(
            **{k: v for k, v in d.items() if k not in ("quality", "size", "speed")},
            quality=Quality(**d["quality"]),
            size=SizeReport(**d["size"]),
            speed=Speed(**d["speed"]) if d.get("speed") else None,
        )

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", overwrite=overwrite)


def save_results(path: str | os.PathLike, results: list[Result], *, overwrite: bool = False) -> Path:
    """One result as a Result JSON; several as a comparison document holding each."""
    if len(results) == 1:
        return results[0].save(path, overwrite=overwrite)
    doc = {"schema": COMPARISON_SCHEMA, "results": [r.to_dict() for r in results]}
    return atomic_write_text(path, json.dumps(doc, indent=2) + "\n", overwrite=overwrite)


def load_result(path: str | os.PathLike) -> Result:
    results = load_results(path)
    if len(results) != 1:
        raise SlimlmError(f"{path} holds a comparison of {len(results)} results; read it with load_results")
    return results[0]


def load_results(path: str | os.PathLike) -> list[Result]:
    """The results a JSON file holds: one (``slimlm eval --json``) or a comparison's, in order
    (``slimlm compress --json`` writes base and compressed)."""
    try:
        doc = json.loads(Path(path).read_text())
        if isinstance(doc, dict) and doc.get("schema") == COMPARISON_SCHEMA:
            return [Result.from_dict(d) for d in doc["results"]]
        return [Result.from_dict(doc)]
    except (OSError, json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
        raise SlimlmError(f"cannot read result {path}: {e}; pass a JSON file written by `slimlm eval --json` "
                          "or `slimlm compress --json`") from None


# (label, getter, format, higher_is_better or None when a delta has no direction)
_ROWS = [
    ("perplexity", lambda r: r.quality.perplexity, "{:.3f}", False),
    ("KLD vs base (nats/token)", lambda r: r.quality.kld, "{:.4f}", False),
    ("top-1 agreement", lambda r: r.quality.top1_agreement, "{:.2%}", True),
    ("parameters", lambda r: r.size.params, "{:,}", None),
    ("model size (MB)", lambda r: r.size.model_bytes / 1e6, "{:.1f}", False),
    ("checkpoint size (MB)", lambda r: r.size.checkpoint_bytes and r.size.checkpoint_bytes / 1e6, "{:.1f}", False),
    ("bits per weight (linears)", lambda r: r.size.bits_per_weight, "{:.2f}", False),
    ("prefill (tokens/s)", lambda r: r.speed and r.speed.prefill_tokens_per_s, "{:.1f}", True),
    ("decode (tokens/s)", lambda r: r.speed and r.speed.decode_tokens_per_s, "{:.2f}", True),
    ("decode loop", lambda r: r.speed and r.speed.loop, "{}", None),
    ("latency p50 (ms/token)", lambda r: r.speed and r.speed.latency_p50_ms, "{:.1f}", False),
    ("latency p95 (ms/token)", lambda r: r.speed and r.speed.latency_p95_ms, "{:.1f}", False),
    ("achieved bandwidth (GB/s)", lambda r: r.speed and r.speed.achieved_gb_per_s, "{:.2f}", True),
    ("process peak RSS (MB)", lambda r: r.speed and r.speed.peak_rss_mb, "{:.0f}", False),
]


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _delta(value: Any, ref: Any) -> str:
    if value is None or ref is None or value == ref or isinstance(value, str):
        return ""
    if ref:
        return f" ({(value - ref) / abs(ref):+.1%})"
    return f" ({value - ref:+.4g})"


def measured_on(protocol: str, text_source: str | None = None, text_sha256: str | None = None) -> str:
    """How a table names what a result was measured on: the protocol, and a user's text if any."""
    return protocol + (f" (text {text_source}, sha256 {text_sha256[:12]})" if text_sha256 else "")


_NOT_METRICS = ("samples", "version")


def _task_rows(results: list[Result]) -> list[list[str]]:
    """One row per (task, metric) any result holds: value ± standard error, change vs the first column."""
    keys = dict.fromkeys((task, metric) for r in results for task, scores in (r.tasks or {}).items()
                         for metric in scores if metric not in _NOT_METRICS and not metric.endswith("_stderr"))
    rows = []
    for task, metric in keys:
        values = [(r.tasks or {}).get(task, {}) for r in results]
        ref = values[0].get(metric)
        cells = []
        for i, v in enumerate(values):
            se = v.get(f"{metric}_stderr")
            cell = _cell(v.get(metric), "{:.2%}") + (f" ±{se:.2%}" if se is not None else "")
            cells.append(cell + (_delta(v.get(metric), ref) if i else ""))
        n = values[0].get("samples")
        rows.append([f"{task} {metric}" + (f" (n={n})" if n else ""), *cells])
    return rows


def check_comparable(results: list[Result]) -> None:
    """Refuse results measured on different protocols or texts: their numbers do not compare."""
    seen = {(r.protocol, r.text_sha256): r for r in results}
    if len(seen) > 1:
        kinds = "; ".join(f"{r.model} on {measured_on(r.protocol, r.text_source, r.text_sha256)}"
                          for r in seen.values())
        raise SlimlmError(f"cannot set results of different protocols or texts side by side ({kinds}); "
                          "measure them all with the same --protocol and --eval-data")


def format_results(results: list[Result]) -> str:
    """One column per result; columns after the first show the change vs the first."""
    check_comparable(results)
    first = results[0]
    q = first.quality
    on = measured_on(first.protocol, first.text_source, first.text_sha256)
    header = (
        f"protocol {on} · {q.tokens:,} tokens in {q.windows} windows of {q.window} · "
        f"{first.env.get('threads')} threads · slimlm {first.env.get('slimlm')}, torch {first.env.get('torch')}"
    )
    names = ["", *(r.model for r in results)]
    rows = [names]
    for label, get, fmt, _ in _ROWS:
        ref = get(first)
        rows.append([label, *(_cell(get(r), fmt) + (_delta(get(r), ref) if i else "") for i, r in enumerate(results))])
    rows += _task_rows(results)
    widths = [max(len(row[c]) for row in rows) for c in range(len(names))]
    lines = [header, ""]
    for j, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[c]) if c == 0 else cell.rjust(widths[c]) for c, cell in enumerate(row)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    bases = {r.base for r in results}
    lines.append("")
    lines.append(f"KL divergence and top-1 agreement are measured against: {', '.join(sorted(bases))}")
    lines += [f"kernels of {r.model}: {format_kernels(r.kernels)}" for r in results if r.kernels]
    return "\n".join(lines)
