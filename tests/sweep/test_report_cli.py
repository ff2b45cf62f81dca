"""`slimlm report`: writes the page; bad input is one line, exit 2, nothing written and the folder untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimlm.cli import main
from tests.sweep.report_fixtures import job_id, make_result, standard_jobs, write_sweep


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, args: list[str], *, match: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    return err


@pytest.fixture
def folder(tmp_path):
    return write_sweep(tmp_path / "run", standard_jobs())


def test_writes_the_page(folder, tmp_path, capsys):
    before = snapshot(folder)
    out = tmp_path / "report.html"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and out.read_text().startswith("<!DOCTYPE html>")
    assert snapshot(folder) == before  # inputs only read
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_existing_out_needs_overwrite(folder, tmp_path, capsys):
    out = tmp_path / "report.html"
    out.write_text("keep me")
    refused(capsys, ["report", str(folder), "--out", str(out)], match="--overwrite")
    assert out.read_text() == "keep me"
    assert main(["report", str(folder), "--out", str(out), "--overwrite"]) == 0
    assert "<table" in out.read_text()


def test_out_is_a_directory(folder, tmp_path, capsys):
    refused(capsys, ["report", str(folder), "--out", str(tmp_path)], match="is a directory")


def test_not_a_sweep(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    refused(capsys, ["report", str(tmp_path / "x"), "--out", str(tmp_path / "r.html")], match="not a sweep folder")
    assert not (tmp_path / "r.html").exists()


def _break(folder: Path, rel: str, text: str) -> Path:
    path = folder / rel
    path.write_text(text)
    return path


@pytest.mark.parametrize("rel, text, match", [
    ("sweep.json", '{"schema": "slimlm.sweep/1", "jobs": [', "corrupt JSON"),
    ("sweep.json", '{"schema": "other/1", "jobs": []}', "is not a slimlm.sweep/1 file (schema 'other/1')"),
    ("sweep.json", '{"schema": "slimlm.sweep/1", "jobs": [{"id": "../x", "recipe": "a"}]}', "each job needs"),
    ("base/result.json", '[1, 2]', "is not a slimlm.result/1 file (schema 'list')"),
    ("base/result.json", '{"schema": "slimlm.result/1"}', "is not a readable slimlm result"),
    (f"jobs/{job_id('int8')}/job.json", "\x00garbage", "corrupt JSON"),
    (f"jobs/{job_id('int8')}/job.json", '{"schema": "slimlm.job/1", "id": "other", "status": "done"}', "holds job"),
    (f"jobs/{job_id('int8')}/result.json", '{"schema": "slimlm.comparison/1"}', "is not a slimlm.result/1 file"),
    (f"jobs/{job_id('int8')}/samples.json", '{"schema": "slimlm.samples/1", "samples": [{"prompt": 1}]}',
     "each sample needs"),
])  # fmt: skip
def test_corrupt_or_foreign_json_names_the_file(folder, tmp_path, capsys, rel, text, match):
    path = _break(folder, rel, text)
    before = snapshot(folder)
    out = tmp_path / "r.html"
    err = refused(capsys, ["report", str(folder), "--out", str(out)], match=match)
    assert str(path) in err
    assert not out.exists() and snapshot(folder) == before


def test_done_without_result(folder, tmp_path, capsys):
    (folder / "jobs" / job_id("int3") / "result.json").unlink()
    refused(capsys, ["report", str(folder), "--out", str(tmp_path / "r.html")], match="says done without one")


def test_bad_status(folder, tmp_path, capsys):
    path = folder / "jobs" / job_id("int3") / "job.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": "running"}))
    refused(capsys, ["report", str(folder), "--out", str(tmp_path / "r.html")], match="status 'running'")


def test_no_finished_jobs(tmp_path, capsys):
    folder = write_sweep(tmp_path / "run", [{"recipe": "a", "status": "failed", "error": "boom"},
                                            {"recipe": "b", "status": "pending"}])
    refused(capsys, ["report", str(folder), "--out", str(tmp_path / "r.html")],
            match="no finished jobs (1 failed, 1 pending)")
    assert not (tmp_path / "r.html").exists()


def test_mixed_protocols_refused(tmp_path, capsys):
    jobs = [{"recipe": "a", "status": "done", "result": make_result(ppl=11, kld=0.1, bpw=4, mb=1, protocol="other")}]
    folder = write_sweep(tmp_path / "run", jobs)
    refused(capsys, ["report", str(folder), "--out", str(tmp_path / "r.html")], match="different protocols")
