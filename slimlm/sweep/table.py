"""The sweep's table, one row per result: the numbers the HTML page and the terminal both show.

One row per job (base first) rather than ``format_results``' one column per model: a sweep
holds a dozen recipes with long names, which fit down a terminal, not across it. The measures
and their formats follow ``slimlm.eval.result``'s table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from slimlm.eval.result import Result, measured_on
from slimlm.sweep.folder import SweepRun, read_sweep


def _ratio(value: float | None, ref: float | None) -> float | None:
    return None if value is None or not ref else value / ref


def _change(value: float | None, ref: float | None) -> float | None:
    ratio = _ratio(value, ref)
    return None if ratio is None else ratio - 1


def _decode(r: Result) -> float | None:
    return r.speed.decode_tokens_per_s if r.speed else None


@dataclass(frozen=True)
class Column:
    key: str  # a stable name (HTML class, tests)
    header: str
    value: Callable[[Result, Result], float | None]  # (result, base) -> the number, None when not measured
    fmt: str
    lower_is_better: bool | None = None


COLUMNS = (
    Column("ppl", "ppl", lambda r, b: r.quality.perplexity, "{:.3f}", True),
    Column("dppl", "Δppl vs base", lambda r, b: _change(r.quality.perplexity, b.quality.perplexity), "{:+.2%}", True),
    Column("kld", "KLD", lambda r, b: r.quality.kld, "{:.3g}", True),  # 3 significant digits: int8 KLDs are ~1e-4
    Column("mb", "size MB", lambda r, b: r.size.model_bytes / 1e6, "{:.1f}", True),
    Column("bpw", "bits/w", lambda r, b: r.size.bits_per_weight, "{:.2f}", True),
    Column("tps", "tok/s", lambda r, b: _decode(r), "{:.2f}", False),
    Column("speedup", "speedup", lambda r, b: _ratio(_decode(r), _decode(b)), "{:.2f}x", False),
)


@dataclass(frozen=True)
class Row:
    recipe: str
    job_id: str | None  # None: the base
    status: str  # "base", "done", "failed", "pending"
    error: str | None
    values: tuple[float | None, ...]  # one per COLUMNS entry, then compress seconds
    texts: tuple[str, ...]  # the same, formatted ("-" when missing)


def _cells(result: Result | None, base: Result, seconds: float | None) -> tuple[tuple, tuple]:
    values = [c.value(result, base) if result is not None else None for c in COLUMNS] + [seconds]
    fmts = [c.fmt for c in COLUMNS] + ["{:.1f}"]
    return tuple(values), tuple("-" if v is None else f.format(v) for v, f in zip(values, fmts))


def table_rows(run: SweepRun) -> list[Row]:
    """The base, then every job in sweep.json's order."""
    rows = [Row(f"base ({run.model})", None, "base", None, *_cells(run.base, run.base, None))]
    for j in run.jobs:
        rows.append(Row(j.recipe, j.id, j.status, j.error, *_cells(j.result, run.base, j.seconds)))
    return rows


HEADERS = ("recipe", *(c.header for c in COLUMNS), "compress s", "status")


def table_header(run: SweepRun) -> str:
    """What every row was measured on: protocol, tokens, threads, versions (from the base's Result)."""
    b = run.base
    q, env = b.quality, b.env
    return (f"sweep {run.name} · model {run.model} · protocol {measured_on(b.protocol, b.text_source, b.text_sha256)} · "
            f"{q.tokens:,} tokens in {q.windows} windows of {q.window} · {env.get('threads')} threads · "
            f"slimlm {env.get('slimlm')}, torch {env.get('torch')}")  # fmt: skip


def format_table(run: SweepRun) -> str:
    rows = table_rows(run)
    cells = [list(HEADERS)] + [[r.recipe, *r.texts, r.status + (f": {r.error}" if r.error else "")] for r in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(HEADERS))]
    last = len(HEADERS) - 1
    lines = [table_header(run), ""]
    for i, row in enumerate(cells):
        lines.append("  ".join(cell if c == last else cell.ljust(widths[c]) if c == 0 else cell.rjust(widths[c])
                               for c, cell in enumerate(row)).rstrip())  # fmt: skip
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", f"KLD is measured against {run.base.model}; Δppl and speedup are relative to the base row"]
    return "\n".join(lines)


def sweep_table(folder: str | os.PathLike) -> str:
    """The terminal table of a sweep folder (what `slimlm sweep` prints at the end)."""
    return format_table(read_sweep(folder))
