"""The two halves together: a folder written by `slimlm sweep` is read by `slimlm report` and `sweep_table`."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from slimlm.cli import main
from slimlm.models.tiny import save_tiny_model_dir
from slimlm.sweep.folder import read_sweep
from slimlm.sweep.table import sweep_table


class _Rows(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows, self.svgs, self._in_row = [], 0, False

    def handle_starttag(self, tag, attrs):
        self.svgs += tag == "svg"
        if tag == "tr":
            self._in_row, self.rows = True, [*self.rows, ""]

    def handle_endtag(self, tag):
        self._in_row = self._in_row and tag != "tr"

    def handle_data(self, data):
        if self._in_row:
            self.rows[-1] += data


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))


def test_a_sweep_folder_becomes_a_report_with_every_job(tmp_path, capsys):
    model = str(save_tiny_model_dir(tmp_path / "tiny", family="llama"))
    out = tmp_path / "run"
    argv = ["sweep", "--model", model, "--recipes", "rtn-int4-g64,rtn-int8-g64", "--grid", "group_size=32,64",
            "--out", str(out), "--protocol", "pydoc-v1", "--tokens", "512", "--no-speed"]  # fmt: skip
    assert main(argv) == 0
    run = read_sweep(out)
    names = sorted(j.recipe for j in run.jobs)
    assert len(names) == 4 and all(j.status == "done" for j in run.jobs)
    table = sweep_table(out)
    assert all(name in table for name in names)
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "report.html")]) == 0
    page = _Rows()
    page.feed((tmp_path / "report.html").read_text())
    for name in names:
        assert sum(name in row for row in page.rows) >= 1
    assert page.svgs >= 2  # speed was skipped: the size/quality plots are drawn
    assert main(["report", str(out), "--out", str(tmp_path / "report.html")]) == 2  # exists: --overwrite
