"""The report page as a parser sees it: one row per job, every plot an inline SVG, the frontier, escaping,
nothing fetched from the network; and the terminal table."""

from __future__ import annotations

import re

import pytest

from slimlm.sweep.folder import read_sweep
from slimlm.sweep.plots import PLOTS, make_plot
from slimlm.sweep.report import render_report, sample_jobs
from slimlm.sweep.table import sweep_table
from tests.sweep.html_page import Page
from tests.sweep.report_fixtures import job_id, make_result, standard_jobs, write_sweep

FRONTIER = {"int3", "int4-g64", "int8", "int8-copy"}  # of every plot in standard_jobs (base besides)


@pytest.fixture
def run(tmp_path):
    jobs = standard_jobs() + [{"recipe": "int2-pending", "status": "pending"}]
    return read_sweep(write_sweep(tmp_path / "run", jobs))


@pytest.fixture
def page(run):
    return Page(render_report(run))


def test_one_row_per_job(run, page):
    rows = [tr for tr in page.find("tr") if "data-job" in tr.attrs]
    assert [tr.attrs["data-job"] for tr in rows] == [j.id for j in run.jobs]
    assert len(rows) == 7
    status = {tr.attrs["data-job"]: tr.classes() for tr in rows}
    assert "failed" in status[job_id("nf2")] and "pending" in status[job_id("int2-pending")]
    failed = next(tr for tr in rows if tr.attrs["data-job"] == job_id("nf2"))
    assert "nf2 is not a scheme; valid: nf4, int2..int8" in failed.content
    assert len([tr for tr in page.find("tr") if "base" in tr.classes()]) == 1
    header = [th.content for th in page.find("th") if th.inside("table").attrs.get("class") == "sortable results"]
    assert header[:4] == ["recipe", "ppl", "Δppl vs base", "KLD"] and header[-1] == "status"


def test_numbers_in_the_table(run, page):
    int4 = next(tr for tr in page.find("tr") if tr.attrs.get("data-job") == job_id("int4-g64"))
    cells = [td for td in page.find("td") if td.inside("tr") is int4]
    texts = [td.content for td in cells]
    assert texts[:8] == ["int4-g64", "10.800", "+8.00%", "0.05", "1.0", "4.50", "50.00", "2.50x"]
    assert float(cells[1].attrs["data-v"]) == 10.8  # the sort key is the number, not the text
    pending = next(tr for tr in page.find("tr") if tr.attrs.get("data-job") == job_id("int2-pending"))
    assert {td.attrs.get("data-v") for td in page.find("td") if td.inside("tr") is pending} == {None, ""}


def test_every_plot_is_an_inline_svg(page):
    figures = {f.attrs["data-plot"]: f for f in page.find("figure")}
    assert set(figures) == {spec.key for spec in PLOTS}
    for f in figures.values():
        assert [s for s in page.find("svg") if s.inside("figure") is f], f.attrs
    svg_text = " ".join(t.content for t in page.find("text") if t.inside("svg"))
    for label in ("int8, int8-copy", "int4-g64", "int4-bad", "int3", "base"):  # every point labelled
        assert label in svg_text


def test_frontier(run, page):
    bold = {tr.text[0] for tr in page.find("tr") if "frontier" in tr.classes()}  # the recipe cell comes first
    assert bold == FRONTIER
    for spec in PLOTS:
        plot = make_plot(run, spec)
        assert set(plot.frontier) == FRONTIER | {"base"}, spec.key
    kld = make_plot(run, PLOTS[0])
    assert kld.frontier == ("int3", "int4-g64", "int8", "int8-copy", "base")  # drawn left to right
    # the highlighted markers: one per frontier point (the frontier colour), the dominated one grey
    blue = re.findall(r'<use [^>]*style="fill: #1a73e8', kld.svg)
    assert len(blue) == len(kld.frontier)  # the base too, under its star
    assert len(re.findall(r'<use [^>]*style="fill: #9aa0a6', kld.svg)) == 2  # int4-bad + the legend's marker


def test_strings_are_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    jobs = [{"recipe": evil, "status": "done", "result": make_result(ppl=11, kld=0.1, bpw=4, mb=1),
             "texts": ["</td><b>bold</b>", "<i>same</i> then <u>not</u>", "$x$"]},
            {"recipe": "fails", "status": "failed", "error": "<img src=x onerror=alert(1)>"}]
    base_texts = ("<em>base</em>", "<i>same</i> then <s>other</s>", "plain")  # shared prefix, marked suffix
    html = render_report(read_sweep(write_sweep(tmp_path / "run", jobs, base_texts=base_texts)))
    page = Page(html)
    assert len(page.find("script")) == 1 and not page.find("img")
    assert not any(page.find(tag) for tag in ("em", "i", "u", "s"))
    assert [m.content for m in page.find("mark")] == ["/td><b>bold</b>", "u>not</u>", "$x$"]
    assert [b.content for b in page.find("b") if b.inside("table")] == [evil] * 3  # the recipe over each sample
    text = "".join(e.content for e in page.find("body"))
    assert evil in text and "<img src=x onerror=alert(1)>" in text and "</td><b>bold</b>" in text
    assert evil in " ".join(t.content for t in page.find("text") if t.inside("svg"))  # the plot label too


def test_self_contained(page, run):
    html = render_report(run)
    assert not page.find("link") and not page.find("img") and not page.find("iframe")
    assert all("src" not in s.attrs for s in page.find("script"))
    refs = [v for e in page.elements for k, v in e.attrs.items() if k in ("href", "src", "xlink:href") and v]
    assert refs and all(v.startswith("#") for v in refs)  # only fragments inside the page
    namespaces = [v for e in page.elements for k, v in e.attrs.items() if k.startswith("xmlns")]
    urls = re.findall(r"https?://[^\s\"'<>)]+", html)
    assert sorted(urls) == sorted(namespaces)  # the SVG namespace names, nothing fetched
    assert not re.search(r"url\((?!#)", html) and "@import" not in html


def test_skipped_plot_and_partial_points(tmp_path):
    jobs = [{"recipe": "a", "status": "done", "result": make_result(ppl=11, kld=0.1, bpw=4, mb=1, tps=None)},
            {"recipe": "b", "status": "done", "result": make_result(ppl=12, kld=None, bpw=3, mb=0.8, tps=None)}]
    run = read_sweep(write_sweep(tmp_path / "run", jobs, base=make_result(ppl=10, kld=0.0, bpw=32, mb=4, tps=None)))
    page = Page(render_report(run))
    speed = page.find("figure", data_plot="tps-ppl")[0]
    assert "skipped" in speed.classes() and not [s for s in page.find("svg") if s.inside("figure") is speed]
    assert "skipped: no finished job has decode tokens/s" in speed.content
    kld = page.find("figure", data_plot="bpw-kld")[0]
    assert "not plotted (field not measured): b" in kld.content


def test_samples_all_when_few_frontier_when_many(tmp_path, run):
    assert {j.recipe for j in sample_jobs(run, FRONTIER)} == {j.recipe for j in run.with_status("done")}
    many = standard_jobs()[:5] + [{"recipe": f"extra{i}", "status": "done",
                                   "result": make_result(ppl=20 + i, kld=1.0 + i, bpw=16, mb=3)} for i in range(3)]
    big = read_sweep(write_sweep(tmp_path / "big", many))
    assert {j.recipe for j in sample_jobs(big, FRONTIER)} == FRONTIER
    page = Page(render_report(run))
    marks = [m.content for m in page.find("mark")]
    assert marks == ["ninth century.", "south to the hills."]  # int4-g64's departures from the base


def test_environment_differences(tmp_path):
    jobs = [{"recipe": "a", "status": "done", "result": make_result(ppl=11, kld=0.1, bpw=4, mb=1, threads=2)}]
    page = Page(render_report(read_sweep(write_sweep(tmp_path / "run", jobs))))
    threads = next(tr for tr in page.find("tr") if tr.inside("table").attrs.get("class") == "env"
                   and tr.text and tr.text[0] == "threads")  # fmt: skip
    assert [td.content for td in page.find("td") if td.inside("tr") is threads] == ["threads", "1", "a: 2"]


def test_terminal_table(tmp_path, run):
    text = sweep_table(run.path)
    lines = text.splitlines()
    assert "protocol wiki-v1" in lines[0]
    assert lines[2].split()[:3] == ["recipe", "ppl", "Δppl"] and set(lines[3]) == {"-", " "}
    assert lines[4].startswith("base (tiny)") and "10.000" in lines[4]
    body = [ln for ln in lines[5:] if ln and not ln.startswith("KLD is")]
    assert [ln.split()[0] for ln in body] == [j.recipe for j in run.jobs]
    assert any("failed: nf2 is not a scheme" in ln for ln in body) and any(ln.endswith("pending") for ln in body)
