"""benchmarks/engines_alternate.py: contenders in turn, order rotated, ratios taken round by round; and, where
llama-cpp-python is installed, the benchmark on a tiny model's stored rows (skips in CI, as engines.py's does)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from slimlm.models.tiny import save_tiny_model_dir

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import engines  # noqa: E402
import engines_alternate as alt  # noqa: E402

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed: run scripts/setup-llamacpp.sh")


def _fake(names_rates: dict[str, list[float]], calls: list[str]) -> list[alt.Contender]:
    def runner(name: str):
        rates = iter(names_rates[name])

        def run() -> float:
            calls.append(name)
            return next(rates)

        return run

    return [alt.Contender(n, "llamacpp-q4_0", runner(n), reference=(k == 0)) for k, n in enumerate(names_rates)]


def test_rounds_run_every_contender_once_in_a_rotated_order():
    calls: list[str] = []
    cs = _fake({"ref": [1.0] * 3, "a": [1.0] * 3, "b": [1.0] * 3}, calls)
    rates = alt.alternate(cs, 3)
    assert {n: len(r) for n, r in rates.items()} == {"ref": 3, "a": 3, "b": 3}
    assert calls == ["ref", "a", "b", "a", "b", "ref", "b", "ref", "a"]
    assert alt.rotated([], 2) == []


def test_ratios_are_taken_round_by_round_not_from_medians():
    """Each round's slimlm rate is divided by the same round's llama.cpp rate (the machine's speed drifts between
    rounds); the median of those is reported, not the ratio of the two medians (93 / 80 = 1.16x here)."""
    rates = {"llama": [100.0, 50.0, 200.0, 60.0], "slimlm": [120.0, 50.0, 180.0, 66.0]}
    cs = _fake(rates, [])
    assert alt.per_round_ratios(rates, cs)["slimlm"] == pytest.approx([1.2, 1.0, 0.9, 1.1])
    text = alt.table(rates, cs, threads=2, new_tokens=64, prompt_tokens=512)
    assert "slimlm | 93.0 | 50.0 | 180.0 | 1.05x | 0.90-1.20x" in text
    assert "llama | 80.0 | 50.0 | 200.0 | (reference)" in text
    assert "4 rounds" in text


def test_missing_rows_are_refused_with_the_command_that_makes_them(tmp_path, monkeypatch):
    (tmp_path / "rows.json").write_text(json.dumps({"settings": {}, "rows": {"llamacpp-q4_0": {}}}))
    args = alt.parse_args(["--work", str(tmp_path), "--pairs", "gptq-q4_0:llamacpp-q4_0"])
    with pytest.raises(SystemExit, match=r"no row gptq-q4_0: run benchmarks/engines.py --rows gptq-q4_0,llamacpp"):
        alt.contenders(args, json.loads((tmp_path / "rows.json").read_text()), None)
    with pytest.raises(SystemExit, match="run benchmarks/engines.py --work"):
        alt.main(["--work", str(tmp_path / "nothing")])


@needs_llama_cpp
def test_alternate_on_a_tiny_models_stored_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model_dir(tmp_path / "tiny", family="llama")
    work = str(tmp_path / "work")
    engines.main(["--model", str(model), "--protocol", "pydoc-v1", "--tokens", "1024", "--calib-samples", "2",
                  "--threads", "1", "--new-tokens", "8", "--runs", "1", "--work", work,
                  "--rows", "gptq-q4_0,llamacpp-q4_0"])  # fmt: skip
    capsys.readouterr()
    alt.main(["--work", work, "--pairs", "gptq-q4_0:llamacpp-q4_0", "--rounds", "2", "--kv-dtype", "float16"])
    out = capsys.readouterr().out
    assert "2 rounds" in out and "1 threads, 8 tokens" in out
    for name in ("llama.cpp llamacpp-q4_0 (its own file) |", "llama.cpp gptq-q4_0.gguf |",
                 "slimlm gptq-q4_0 (slimlm) |", "slimlm gptq-q4_0 (slimlm-kv-float16) |"):  # fmt: skip
        assert name in out
