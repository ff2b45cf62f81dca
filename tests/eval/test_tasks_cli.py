"""`slimlm eval --tasks`: accuracy beside perplexity in the table and the JSON; bad input in one line."""

import json

import pytest

from slimlm.cli import main
from slimlm.eval import load_result
from slimlm.eval.lm_eval_cli import with_local_tasks
from slimlm.eval.result import Result
from slimlm.eval.tasks import TASKS_DIR
from slimlm.models.tiny import save_tiny_model_dir
from tests.cli_errors import one_line_error

FAST = ["--protocol", "pydoc-v1", "--tokens", "512", "--no-speed"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", family="llama", add_bos=True))


def test_eval_tasks_prints_and_stores_accuracy(capsys, tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", tiny_dir, *FAST, "--tasks", "slimlm_pydoc_choice,slimlm_wiki_lastword", "--task-limit", "4",
                 "--json", str(out)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "perplexity" in table and "slimlm_pydoc_choice acc (n=4)" in table and "slimlm_wiki_lastword acc" in table
    tasks = json.loads(out.read_text())["tasks"]
    assert set(tasks) == {"slimlm_pydoc_choice", "slimlm_wiki_lastword"}
    assert all(0.0 <= t["acc"] <= 1.0 and t["samples"] == 4 for t in tasks.values())
    assert load_result(out).tasks == tasks


def test_results_without_tasks_keep_their_json(tmp_path):
    """Old result files (no "tasks") load, and a result without tasks writes none."""
    r = Result.from_dict(json.loads(json.dumps(_a_result().to_dict())))
    assert r.tasks is None and "tasks" not in r.to_dict()


def _a_result() -> Result:
    from slimlm.eval.quality import Quality
    from slimlm.models.size import SizeReport

    size = SizeReport(**{f: 0 for f in SizeReport.__dataclass_fields__})
    return Result(protocol="p", model="m", base="m", quality=Quality(1.0, 0.0, 0.0, 1.0, 1, 1, 1), size=size,
                  speed=None)  # fmt: skip


@pytest.mark.parametrize("argv, pattern", [
    (["--tasks", "slimlm_nope"], "unknown slimlm task 'slimlm_nope'; slimlm's local tasks: slimlm_wiki_lastword"),
    (["--tasks", ","], "no task given"),
    (["--tasks", "slimlm_pydoc_choice", "--task-limit", "0"], "--task-limit must be a positive int"),
    (["--task-limit", "3"], "--task-limit is for --tasks"),
])
def test_bad_task_options_get_one_line_and_exit_2(capsys, tiny_dir, argv, pattern):
    one_line_error(capsys, main(["eval", tiny_dir, *FAST, *argv]), pattern)


def test_an_unknown_task_is_refused_before_the_model_loads(capsys):
    """Checked against lm-eval's whole index (seconds); the model named does not even exist."""
    one_line_error(capsys, main(["eval", "/no/such/model", "--tasks", "slimlm_pydoc_choice,no_such_task_xyz"]),
                    "unknown task 'no_such_task_xyz': neither slimlm's")  # fmt: skip


def test_lm_eval_cli_adds_the_local_task_directory():
    local = ["--include_path", str(TASKS_DIR)]
    run = ["run", "--model", "slimlm", "--tasks", "x", *local]
    assert with_local_tasks(["--model", "slimlm", "--tasks", "x"]) == run
    assert with_local_tasks(["ls", "tasks"]) == ["ls", "tasks", *local]
    assert with_local_tasks(["--include_path", "mine", "--tasks", "x"]) == ["--include_path", "mine", "--tasks", "x"]
    assert with_local_tasks([]) == []
