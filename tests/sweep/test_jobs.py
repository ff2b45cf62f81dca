"""Sweep planning without running anything: the grid, job identity, the folder's files, and every refusal that
comes before the first job (through the CLI: one line, exit 2, nothing written)."""

import json
import socket

import pytest

from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.models.tiny import save_tiny_model_dir
from slimlm.recipe import load_recipe, recipe_from_dict
from slimlm.sweep import Settings, expand, job_id, parse_grid
from slimlm.sweep.jobs import JOB_SCHEMA, check_folder, read_job
from tests.cli_errors import one_line_error

SETTINGS = Settings(protocol="pydoc-v1", tokens=512)
FAST = ["--protocol", "pydoc-v1", "--tokens", "512", "--no-speed"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", family="llama"))


# ---------------------------------------------------------------- the grid

def test_parse_grid_types_values_at_the_boundary():
    grid = parse_grid(["bits=3,4", "sparsity=0.5", "pattern=2:4", "symmetric=true", "scheme=int4-g64"])
    assert grid == {"bits": [3, 4], "sparsity": [0.5], "pattern": ["2:4"], "symmetric": [True],
                    "scheme": ["int4-g64"]}  # "2:4" stays text (YAML would read it as 124)
    for bad in (["bits"], ["bits="], ["=3"], ["bits=3,"], ["bits=3", "bits=4"]):
        with pytest.raises(SlimlmError, match="--grid"):
            parse_grid(bad)


def test_grid_crosses_each_recipe_with_the_fields_its_steps_have():
    recipes = [load_recipe(n) for n in ("gptq-int4-g64", "rtn-int4-g64", "wanda-50", "awq-gptq-int4-g64")]
    jobs = expand(recipes, {"bits": [3, 4], "group_size": [32, 64], "sparsity": [0.25]}, model_key="m",
                  settings=SETTINGS)
    names = [j.name for j in jobs]
    assert names[:4] == ["gptq-int4-g64[bits=3,group_size=32]", "gptq-int4-g64[bits=3,group_size=64]",
                         "gptq-int4-g64[bits=4,group_size=32]", "gptq-int4-g64[bits=4,group_size=64]"]
    assert "wanda-50[sparsity=0.25]" in names and len(names) == 4 + 4 + 1 + 4
    by_name = {j.name: j for j in jobs}
    # every step that has the field gets it, whatever form the recipe wrote its scheme in (inline, shorthand)
    for name in ("rtn-int4-g64[bits=3,group_size=32]", "awq-gptq-int4-g64[bits=3,group_size=32]"):
        for step in by_name[name].recipe().steps:
            assert (step.scheme.bits, step.scheme.granularity.size) == (3, 32)
    assert by_name["wanda-50[sparsity=0.25]"].recipe().steps[0].sparsity == 0.25
    assert by_name["gptq-int4-g64[bits=3,group_size=32]"].recipe().steps[0].act_order  # other fields kept
    assert by_name["gptq-int4-g64[bits=3,group_size=32]"].spec["name"] == "gptq-int4-g64[bits=3,group_size=32]"


def test_without_a_grid_the_recipe_is_kept_as_written():
    rec = load_recipe("rtn-int4-g64")
    (job,) = expand([rec], None, model_key="m", settings=SETTINGS)
    assert job.name == "rtn-int4-g64" and job.spec == rec.spec
    assert len(expand([rec, rec], None, model_key="m", settings=SETTINGS)) == 1  # the same job once


def test_grid_refusals_name_the_key_or_the_job():
    recipes = [load_recipe("rtn-int4-g64"), load_recipe("wanda-50")]
    with pytest.raises(SlimlmError, match="--grid key.s. colour match no step of rtn-int4-g64, wanda-50"):
        expand(recipes, {"colour": [1]}, model_key="m", settings=SETTINGS)
    with pytest.raises(SlimlmError, match=r"rtn-int4-g64\[bits=9\]: bits must be one of"):
        expand(recipes, {"bits": [9]}, model_key="m", settings=SETTINGS)


# ---------------------------------------------------------------- identity

def test_job_id_is_stable_and_sensitive_to_what_it_names():
    spec = load_recipe("rtn-int4-g64").spec
    a = job_id("m@1", spec, SETTINGS)
    assert a == job_id("m@1", json.loads(json.dumps(spec)), Settings(protocol="pydoc-v1", tokens=512))
    assert len(a) == 16 and int(a, 16) >= 0
    other_recipe = {**spec, "steps": [{"rtn": {"bits": 3, "group_size": 64, "symmetric": False}}]}
    changed = [job_id("m@2", spec, SETTINGS), job_id("m@1", other_recipe, SETTINGS),
               job_id("m@1", spec, Settings(protocol="wiki-v1", tokens=512)),
               job_id("m@1", spec, Settings(protocol="pydoc-v1", tokens=1024)),
               job_id("m@1", spec, Settings(protocol="pydoc-v1", tokens=512, calib_samples=4)),
               job_id("m@1", spec, Settings(protocol="pydoc-v1", tokens=512, full=True))]
    assert len({a, *changed}) == 1 + len(changed)


def test_job_id_changes_with_the_slimlm_version(monkeypatch):
    import slimlm

    spec = load_recipe("rtn-int4-g64").spec
    a = job_id("m", spec, SETTINGS)
    monkeypatch.setattr(slimlm, "__version__", "9.9.9")
    assert job_id("m", spec, SETTINGS) != a


# ---------------------------------------------------------------- the folder's files

def test_corrupt_or_foreign_files_are_refused_by_name(tmp_path):
    job = tmp_path / "jobs" / "0123456789abcdef"
    job.mkdir(parents=True)
    assert read_job(job) is None
    (job / "job.json").write_text("{not json")
    with pytest.raises(SlimlmError, match=f"{job}/job.json is unreadable or corrupt.*delete {job}"):
        read_job(job)
    (job / "job.json").write_text(json.dumps({"schema": "something/1"}))
    with pytest.raises(SlimlmError, match="is not a slimlm.job/1 file .schema 'something/1'."):
        read_job(job)
    (job / "job.json").write_text(json.dumps({"schema": JOB_SCHEMA, "id": "other", "status": "done"}))
    with pytest.raises(SlimlmError, match="does not describe job 0123456789abcdef"):
        read_job(job)
    (job / "job.json").write_text(json.dumps({"schema": JOB_SCHEMA, "id": job.name, "status": "done"}))
    with pytest.raises(SlimlmError, match="says done but .*result.json is missing"):
        read_job(job)
    (tmp_path / "sweep.json").write_text("[]")
    with pytest.raises(SlimlmError, match="sweep.json is not a slimlm.sweep/1 file"):
        check_folder(tmp_path, "m", SETTINGS)


def test_a_folder_of_something_else_or_another_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SlimlmError, match="exists and is not a sweep folder"):
        check_folder(tmp_path, "m", SETTINGS)
    (tmp_path / "notes.txt").unlink()
    assert check_folder(tmp_path, "m", SETTINGS) is None  # empty: a new sweep
    doc = {"schema": "slimlm.sweep/1", "model": "other", "protocol": "pydoc-v1", "created": "x", "jobs": []}
    (tmp_path / "sweep.json").write_text(json.dumps(doc))
    with pytest.raises(SlimlmError, match="is a sweep of other on pydoc-v1, not of m"):
        check_folder(tmp_path, "m", SETTINGS)


# ---------------------------------------------------------------- the CLI refuses before any job starts

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_input_is_one_line_before_any_work(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    sweep = ["sweep", "--model", tiny_dir, *FAST]
    cases = [
        (["--recipes", "rtn-int4-g64,nope", "--out", str(out)], "no recipe 'nope'"),
        (["--recipes", ",", "--out", str(out)], "no recipes given"),
        (["--recipes", "rtn-int4-g64", "--grid", "colour=1,2", "--out", str(out)], "colour match no step"),
        (["--recipes", "rtn-int4-g64", "--grid", "bits", "--out", str(out)], "is not KEY=V1,V2"),
        (["--recipes", "rtn-int4-g64", "--jobs", "0", "--out", str(out)], "--jobs"),
        (["--recipes", "rtn-int4-g64", "--ray-address", f"127.0.0.1:{_closed_port()}", "--out", str(out)],
         "does not answer"),
        (["--recipes", "rtn-int4-g64", "--ray-address", "nocolon", "--out", str(out)], "is not host:port"),
    ]
    for args, pattern in cases:
        one_line_error(capsys, main([*sweep, *args]), pattern)
        assert not out.exists(), args  # nothing written
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    one_line_error(capsys, main([*sweep, "--recipes", "rtn-int4-g64", "--out", str(afile / "run")]),
                    "cannot write to --out")
    one_line_error(capsys, main([*sweep, "--recipes", "rtn-int4-g64", "--out", str(afile)]), "is a file")
    one_line_error(capsys, main(["sweep", "--model", str(tmp_path / "none"), "--recipes", "rtn-int4-g64",
                                  "--out", str(out), *FAST]), "does not exist")


def test_a_corrupt_job_file_in_the_folder_is_refused_and_kept(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    from slimlm.models.identity import model_id

    out = tmp_path / "run"
    (job,) = expand([load_recipe("rtn-int4-g64")], None, model_key=model_id(tiny_dir), settings=SETTINGS)
    (out / "jobs" / job.id).mkdir(parents=True)
    (out / "jobs" / job.id / "job.json").write_text("garbage")
    doc = {"schema": "slimlm.sweep/1", "model": tiny_dir, "protocol": "pydoc-v1", "created": "x", "jobs": []}
    (out / "sweep.json").write_text(json.dumps(doc))
    line = one_line_error(capsys, main(["sweep", "--model", tiny_dir, "--recipes", "rtn-int4-g64", "--out",
                                         str(out), *FAST]), f"jobs/{job.id}/job.json is unreadable or corrupt")
    assert f"delete {out}/jobs/{job.id}" in line
    assert (out / "jobs" / job.id / "job.json").read_text() == "garbage"
    assert json.loads((out / "sweep.json").read_text()) == doc  # untouched: refused before writing


def test_recipe_objects_are_accepted_from_python():
    rec = recipe_from_dict({"name": "mine", "steps": [{"method": "rtn", "scheme": "int8-channel"}]})
    (job,) = expand([rec], {"bits": [4]}, model_key="m", settings=SETTINGS)
    assert job.name == "mine[bits=4]" and job.recipe().steps[0].scheme.bits == 4


def test_a_rerun_with_other_settings_is_refused(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    out.mkdir()
    doc = {"schema": "slimlm.sweep/1", "model": tiny_dir, "protocol": "pydoc-v1", "created": "x", "jobs": [],
           "settings": {"protocol": "pydoc-v1", "tokens": 1024, "full": False, "calib_samples": None}}
    (out / "sweep.json").write_text(json.dumps(doc))
    one_line_error(capsys, main(["sweep", "--model", tiny_dir, "--recipes", "rtn-int4-g64", "--out", str(out),
                                  *FAST]), "rerun with the same --tokens/--calib-samples")
    assert json.loads((out / "sweep.json").read_text()) == doc


def test_ray_flags_without_ray_installed_are_one_line(capsys, tiny_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "run"
    one_line_error(capsys, main(["sweep", "--model", tiny_dir, "--recipes", "rtn-int4-g64", "--ray", "--out",
                                  str(out), *FAST]), "pip install 'slimlm[sweep]'")
    with pytest.raises(SystemExit) as exit_:  # argparse: one usage line
        main(["sweep", "--recipes", "rtn-int4-g64", "--ray", "--ray-address", "auto", "--out", str(out)])
    assert exit_.value.code == 2 and "not allowed with argument --ray" in capsys.readouterr().err
    assert not out.exists()


def test_a_corrupt_base_result_is_refused_by_name(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    (out / "base").mkdir(parents=True)
    (out / "base" / "result.json").write_text('{"schema": "slimlm.result/1"}')
    doc = {"schema": "slimlm.sweep/1", "model": tiny_dir, "protocol": "pydoc-v1", "created": "x", "jobs": []}
    (out / "sweep.json").write_text(json.dumps(doc))
    one_line_error(capsys, main(["sweep", "--model", tiny_dir, "--recipes", "rtn-int4-g64", "--out", str(out),
                                  *FAST]), f"base/result.json is corrupt or not a slimlm result; delete {out}/base")
