"""Open a `slimlm report` page in headless Chromium and check what a person would see.

    python benchmarks/report_render.py REPORT.html [--screenshot out/report.png] [--jobs N]
        [--chromium chromium] [--height 4200]

Checks, on the DOM Chromium renders (``--dump-dom``, after the page's script ran):
- the results table has one row per job (exactly ``--jobs`` rows when given) plus the base;
- every plot figure that is not marked skipped holds an <svg> that the browser laid out with
  a real size (width and height > 100 px, measured by a probe script);
- the sortable header works: a probe clicks the "ppl" header twice and records the row order,
  which must be ascending then descending (rows without a value last);
- the page loaded nothing from the network (``performance.getEntriesByType("resource")`` is empty).
The probe runs on a temporary copy of the page; the page itself is only read. ``--screenshot``
writes a PNG of the top ``--height`` pixels at 1280 px wide.

Needs Chromium (Debian: ``apt-get install -y chromium``); run it with nice on a busy machine.
Exit status 0 when every check passes, 1 with one line per failure otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

# Runs inside the page after its own script: writes its findings as data attributes on <body>.
PROBE = """<script>
(() => {
  const b = document.body.dataset, head = document.querySelectorAll("table.results th")[1];
  const order = () => Array.from(document.querySelectorAll("table.results tbody tr"))
    .map(r => r.cells[1].dataset.v).join(",");
  head.click(); b.probeAsc = order(); head.click(); b.probeDesc = order();
  b.probeSvgSizes = Array.from(document.querySelectorAll("figure svg"))
    .map(s => { const r = s.getBoundingClientRect(); return Math.round(r.width) + "x" + Math.round(r.height); }).join(",");
  b.probeResources = String(performance.getEntriesByType("resource").length);
})();
</script>"""

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                  "--disable-extensions", "--disable-background-networking", "--virtual-time-budget=5000")


class Dom(HTMLParser):
    """What the checks need from the dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.job_rows = self.base_rows = 0
        self.figures: list[tuple[str, bool]] = []  # (data-plot, skipped)
        self.svgs_in_figures = 0
        self._in_figure = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = {k: v or "" for k, v in a.items()}
        elif tag == "tr" and "data-job" in a:
            self.job_rows += 1
        elif tag == "tr" and "base" in (a.get("class") or "").split():
            self.base_rows += 1
        elif tag == "figure":
            self.figures.append((a.get("data-plot", ""), "skipped" in (a.get("class") or "").split()))
            self._in_figure = True
        elif tag == "svg" and self._in_figure:
            self.svgs_in_figures += 1

    def handle_endtag(self, tag):
        if tag == "figure":
            self._in_figure = False


def chromium(binary: str, *args: str) -> str:
    cmd = [binary, *CHROMIUM_FLAGS, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise SystemExit(f"error: {binary} exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def _sorted_ok(values: str, *, descending: bool) -> bool:
    nums = [float(v) for v in values.split(",") if v]
    blanks_last = values.split(",")[len(nums):] == [""] * (len(values.split(",")) - len(nums))
    return blanks_last and nums == sorted(nums, reverse=descending) and len(nums) > 1


def check(dom: Dom, jobs: int | None) -> list[str]:
    failures = []
    if dom.base_rows != 1 or dom.job_rows < 1 or (jobs is not None and dom.job_rows != jobs):
        failures.append(f"results table: {dom.base_rows} base row(s) and {dom.job_rows} job rows "
                        f"(expected 1 and {jobs if jobs is not None else '>= 1'})")
    drawn = [key for key, skipped in dom.figures if not skipped]
    if not drawn or dom.svgs_in_figures != len(drawn):
        failures.append(f"plots: {dom.svgs_in_figures} SVGs for {len(drawn)} drawn figures {drawn}")
    sizes = [s.split("x") for s in dom.body.get("data-probe-svg-sizes", "").split(",") if s]
    if len(sizes) != len(drawn) or any(int(w) <= 100 or int(h) <= 100 for w, h in sizes):
        failures.append(f"plots laid out as {sizes or 'nothing'} px")
    if not _sorted_ok(dom.body.get("data-probe-asc", ""), descending=False):
        failures.append(f"sort by ppl, ascending: {dom.body.get('data-probe-asc')!r}")
    if not _sorted_ok(dom.body.get("data-probe-desc", ""), descending=True):
        failures.append(f"sort by ppl, descending: {dom.body.get('data-probe-desc')!r}")
    if dom.body.get("data-probe-resources") != "0":
        failures.append(f"network resources loaded: {dom.body.get('data-probe-resources')!r}")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path)
    p.add_argument("--screenshot", type=Path, default=None)
    p.add_argument("--jobs", type=int, default=None, help="the number of job rows the table must have")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    p.add_argument("--height", type=int, default=4200, help="screenshot height in px (width 1280)")
    args = p.parse_args(argv)
    page = args.report.read_text(encoding="utf-8")
    if "</body>" not in page:
        raise SystemExit(f"error: {args.report} has no </body>; is it a slimlm report?")
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / "probed.html"
        probed.write_text(page.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
        dom = Dom()
        dom.feed(chromium(args.chromium, "--dump-dom", probed.as_uri()))
    failures = check(dom, args.jobs)
    if args.screenshot:  # the page as it is, unprobed (the probe re-sorts the table)
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        chromium(args.chromium, f"--screenshot={args.screenshot.resolve()}", f"--window-size=1280,{args.height}",
                 args.report.resolve().as_uri())
        if not args.screenshot.exists():
            failures.append(f"no screenshot written to {args.screenshot}")
    for f in failures:
        print(f"FAIL {f}")
    print(f"{args.report}: {dom.job_rows} job rows, {dom.svgs_in_figures} plots "
          f"({dom.body.get('data-probe-svg-sizes')} px), sort ok: {not any('sort' in f for f in failures)}"
          + (f", screenshot {args.screenshot}" if args.screenshot else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
