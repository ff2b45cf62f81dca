"""benchmarks/engines_alternate.py: contenders in turn, order shuffled per round, ratios taken round by
round; and, where llama-cpp-python is installed, the benchmark on a tiny model's stored rows (skips in CI, as
engines.py's does)."""

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


def _fake(names_rates: dict[str, list[float]], calls: list[str], instances: int = 1) -> list[alt.Contender]:
    """Contenders whose instance i of ``name`` records ``name/i`` and returns the next of ``names_rates[name]``."""
    def runner(name: str, i: int):
        rates = iter(names_rates[name])

        def run() -> float:
            calls.append(f"{name}/{i}")
            return next(rates)

        return run

    return [alt.Contender(n, "llamacpp-q4_0", [runner(n, i) for i in range(instances)], reference=(k == 0))
            for k, n in enumerate(names_rates)]  # fmt: skip


def test_rounds_run_every_instance_once_in_a_shuffled_order():
    calls: list[str] = []
    names = [f"c{i}" for i in range(6)]
    rates = alt.alternate(_fake({n: [float(i)] * 8 for i, n in enumerate(names)}, calls), 8)
    assert rates == {n: [[float(i)]] * 8 for i, n in enumerate(names)}  # each run's rate lands in its own cell
    rounds = [calls[k * 6:(k + 1) * 6] for k in range(8)]
    assert rounds[0] == [f"{n}/0" for n in names]  # round 0 as given
    assert all(sorted(r) == sorted(rounds[0]) for r in rounds)  # every round runs each contender once
    assert len({tuple(r) for r in rounds}) == 8  # orders differ round by round...
    assert len({r[0] for r in rounds}) > 2  # ...in who runs first...
    before_c0 = {r[r.index("c0/0") - 1] for r in rounds if r[0] != "c0/0"}
    assert len(before_c0) > 2  # ...and in who runs just before a given contender
    calls.clear()
    rates = alt.alternate(_fake({"ref": [1.0, 2.0], "a": [3.0, 4.0]}, calls, instances=2), 2)
    assert sorted(calls[4:]) == ["a/0", "a/1", "ref/0", "ref/1"]
    assert rates == {"ref": [[1.0, 1.0], [2.0, 2.0]], "a": [[3.0, 3.0], [4.0, 4.0]]}
    assert alt.round_order([], 2) == [] and alt.round_order([1, 2, 3], 5) == alt.round_order([1, 2, 3], 5)


def test_ratios_are_taken_round_by_round_not_from_medians():
    """Each round's slimlm rate is divided by the same round's llama.cpp rate (the machine's speed drifts between
    rounds); the median of those is reported, not the ratio of the two medians (93 / 80 = 1.16x here)."""
    rates = {"llama": [[100.0], [50.0], [200.0], [60.0]], "slimlm": [[120.0], [50.0], [180.0], [66.0]]}
    cs = _fake({"llama": [], "slimlm": []}, [])
    assert alt.per_round_ratios(rates, cs)["slimlm"] == pytest.approx([1.2, 1.0, 0.9, 1.1])
    text = alt.table(rates, cs, threads=2, new_tokens=64, prompt_tokens=512)
    assert "slimlm | 93.0 | 50.0 | 180.0 | 93.0 | 1.05x | 0.90-1.20x" in text
    assert "llama | 80.0 | 50.0 | 200.0 | 80.0 | (reference)" in text
    assert "4 rounds x 1 instances" in text


def test_instances_average_within_a_round_and_show_their_own_medians():
    """Two copies of one model (one fast, one slow, as where their weights landed can make them): a round's rate
    is their mean; the table shows each copy's median."""
    rates = {"llama": [[100.0, 100.0], [100.0, 100.0]], "slimlm": [[150.0, 90.0], [130.0, 70.0]]}
    cs = _fake({"llama": [], "slimlm": []}, [], instances=2)
    assert alt.per_round_ratios(rates, cs)["slimlm"] == pytest.approx([1.2, 1.0])
    text = alt.table(rates, cs, threads=2, new_tokens=64, prompt_tokens=512)
    assert "slimlm | 110.0 | 70.0 | 150.0 | 140.0 / 80.0 | 1.10x | 1.00-1.20x" in text
    assert "2 rounds x 2 instances" in text


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
    alt.main(["--work", work, "--pairs", "gptq-q4_0:llamacpp-q4_0", "--rounds", "2", "--instances", "2",
              "--kv-dtype", "float16"])  # fmt: skip
    out = capsys.readouterr().out
    assert "2 rounds x 2 instances" in out and "1 threads, 8 tokens" in out
    for name in ("llama.cpp llamacpp-q4_0 (its own file) |", "llama.cpp gptq-q4_0.gguf |",
                 "slimlm gptq-q4_0 (slimlm) |", "slimlm gptq-q4_0 (slimlm-kv-float16) |"):  # fmt: skip
        assert name in out
