"""benchmarks/lowrank.py: row parsing, the same-size structured rows, the table, and one tiny-model run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from slimlm.lowrank import ASVD, SVD, SVDLLM
from slimlm.models.tiny import save_tiny_model_dir
from slimlm.prune.structured_config import Structured

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import lowrank as bench  # noqa: E402


@pytest.mark.parametrize("row,want", [
    ("svd-20", ("svd", 0.2, "uniform", False)),
    ("asvd-40", ("asvd", 0.4, "uniform", False)),
    ("svd-llm-20:spectrum", ("svd-llm", 0.2, "spectrum", False)),
    ("svd-llm-20:spectrum:update", ("svd-llm", 0.2, "spectrum", True)),
    ("svd-llm-40:update", ("svd-llm", 0.4, "uniform", True)),
    ("width-20", ("width", 0.2, "uniform", False)),
])  # fmt: skip
def test_parse_row(row, want):
    assert bench.parse_row(row) == want


@pytest.mark.parametrize("row", ["svd", "svd-0", "svd-100", "lora-20", "svd-llm-20:greedy", "width-20:spectrum",
                                 "svd-2x", "svd-20:update", "width-20:update", "svd-llm-20:update:x"])  # fmt: skip
def test_bad_rows_are_refused(row):
    with pytest.raises(SystemExit, match="bad row"):
        bench.parse_row(row)


def test_row_configs_and_the_structured_row_matches_the_weights_removed():
    kw = dict(linear_weights=800, total_params=1000)
    assert bench.row_config("svd-20", **kw) == SVD(params=0.2)
    assert bench.row_config("asvd-40", **kw) == ASVD(params=0.4)
    assert bench.row_config("svd-llm-20:spectrum", **kw) == SVDLLM(params=0.2, allocation="spectrum")
    assert bench.row_config("svd-llm-20:update", **kw) == SVDLLM(params=0.2, update=True)
    cfg = bench.row_config("width-20", **kw)
    assert isinstance(cfg, Structured) and cfg.mode == "width" and cfg.params == pytest.approx(0.16)


def test_table_lists_each_stored_row():
    store = {"model": "m", "base": {"ppl": 10.0, "params": 2e6},
             "rows": {"svd-20": dict(params=1.5e6, ppl=30.0, kld=0.9, top1=0.5, decode_ratio=1.1, minutes=0.2,
                                     threads=2)}}  # fmt: skip
    lines = bench.table(store).splitlines()
    assert lines[0] == "base: m, ppl 10.00, 2.0M params"
    assert lines[3] == "svd-20 | 1.5 | 30.00 | 0.9000 | 0.500 | 1.10x | 0.2 (2t)"


def test_runs_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model_dir(tmp_path / "tiny")
    work = tmp_path / "work"
    args = ["--model", str(model), "--protocol", "pydoc-v1", "--tokens", "256", "--calib-samples", "4",
            "--threads", "1", "--rounds", "1", "--work", str(work)]  # fmt: skip
    bench.main(["--rows", "svd-20,svd-llm-20", *args])
    store = json.loads((work / "rows.json").read_text())
    assert set(store["rows"]) == {"svd-20", "svd-llm-20"}
    assert all(r["params"] < store["base"]["params"] and r["kld"] > 0 for r in store["rows"].values())
    assert "svd-llm-20 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds rows of"):
        bench.main(["--table", *[a if a != str(model) else "other" for a in args]])
