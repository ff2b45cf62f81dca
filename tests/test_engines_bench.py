"""benchmarks/engines.py: another engine's logits scored exactly as slimlm scores its own, GGUF bit counts,
the stored table; and, where llama-cpp-python is installed (scripts/setup-llamacpp.sh), the benchmark
itself on a tiny model. CI has no llama.cpp: only the last tests skip there, the pure functions still run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from slimlm.eval.quality import score_windows
from slimlm.export import export
from slimlm.io import dequantized_copy, load_compressed
from slimlm.models.tiny import save_tiny_model_dir, tiny_model
from tests.export.gguf_util import checkpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import engines  # noqa: E402

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (it is built "
                                     "from source, not in CI): run scripts/setup-llamacpp.sh")  # fmt: skip


def _windows(n: int = 3, T: int = 24) -> torch.Tensor:
    return torch.randint(3, 512, (n, T), generator=torch.Generator().manual_seed(1))


def test_window_scores_equal_slimlms_own_scoring():
    """Logits handed over as numpy, as llama.cpp gives them, score to slimlm's own numbers for that model."""
    windows = _windows()
    base, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    with torch.no_grad():  # sharpen the other model so KL and agreement are far from their trivial values
        other.lm_head.weight.mul_(8)
    _, stats = score_windows(base, windows, collect_top_k=8)  # k << V: the tail bucket counts
    want, _ = score_windows(other, windows, base=stats)
    per_window = []
    for w in range(windows.shape[0]):
        with torch.no_grad():
            logits = other(input_ids=windows[w][None]).logits[0].numpy()  # (T, V)
        per_window.append(engines.window_scores(logits, windows[w], stats.topk_idx[w], stats.topk_logp[w]))
    got = engines.summarize(per_window)
    assert want.kld > 0.05 and 0 < want.top1_agreement < 1
    assert got["ppl"] == pytest.approx(want.perplexity, rel=1e-12)
    assert got["kld"] == pytest.approx(want.kld, rel=1e-12)
    assert got["top1"] == pytest.approx(want.top1_agreement, rel=1e-12)


@pytest.mark.parametrize("scheme, qtype, bits", [("int4-g32-sym", "Q4_0", 4.5), ("int4-g32", "Q4_1", 5.0),
                                                 ("int8-g32-sym", "Q8_0", 8.5), (None, "F16", 16.0)])  # fmt: skip
def test_gguf_summary_counts_block_matrices(tmp_path, scheme, qtype, bits):
    path = export(checkpoint(tmp_path, scheme), tmp_path / "m.gguf", format="gguf", float_type="f16")
    s = engines.gguf_summary(path)
    n = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)
    assert s["linear_types"] == {qtype: n}
    assert s["linear_bpw"] == bits
    assert (s["embd"], s["output"]) == ("F16", "tied")
    assert s["size_mb"] == path.stat().st_size / 1e6


def test_weight_error_of_a_gguf_against_the_f16_export(tmp_path):
    """Relative squared error of the block matrices, from the files, equals the one of slimlm's own weights."""
    model = tiny_model("llama")
    f16 = export(checkpoint(tmp_path, None, model=model, name="f"), tmp_path / "f16.gguf", format="gguf")
    q = checkpoint(tmp_path, "int4-g32-sym", model=tiny_model("llama"), name="q")
    q4 = export(q, tmp_path / "q4.gguf", format="gguf")
    quantized = dict(dequantized_copy(load_compressed(q)[0]).model.layers.named_parameters())
    num = den = 0.0
    for name, W in model.model.layers.named_parameters():
        if W.ndim == 2:
            Q = quantized[name].detach()
            W16 = W.detach().half().double()  # the F16 export's values
            num, den = num + ((Q.double() - W16) ** 2).sum().item(), den + (W16**2).sum().item()
    assert engines.weight_error(f16, f16) == 0.0
    assert engines.weight_error(q4, f16) == pytest.approx(num / den, rel=1e-6)
    assert 1e-3 < num / den < 1e-1


def _row(kld: float, bpw: float, types: dict) -> dict:
    q = dict(ppl=30.0, nll=3.4, kld=kld, top1=0.8)
    return dict(linear_types=types, embd="F16", size_mb=100.0, linear_bpw=bpw, weight_error=1e-3, llamacpp=q,
                slimlm=q, ppl_diff=0.001, llamacpp_speed=dict(decode_tok_s=120.0), slimlm_speed=None,
                minutes=1.0)  # fmt: skip


def test_table_and_headline_verdicts():
    store = dict(settings=dict(model="m", threads=2, new_tokens=64), protocol="wiki-v1", tokens=1024, windows=2,
                 prompt_tokens=512, rows={"gptq-q4_0": _row(0.05, 4.5, {"Q4_0": 1}),
                                          "llamacpp-q4_0": _row(0.08, 4.5, {"Q4_0": 1}),
                                          "gptq-q4_1": _row(0.09, 5.0, {"Q4_1": 1}),
                                          "llamacpp-q4_1": _row(0.03, 5.0, {"Q4_1": 1})})  # fmt: skip
    store["rows"]["llamacpp-q4_1"]["weight_error"] = 2e-7  # the base already on llama.cpp's Q4_1 grid
    text = engines.table(store)
    q4_0 = next(line for line in text.splitlines() if line.startswith("Q4_0:"))
    q4_1 = next(line for line in text.splitlines() if line.startswith("Q4_1:"))
    assert "gptq-q4_0 KLD 0.0500 vs llama.cpp's own 0.0800 (lower, -38%)" in q4_0
    assert "gptq-q4_1 KLD 0.0900 vs llama.cpp's own 0.0300 (NOT lower, +200%)" in q4_1
    assert "awq" not in text  # no row, no headline line
    caveats = [line for line in text.splitlines() if "not a comparison of quantizers" in line]
    assert len(caveats) == 1 and "llamacpp-q4_1 moved the base's block weights by 2e-07" in caveats[0]
    assert "decode:" not in text  # no slimlm speed stored, no speed line


def test_headline_decode_ratio_eager_and_compiled():
    store = dict(settings=dict(model="m", threads=2, new_tokens=64), protocol="wiki-v1", tokens=1024, windows=2,
                 prompt_tokens=512, rows={"gptq-q4_0-head8-shared": _row(0.05, 4.5, {"Q4_0": 1}),
                                          "llamacpp-q4_0": _row(0.08, 4.5, {"Q4_0": 1})})  # fmt: skip
    store["rows"]["gptq-q4_0-head8-shared"]["slimlm_speed"] = dict(decode_tok_s=60.0, decode_compiled_tok_s=132.0)
    text = engines.table(store)
    assert "60.0 / 132.0 compiled" in text  # the row's decode cell
    line = next(line for line in text.splitlines() if line.strip().startswith("decode:"))
    assert line.strip().startswith("decode: slimlm 60.0 tok/s (0.50x), compiled 132.0 (1.10x) vs llama.cpp 120.0 (")
    assert "engines_alternate.py" in line


def test_stored_rows_of_other_settings_are_refused(tmp_path):
    args = engines.parse_args(["--work", str(tmp_path), "--tokens", "1024"])
    engines.save(args, {"settings": {k: getattr(args, k) for k in engines.SETTINGS}, "rows": {}})
    assert engines.load_store(args)["rows"] == {}
    with pytest.raises(SystemExit, match=r"other settings .*'tokens': \(1024, 2048\)"):
        engines.load_store(engines.parse_args(["--work", str(tmp_path), "--tokens", "2048"]))
    table_only = engines.parse_args(["--work", str(tmp_path), "--tokens", "2048", "--table"])
    assert engines.load_store(table_only)["rows"] == {}  # printing what is stored needs no matching settings


@needs_llama_cpp
def test_benchmark_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    """Three rows through llama.cpp; a second run measures nothing and prints the same table."""
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model_dir(tmp_path / "tiny", family="llama")
    argv = ["--model", str(model), "--protocol", "pydoc-v1", "--tokens", "1024", "--calib-samples", "2",
            "--threads", "1", "--new-tokens", "8", "--runs", "1", "--work", str(tmp_path / "work"),
            "--rows", "f16,gptq-q4_0,llamacpp-q4_0"]  # fmt: skip
    engines.main(argv)
    first = capsys.readouterr().out
    store = json.loads((tmp_path / "work" / "rows.json").read_text())
    rows = store["rows"]
    assert store["windows"] == 2  # each window scored from an empty cache
    assert list(rows) == ["f16", "gptq-q4_0", "llamacpp-q4_0"]
    for name, r in rows.items():
        # llama.cpp's perplexity of a file within 1% of slimlm's on the same weights and windows
        assert abs(r["ppl_diff"]) < 0.01, name
        assert r["llamacpp_speed"]["decode_tok_s"] > 0
    assert rows["f16"]["llamacpp"]["kld"] < 1e-4  # F16 rounding of the float model only
    assert rows["gptq-q4_0"]["linear_types"] == {"Q4_0": rows["f16"]["linear_types"]["F16"]}
    assert rows["llamacpp-q4_0"]["linear_bpw"] == 4.5 and rows["llamacpp-q4_0"]["slimlm_speed"] is None
    assert "Q4_0: slimlm gptq-q4_0 KLD" in first
    engines.main(argv)
    assert capsys.readouterr().out == first
