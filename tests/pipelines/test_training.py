"""compress() with a recipe that trains: training text, the resumable state beside the output, refusals."""

import json

import pytest

from slimlm.cli import main
from slimlm.models.tiny import save_tiny_model_dir
from slimlm.pipelines.compress import compress

FAST = dict(protocol="pydoc-v1", tokens=512, speed=False)
RECIPE = """name: {name}
steps:
  - method: magnitude
    sparsity: 0.5
  - method: distill
    steps: 4
    seq_len: 32
    batch_size: 2
    samples: 8
    checkpoint_every: 2
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", family="llama"))


def recipe(tmp_path, name="kd-test"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE.format(name=name))
    return str(path)


def test_a_distilled_result_records_its_training_and_leaves_no_state(tiny_dir, tmp_path):
    out = tmp_path / "kd"
    report = compress(tiny_dir, recipe(tmp_path), out=out, **FAST)
    training = report.compressed.training
    assert len(training) == 1 and training[0]["method"] == "distill" and len(training[0]["losses"]) == 4
    assert training[0]["config"]["steps"] == 4 and "trainable" in training[0]
    assert report.compressed.to_dict()["training"] == training and "training" not in report.base.to_dict()
    assert out.is_dir() and not (tmp_path / "kd.train").exists()


def test_a_state_directory_of_another_run_is_refused_before_any_work(capsys, tiny_dir, tmp_path):
    state = tmp_path / "kd.train"
    state.mkdir()
    theirs = {"model": "someone-else", "recipe": {}, "protocol": "wiki-v1", "samples": 8, "bos": False}
    (state / "run.json").write_text(json.dumps(theirs))
    code = main(["compress", "--model", tiny_dir, "--recipe", recipe(tmp_path), "--out", str(tmp_path / "kd"),
                 "--protocol", "pydoc-v1", "--tokens", "512", "--no-speed"])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code != 0 and len(errors) == 1 and "holds the training state of another run" in errors[0], err
    assert "model" in errors[0] and "recipe" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "kd").exists() and json.loads((state / "run.json").read_text()) == theirs


def test_a_missing_teacher_is_refused_before_any_work(capsys, tiny_dir, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(RECIPE.format(name="t") + "    teacher: /no/such/teacher\n")
    code = main(["compress", "--model", tiny_dir, "--recipe", str(path), "--out", str(tmp_path / "t"),
                 "--protocol", "pydoc-v1", "--tokens", "512", "--no-speed"])
    err = capsys.readouterr().err
    assert code != 0 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.train").exists()
