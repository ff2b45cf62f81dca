"""Sweeps that run: the folder they write, resuming without recomputing, a failing job recorded while the others
finish (exit 1), and a worker that dies recorded as failed. Each job runs in a worker process (forkserver)."""

import json
import os
import shutil

import pytest

from slimlm.cli import main
from slimlm.eval import load_result
from slimlm.models.tiny import save_tiny_model_dir
from slimlm.sweep import PROMPTS, sweep

FAST = ["--protocol", "pydoc-v1", "--tokens", "512", "--no-speed"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", family="llama"))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path_factory.getbasetemp() / "sweep-cache"))


def _jobs(out):
    doc = json.loads((out / "sweep.json").read_text())
    return {j["recipe"]: out / "jobs" / j["id"] for j in doc["jobs"]}


def test_sweep_writes_the_layout_and_resumes_without_recomputing(capsys, tiny_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["sweep", "--model", tiny_dir, "--recipes", "rtn-int4-g64,rtn-int8-g64", "--out", str(out), *FAST]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rtn-int4-g64: ppl" in printed and "rtn-int8-g64: ppl" in printed and "bits/w" in printed
    assert "KLD vs base (nats/token)" in printed  # the comparison table of eval --compare

    doc = json.loads((out / "sweep.json").read_text())
    assert doc["schema"] == "slimlm.sweep/1" and doc["model"] == tiny_dir and doc["protocol"] == "pydoc-v1"
    jobs = _jobs(out)
    assert list(jobs) == ["rtn-int4-g64", "rtn-int8-g64"]
    base = load_result(out / "base" / "result.json")
    assert base.model == tiny_dir and base.quality.kld == 0.0
    for name, folder in jobs.items():
        job = json.loads((folder / "job.json").read_text())
        assert job["schema"] == "slimlm.job/1" and job["id"] == folder.name and job["status"] == "done"
        assert job["recipe_name"] == name and job["recipe"]["name"] == name and job["error"] is None
        assert job["model"] == tiny_dir and job["protocol"] == "pydoc-v1" and job["wall_seconds"] >= job["seconds"]
        result = load_result(folder / "result.json")
        assert result.base == tiny_dir and result.quality.kld > 0 and result.quality.tokens == 512
        samples = json.loads((folder / "samples.json").read_text())
        assert samples["schema"] == "slimlm.samples/1" and [s["prompt"] for s in samples["samples"]] == list(PROMPTS)
        assert not (folder / "model").exists()  # no --keep-models
    assert load_result(jobs["rtn-int8-g64"] / "result.json").size.bits_per_weight == pytest.approx(8.5)
    base_samples = json.loads((out / "base" / "samples.json").read_text())
    assert [s["prompt"] for s in base_samples["samples"]] == list(PROMPTS)

    first, second = jobs["rtn-int4-g64"], jobs["rtn-int8-g64"]
    kept = ((first / "job.json").stat().st_mtime_ns, json.loads((first / "job.json").read_text())["finished"])
    base_mtime = (out / "base" / "result.json").stat().st_mtime_ns
    shutil.rmtree(second)  # as if the sweep had been killed during the second job...
    (out / "jobs" / f".{second.name}.tmp-killed" / "model").mkdir(parents=True)  # ...which leaves its temp folder
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rtn-int4-g64: ppl" in printed and "done before, skipped" in printed
    assert ((first / "job.json").stat().st_mtime_ns, json.loads((first / "job.json").read_text())["finished"]) == kept
    assert (out / "base" / "result.json").stat().st_mtime_ns == base_mtime  # the base is measured once
    assert json.loads((second / "job.json").read_text())["status"] == "done"
    assert _jobs(out) == jobs and sorted(os.listdir(out / "jobs")) == sorted(f.name for f in jobs.values())


def test_a_failing_job_is_recorded_and_the_others_finish(capsys, tiny_dir, tmp_path):
    out = tmp_path / "run"
    # group_size 48 does not divide the tiny model's 64 input features: that job's compress refuses
    argv = ["sweep", "--model", tiny_dir, "--recipes", "rtn-int4-g64", "--grid", "group_size=48,32", "--out",
            str(out), "--keep-models", "--jobs", "2", *FAST]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "rtn-int4-g64[group_size=48]: FAILED: " in captured.out
    assert "rtn-int4-g64[group_size=32]: ppl" in captured.out
    assert "1 of 2 jobs failed" in captured.err
    jobs = _jobs(out)
    bad = json.loads((jobs["rtn-int4-g64[group_size=48]"] / "job.json").read_text())
    assert bad["status"] == "failed"  # the refusal's own line, not a crash report
    assert bad["error"].startswith("model.layers.0.self_attn.q_proj: group_size 48 does not divide in_features 64")
    assert "\n" not in bad["error"] and sorted(os.listdir(jobs["rtn-int4-g64[group_size=48]"])) == ["job.json"]
    good = jobs["rtn-int4-g64[group_size=32]"]
    assert json.loads((good / "job.json").read_text())["status"] == "done"
    assert (good / "model" / "slimlm_manifest.json").is_file()  # --keep-models
    good_mtime = (good / "job.json").stat().st_mtime_ns
    assert main(argv) == 1  # a re-run retries the failed job only
    assert (good / "job.json").stat().st_mtime_ns == good_mtime
    assert json.loads((jobs["rtn-int4-g64[group_size=48]"] / "job.json").read_text())["finished"] >= bad["finished"]


def test_a_worker_that_dies_without_answering_is_a_failed_outcome(tmp_path):
    from slimlm.sweep.local import run_local

    outcomes = []
    broken = {"kind": "job", "dir": str(tmp_path / "j"), "job": {"no": "fields"}}  # the child raises TypeError
    run_local([broken], jobs=1, on_done=lambda task, outcome: outcomes.append(outcome))
    (outcome,) = outcomes
    assert outcome["status"] == "failed" and "worker process died (exit status 1)" in outcome["error"]


def test_sweep_from_python_reports_each_job(tiny_dir, tmp_path):
    seen = []
    report = sweep(tiny_dir, ["rtn-int4-g64"], out=tmp_path / "run", protocol="pydoc-v1", tokens=512, speed=False,
                   on_job=lambda o, n: seen.append((o.name, o.status, n)))
    assert seen == [("rtn-int4-g64", "done", 1)] and not report.failed and report.base.model == tiny_dir
    assert "rtn-int4-g64" in report.table() and report.jobs[0].result.quality.kld > 0


def test_compress_reuses_a_base_result_instead_of_measuring_the_base(tiny_dir, tmp_path):
    import dataclasses

    from slimlm.errors import SlimlmError
    from slimlm.pipelines.compress import compress

    kw = dict(protocol="pydoc-v1", tokens=512, speed=False)
    measured = compress(tiny_dir, "rtn-int4-g64", out=tmp_path / "a", **kw)
    given = dataclasses.replace(measured.base, created="given")
    again = compress(tiny_dir, "rtn-int4-g64", out=tmp_path / "b", base_result=given, **kw)
    assert again.base is given and again.compressed.quality == measured.compressed.quality
    with pytest.raises(SlimlmError, match="base_result measures other, not"):
        compress(tiny_dir, "rtn-int4-g64", out=tmp_path / "c", base_result=dataclasses.replace(given, model="other"),
                 **kw)
