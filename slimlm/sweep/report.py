"""`slimlm report`: one self-contained HTML page for a sweep folder.

The page holds the table of every job (sortable by a few lines of inline JavaScript), the
trade-off plots as inline SVG (``plots.py``), greedy samples of the base beside each compressed
model, and what the numbers were measured on. It references nothing outside itself, so it opens
offline and can be mailed. Every string from the folder goes through ``html.escape``.
"""

from __future__ import annotations

import os
from html import escape
from os.path import commonprefix
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.fsutil import atomic_write_text
from slimlm.sweep.folder import JobRecord, SweepRun, read_sweep
from slimlm.sweep.plots import PLOTS, Plot, make_plot
from slimlm.sweep.table import HEADERS, Row, table_header, table_rows

MAX_SAMPLE_JOBS = 6  # more finished jobs than this: samples of the frontier's recipes only

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #202124; padding: 0 16px }
h1 { font-size: 22px; margin-bottom: 4px } h2 { margin-top: 32px; border-bottom: 1px solid #dadce0 }
.meta { color: #5f6368 } table { border-collapse: collapse; margin: 8px 0 }
th, td { padding: 4px 8px; border-bottom: 1px solid #e8eaed; text-align: right; vertical-align: top }
th { cursor: pointer; background: #f1f3f4; user-select: none } th[data-order=asc]::after { content: " ▲" }
th[data-order=desc]::after { content: " ▼" } td.text, th.text { text-align: left }
tr.base td { background: #fef7e0 } tr.failed td { color: #b3261e } tr.pending td { color: #9aa0a6 }
tr.frontier td:first-child { font-weight: 600 } .err { font-size: 12px }
figure { margin: 16px 0 } figure svg { max-width: 100%; height: auto } figcaption { color: #5f6368 }
table.samples td { text-align: left; white-space: pre-wrap; max-width: 520px } mark { background: #fce8e6 }
"""

# Click a header: sort by that column (numbers by data-v, missing values last), click again: reverse.
_JS = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const table = th.closest("table"), body = table.tBodies[0], asc = th.dataset.order !== "asc";
  table.querySelectorAll("th").forEach(h => delete h.dataset.order);
  th.dataset.order = asc ? "asc" : "desc";
  const key = r => { const c = r.cells[col]; return c.dataset.v === undefined ? c.textContent
                     : c.dataset.v === "" ? null : Number(c.dataset.v); };
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    const d = typeof x === "number" ? x - y : x.localeCompare(y);
    return asc ? d : -d; });
  rows.forEach(r => body.appendChild(r));
}));
"""


def _row_html(row: Row, frontier: set[str]) -> str:
    classes = [row.status] + (["frontier"] if row.job_id and row.recipe in frontier else [])
    cells = [f'<td class="text">{escape(row.recipe)}</td>']
    cells += [f'<td data-v="{"" if v is None else repr(float(v))}">{escape(t)}</td>'
              for v, t in zip(row.values, row.texts)]  # fmt: skip
    status = escape(row.status) + (f'<div class="err">{escape(row.error)}</div>' if row.error else "")
    cells.append(f'<td class="text">{status}</td>')
    job = f' data-job="{escape(row.job_id)}"' if row.job_id else ""
    return f'<tr class="{" ".join(classes)}"{job}>{"".join(cells)}</tr>'


def _table_html(run: SweepRun, frontier: set[str]) -> str:
    heads = "".join(f'<th class="{"text" if h in ("recipe", "status") else "num"}">{escape(h)}</th>' for h in HEADERS)
    rows = "\n".join(_row_html(r, frontier) for r in table_rows(run))
    return (f'<table class="sortable results"><thead><tr>{heads}</tr></thead>\n<tbody>\n{rows}\n</tbody></table>\n'
            f'<p class="meta">Click a header to sort. Δppl and speedup are relative to the base row; KLD is measured '
            f'against the base ({escape(run.base.model)}). Bold: on a Pareto frontier of a plot below.</p>')


def _plot_html(plot: Plot) -> str:
    title = f"<h3>{escape(plot.spec.title)}</h3>"
    if plot.svg is None:
        return f'<figure class="plot skipped" data-plot="{plot.spec.key}">{title}<figcaption>{escape(plot.note)}</figcaption></figure>'
    caption = "Pareto frontier (lower is better on both axes" + (", but right is better on x" if plot.spec.x_higher_is_better
                                                                 else "") + "): " + ", ".join(plot.frontier)
    note = f"<br>{escape(plot.note)}" if plot.note else ""
    return (f'<figure class="plot" data-plot="{plot.spec.key}">{title}{plot.svg}'
            f'<figcaption>{escape(caption)}{note}</figcaption></figure>')  # fmt: skip


def sample_jobs(run: SweepRun, frontier: set[str]) -> list[JobRecord]:
    """The jobs whose samples the page shows: every finished one if few, else those on a frontier."""
    done = [j for j in run.with_status("done") if j.samples is not None]
    return done if len(done) <= MAX_SAMPLE_JOBS else [j for j in done if j.recipe in frontier]


def _diverging(text: str, base: str) -> str:
    """The text, with what differs from the base's continuation (from the first differing character) marked."""
    same = len(commonprefix([text, base]))
    return escape(text[:same]) + (f"<mark>{escape(text[same:])}</mark>" if text[same:] else "")


def _samples_html(run: SweepRun, frontier: set[str]) -> str:
    if not run.base_samples:
        return '<p class="meta">No samples recorded (base/samples.json is absent).</p>'
    jobs = sample_jobs(run, frontier)
    if not jobs:
        return '<p class="meta">No finished job recorded samples.</p>'
    shown = "every finished job" if len(jobs) == len(run.with_status("done")) else "the jobs on a Pareto frontier"
    out = ['<p class="meta">Greedy continuations of the same prompts. Marked: where a compressed model\'s text '
           f"departs from the base's. Shown: {shown}.</p>"]
    for s in run.base_samples:
        rows = []
        for i, j in enumerate(jobs):
            text = {x.prompt: x.text for x in j.samples}.get(s.prompt)
            cell = _diverging(text, s.text) if text is not None else "-"
            base_cell = f'<td rowspan="{len(jobs)}">{escape(s.text)}</td>' if i == 0 else ""
            rows.append(f'<tr>{base_cell}<td><b>{escape(j.recipe)}</b><br>{cell}</td></tr>')
        out.append(f'<h3>Prompt: {escape(s.prompt)}</h3><table class="samples"><thead><tr><th class="text">base</th>'
                   f'<th class="text">compressed</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')
    return "\n".join(out)


_ENV_KEYS = ("slimlm", "torch", "transformers", "python", "threads", "cpu_count", "machine", "platform")


def _env_html(run: SweepRun) -> str:
    """Protocol and environment from the results' ``env``: the base's, and any job that differs."""
    b, q = run.base, run.base.quality
    proto = [("protocol", b.protocol), ("scored", f"{q.tokens:,} tokens in {q.windows} windows of {q.window}"),
             ("KLD measured against", b.model), ("sweep created", run.created)]
    if b.text_sha256:
        proto.append(("evaluation text", f"{b.text_source} (sha256 {b.text_sha256})"))
    rows = [f'<tr><td class="text">{escape(k)}</td><td class="text">{escape(str(v))}</td><td></td></tr>' for k, v in proto]
    for key in _ENV_KEYS:
        others = sorted({f"{j.recipe}: {j.result.env.get(key)}" for j in run.with_status("done")
                         if j.result.env.get(key) != b.env.get(key)})  # fmt: skip
        rows.append(f'<tr><td class="text">{escape(key)}</td><td class="text">{escape(str(b.env.get(key, "-")))}</td>'
                    f'<td class="text">{escape("; ".join(others))}</td></tr>')
    return ('<table class="env"><thead><tr><th class="text">measured on</th><th class="text">base</th>'
            f'<th class="text">jobs that differ</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def render_report(run: SweepRun) -> str:
    """The whole page as one string."""
    plots = [make_plot(run, spec) for spec in PLOTS]
    frontier = {label for p in plots for label in p.frontier}
    counts = {s: len(run.with_status(s)) for s in ("done", "failed", "pending")}
    title = f"slimlm sweep report: {run.name}"
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">model <b>{escape(run.model)}</b> · protocol <b>{escape(run.base.protocol)}</b> · '
        f"{len(run.jobs)} jobs: {escape(summary)}</p>",
        f'<p class="meta">{escape(table_header(run))}</p>',
        "<h2>Results</h2>", _table_html(run, frontier),
        "<h2>Trade-offs</h2>", *(_plot_html(p) for p in plots),
        "<h2>Samples</h2>", _samples_html(run, frontier),
        "<h2>Protocol and environment</h2>", _env_html(run),
        f"<script>{_JS}</script></body></html>\n",
    ]
    return "\n".join(parts)


def write_report(folder: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Read a sweep folder and write its report to ``out`` atomically; the folder is only read."""
    out = Path(out)
    if out.is_dir():
        raise SlimlmError(f"{out} is a directory; pass a file name for --out, e.g. {out / 'report.html'}")
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} already exists; pass --overwrite to replace it")
    run = read_sweep(folder)
    if not run.with_status("done"):
        counts = ", ".join(f"{len(run.with_status(s))} {s}" for s in ("failed", "pending"))
        raise SlimlmError(f"{folder} has no finished jobs ({counts}); run or resume `slimlm sweep` first")
    page = render_report(run)
    try:
        return atomic_write_text(out, page, overwrite=overwrite)
    except OSError as e:
        raise SlimlmError(f"cannot write {out}: {e.strerror or e}; choose a writable --out") from None
