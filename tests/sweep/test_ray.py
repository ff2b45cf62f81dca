"""The Ray path on a local Ray runtime (one per module: starting Ray is slow): the same jobs give the same
results as the local path, and the folder is the same."""

import json

import pytest
import ray  # in the dev extra: CI runs this test rather than skipping it

from slimlm.models.tiny import save_tiny_model_dir
from slimlm.sweep import sweep

KW = dict(protocol="pydoc-v1", tokens=512, calib_samples=2, speed=False, threads=1)
RECIPES = ["rtn-int4-g64", "gptq-int4-g64"]


@pytest.fixture(scope="module")
def runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", family="llama"))


def _files(out, name):
    doc = json.loads((out / "sweep.json").read_text())
    return {j["recipe"]: json.loads((out / "jobs" / j["id"] / name).read_text()) for j in doc["jobs"]}


def test_ray_runs_the_same_jobs_with_the_same_results_as_local(runtime, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))  # travels to the Ray tasks
    local = sweep(tiny_dir, RECIPES, out=tmp_path / "local", **KW)
    on_ray = sweep(tiny_dir, RECIPES, out=tmp_path / "ray", ray=True, jobs=2, **KW)
    assert not local.failed and not on_ray.failed
    assert [j.id for j in on_ray.jobs] == [j.id for j in local.jobs]
    for name in RECIPES:
        a, b = _files(tmp_path / "local", "result.json")[name], _files(tmp_path / "ray", "result.json")[name]
        assert a["quality"] == b["quality"] and a["size"] == b["size"] and a["quality"]["kld"] > 0
        assert _files(tmp_path / "local", "samples.json")[name] == _files(tmp_path / "ray", "samples.json")[name]
    base = [json.loads((tmp_path / d / "base" / "result.json").read_text())["quality"] for d in ("local", "ray")]
    assert base[0] == base[1]
    assert ray.is_initialized()  # a runtime the caller started is left running
