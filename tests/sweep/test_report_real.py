"""The report over measured Results (a tiny model and RTN copies), not hand-written numbers."""

from __future__ import annotations

import pytest

from slimlm.sweep.folder import read_sweep
from slimlm.sweep.plots import PLOTS, make_plot
from slimlm.sweep.report import render_report
from tests.sweep.html_page import Page
from tests.sweep.report_fixtures import evaluated_sweep


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    return read_sweep(evaluated_sweep(tmp_path / "run", ("int8-channel", "int4-g16", "int2-g16")))


def test_report_of_measured_results(run):
    page = Page(render_report(run))
    assert len([tr for tr in page.find("tr") if "data-job" in tr.attrs]) == 4
    assert len([s for s in page.find("svg") if s.inside("figure")]) == len(PLOTS)  # speed measured: all three
    kld = {j.recipe: j.result.quality.kld for j in run.with_status("done")}
    assert 0 < kld["rtn-int8-channel"] < kld["rtn-int4-g16"] < kld["rtn-int2-g16"]
    front = make_plot(run, PLOTS[0]).frontier  # fewer bits cost KLD here: every RTN point is on the frontier
    assert set(front) == {"base", "rtn-int8-channel", "rtn-int4-g16", "rtn-int2-g16"}
    assert "No samples recorded" in "".join(e.content for e in page.find("p"))
