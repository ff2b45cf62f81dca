"""benchmarks/peft_bench.py: its row grammar (pure) and a tiny end-to-end run on a model built from a config."""

import importlib.util
import json
from pathlib import Path

import pytest

from slimlm.models.tiny import save_tiny_model_dir

SPEC = importlib.util.spec_from_file_location("peft_bench", Path(__file__).parents[2] / "benchmarks" / "peft_bench.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_rows_parse():
    assert bench.parse_rows("full, lora4,lora64,qlora,lora@gptq3,qlora@sparse24") == [
        ("full", None, None), ("lora", 4, None), ("lora", 64, None), ("qlora", None, None),
        ("lora", None, "gptq3"), ("qlora", None, "sparse24")]  # fmt: skip
    for bad in ("lora0", "lorax", "dora@gptq3", "lora@int2", "magic"):
        with pytest.raises(SystemExit, match="bad row"):
            bench.parse_rows(bad)
    args = bench.parse_args(["--rows", "bitfit", "--steps", "3", "--threads", "1", "--model", "m"])
    assert (args.steps, args.threads, args.model, args.parsed) == (3, 1, "m", [("bitfit", None, None)])
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])


def test_tiny_run_writes_every_column(tmp_path):
    model = save_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    bench.main(["--rows", "full,lora4,prompt,lora@sparse24", "--steps", "2", "--threads", "1", "--model",
                str(model), "--samples", "4", "--calib-samples", "2", "--seq-len", "32", "--tokens", "512",
                "--forget", "pydoc-v1", "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"full", "lora4", "prompt", "lora@sparse24"}
    assert rows["lora4"]["trainable"] < rows["full"]["trainable"] and rows["prompt"]["trainable"] == 16 * 64
    assert all(r["pydoc_after"] > 1 for k, r in rows.items() if "@" not in k)
    assert rows["lora@sparse24"]["kld_before"] > 0 and "kld_closed_per_m" in rows["lora@sparse24"]
    assert "lora@sparse24" in bench.table(json.loads(out.read_text()))
