"""benchmarks/compensation.py: its row grammar, and the whole table on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from slimlm.models.tiny import save_tiny_model_dir

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import compensation  # noqa: E402


def test_rows_parse_into_scheme_rank_and_whitening():
    rows = compensation.parse_rows("gptq-int3-g64, gptq-int3-g64+eora32,gptq-int3-g64+svd16,gptq-int4-g64")
    assert [(r.scheme, r.rank, r.whiten) for r in rows] == [("int3-g64", None, True), ("int3-g64", 32, True),
                                                              ("int3-g64", 16, False), ("int4-g64", None, True)]
    assert rows[1].base_row == "gptq-int3-g64"
    assert len(compensation.parse_rows(compensation.ROWS)) == 8
    args = compensation.parse_args(["--rows", "gptq-int3-g64+eora8", "--threads", "1", "--no-speed"])
    assert args.threads == 1 and args.no_speed and args.parsed_rows[0].rank == 8


@pytest.mark.parametrize("bad", ["rtn-int3-g64", "gptq-int3-g64+eora", "gptq-int3-g64+eora0", "gptq-int3-g64+lora8",
                                 "gptq-int3-g64,gptq-int3-g64"])  # fmt: skip
def test_bad_rows_are_refused_in_one_line(bad):
    with pytest.raises(SystemExit) as e:
        compensation.parse_rows(bad)
    assert "\n" not in str(e.value)


def test_table_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model_dir(tmp_path / "tiny", family="llama")
    out = tmp_path / "rows.json"
    compensation.main(["--model", str(model), "--protocol", "pydoc-v1", "--tokens", "1024", "--calib-samples", "4",
                       "--threads", "1", "--rows", "gptq-int3-g32,gptq-int3-g32+eora16,gptq-int3-g32+svd16",
                       "--json", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    rows = {r["row"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["base", "gptq-int3-g32", "gptq-int3-g32+eora16", "gptq-int3-g32+svd16"]
    # rank 16 float16 factors on the tiny model's linears: 16 * (in + out) * 16 bits over in * out weights
    side = 16 * 16 * (2 * 2 * (64 + 64) + 2 * 2 * (64 + 32) + 2 * 3 * (64 + 128)) / (2 * (2 * 64 * 64 + 2 * 32 * 64
                                                                                          + 3 * 64 * 128))
    assert rows["gptq-int3-g32+eora16"]["side_bpw"] == pytest.approx(side)
    assert rows["gptq-int3-g32+eora16"]["bpw"] == pytest.approx(rows["gptq-int3-g32"]["bpw"] + side)
    assert rows["gptq-int3-g32+eora16"]["quality"]["kld"] < rows["gptq-int3-g32"]["quality"]["kld"]
    assert rows["gptq-int3-g32+eora16"]["decode_tok_s"] > 0
    assert "| ΔKLD/side bit |" in text and text.count("gptq-int3-g32+eora16 |") == 2  # streamed, then the table
