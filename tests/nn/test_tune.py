"""slimlm.kernels.tune: kernel choices by measurement, with fake timings; the cache; forces; exactness."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.generation.decoder import make_decoder
from slimlm.generation.loop import GenerationConfig, generate
from slimlm.kernels import dense, format_kernels, kernel_report, kernel_summary, require_fast, tune, tune_cache
from slimlm.kernels.int4 import Int4Grouped
from slimlm.models import tiny_model
from slimlm.quant import RTN
from tests.generation.conftest import varied_tiny
from tests.generation.test_loop import PROMPTS, _hf_greedy

FP = {"cpu": "Test CPU 9000", "cores": "2", "torch": "9.9", "slimlm": "0.0"}
KEY = tune.Key("dense", 200, 96, torch.float32, "1", 2, torch.device("cpu"))
needs_onednn = pytest.mark.skipif(not dense.onednn_available(), reason="this torch build has no oneDNN linear")


class FakeTimer:
    """Returns fixed seconds per call for each candidate it is handed, and records what it was handed."""

    def __init__(self, **times: float):
        self.times, self.calls = times, []

    def __call__(self, runs):
        self.calls.append(tuple(runs))
        return {name: self.times[name] for name in runs}


def _runs(outputs: dict):
    return lambda: {name: (lambda y=y: y) for name, y in outputs.items()}


SAME = {"f_linear": torch.ones(1, 4), "onednn": torch.ones(1, 4)}


def _agree(y, ref):
    return bool(torch.equal(y, ref))


def _tuner(tmp_path, text="auto", timer=None, fingerprint=FP):
    t = tune.Tuner(tune.KernelSettings.parse(text), cache_file=tmp_path / tune_cache.fingerprint_id(fingerprint),
                   timer=timer, fingerprint=fingerprint)
    tune.reset(t)
    return t


@pytest.fixture(autouse=True)
def fresh_tuner():
    tune.reset()
    yield
    tune.reset()


def _choose(t, runs=SAME, fixed="f_linear", key=KEY):
    return t.choose(key, fixed=fixed, candidates=_runs(runs), agree=_agree)


# -- the choice ------------------------------------------------------------------------------------
@pytest.mark.parametrize("times, winner", [({"f_linear": 2.0, "onednn": 1.0}, "onednn"),
                                           ({"f_linear": 1.0, "onednn": 2.0}, "f_linear"),
                                           ({"f_linear": 1.0, "onednn": 0.97}, "f_linear"),  # within 5%: a tie
                                           ({"f_linear": 1.0, "onednn": 0.9}, "onednn")])
def test_the_fastest_wins_and_a_tie_goes_to_the_simpler_path(tmp_path, times, winner):
    t = _tuner(tmp_path, timer=FakeTimer(**times))
    assert _choose(t) == winner
    d = t.decision(KEY)
    assert d.source == "measured" and d.times_us == {k: v * 1e6 for k, v in times.items()}
    assert ("over f_linear" in d.why) == (winner == "onednn")


def test_a_choice_is_measured_once_written_and_read_back_by_the_next_process(tmp_path):
    timer = FakeTimer(f_linear=2.0, onednn=1.0)
    t = _tuner(tmp_path, timer=timer)
    assert _choose(t) == "onednn" and _choose(t) == "onednn"
    assert len(timer.calls) == 1 and t.measurements == 1
    stored = json.loads(t.cache_file.read_text())
    assert stored["fingerprint"] == FP
    assert stored["choices"][str(KEY)]["path"] == "onednn"

    again = FakeTimer(f_linear=1.0, onednn=2.0)  # would pick f_linear, if it were asked
    t2 = _tuner(tmp_path, timer=again)
    assert _choose(t2) == "onednn" and again.calls == [] and t2.measurements == 0
    assert t2.decision(KEY).source == "cached" and t2.decision(KEY).why.endswith(", cached")


def test_measure_mode_ignores_the_cache_and_rewrites_it(tmp_path):
    _choose(_tuner(tmp_path, timer=FakeTimer(f_linear=2.0, onednn=1.0)))
    timer = FakeTimer(f_linear=1.0, onednn=2.0)
    assert _choose(_tuner(tmp_path, "measure", timer=timer)) == "f_linear" and len(timer.calls) == 1
    assert _choose(_tuner(tmp_path, timer=FakeTimer())) == "f_linear"  # the rewritten cache answers


@pytest.mark.parametrize("content", ["{not json", '{"choices": 3}', '{"fingerprint": {}, "choices": {}}',
                                     json.dumps({"fingerprint": FP, "choices": {"k": {"path": 1}}})])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, caplog, content):
    t = _tuner(tmp_path, timer=FakeTimer(f_linear=2.0, onednn=1.0))
    t.cache_file.write_text(content)
    with caplog.at_level(logging.WARNING, logger="slimlm.kernels"):
        assert _choose(t) == "onednn"
    assert t.measurements == 1
    assert sum("kernel choice cache" in r.message and "ignored" in r.message for r in caplog.records) == 1
    assert json.loads(t.cache_file.read_text())["choices"][str(KEY)]["path"] == "onednn"


def test_another_machine_fingerprint_misses(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path))
    other = {**FP, "torch": "10.0"}
    assert tune_cache.cache_file_for(other) != tune_cache.cache_file_for(FP)
    first = tune.Tuner(tune.KernelSettings(), timer=FakeTimer(f_linear=2.0, onednn=1.0), fingerprint=FP)
    _choose(first)
    assert first.cache_file.parent == tmp_path / "kernels"
    timer = FakeTimer(f_linear=1.0, onednn=2.0)
    second = tune.Tuner(tune.KernelSettings(), timer=timer, fingerprint=other)
    assert _choose(second) == "f_linear" and len(timer.calls) == 1


def test_a_force_overrides_measurement_and_cache(tmp_path):
    _choose(_tuner(tmp_path, timer=FakeTimer(f_linear=2.0, onednn=1.0)))  # cached: onednn
    timer = FakeTimer()
    t = _tuner(tmp_path, "dense:mkl", timer=timer)
    assert _choose(t) == "f_linear" and timer.calls == []
    assert t.decision(KEY).source == "forced" and "dense:f_linear" in t.decision(KEY).why
    t = _tuner(tmp_path, "fixed,dense:onednn", timer=timer)
    assert not t.uses_rule("dense") and t.uses_rule("int4")
    assert _choose(t) == "onednn" and timer.calls == []


def test_a_candidate_that_disagrees_cannot_win(tmp_path, caplog):
    timer = FakeTimer(f_linear=2.0, onednn=1.0)
    t = _tuner(tmp_path, timer=timer)
    wrong = {"f_linear": torch.ones(1, 4), "onednn": torch.zeros(1, 4)}
    with caplog.at_level(logging.WARNING, logger="slimlm.kernels"):
        assert _choose(t, wrong) == "f_linear"
    assert timer.calls == [("f_linear",)]  # never timed
    assert "disagrees" in caplog.text
    forced = _tuner(tmp_path, "dense:onednn", timer=timer)
    assert _choose(forced, wrong, key=KEY._replace(rows="2-4")) == "f_linear"  # a force does not bypass it


def test_fixed_mode_and_prefill_rows_keep_the_rule_unmeasured(tmp_path):
    timer = FakeTimer(f_linear=2.0, onednn=1.0)
    t = _tuner(tmp_path, "fixed", timer=timer)
    assert t.uses_rule("dense") and _choose(t, fixed="onednn") == "onednn"
    t = _tuner(tmp_path, timer=timer)
    big = KEY._replace(rows=tune.rows_bucket(17))
    assert _choose(t, key=big) == "f_linear" and t.decision(big).source == "fixed" and timer.calls == []


def test_settings_refusals_name_the_valid_values():
    assert tune.KernelSettings.parse("") == tune.KernelSettings("auto")
    assert tune.KernelSettings.parse("measure, int4:fast").forced == (("int4", "fast"),)
    with pytest.raises(SlimlmError, match="unknown mode 'fastest'; valid: auto, measure, fixed"):
        tune.KernelSettings.parse("fastest")
    with pytest.raises(SlimlmError, match="dense has no path 'blas'; valid: f_linear, onednn"):
        tune.KernelSettings.parse("dense:blas")
    with pytest.raises(SlimlmError, match="unknown op 'int3'"):
        tune.KernelSettings.parse("int3:fast")
    with pytest.raises(SlimlmError, match="names 2 modes"):
        tune.KernelSettings.parse("auto,fixed")


def test_rows_buckets():
    assert [tune.rows_bucket(m) for m in (1, 2, 4, 5, 16, 17, 512)] == ["1", "2-4", "2-4", "5-16", "5-16", "17+",
                                                                         "17+"]


def test_time_candidates_interleaves_and_takes_the_median():
    now, order = [0.0], []

    def fn(name, cost):
        return lambda: (order.append(name), now.__setitem__(0, now[0] + cost))

    times = tune.time_candidates({"a": fn("a", 1e-3), "b": fn("b", 4e-3)}, clock=lambda: now[0])
    assert times == pytest.approx({"a": 1e-3, "b": 4e-3})
    timed = order[4:]  # after two warm-up calls each
    assert timed[:3] == ["a", "a", "b"] and timed[-1] == "b"  # a sample of a (2 calls), then of b (1 call), ...


def test_time_candidates_takes_the_median_past_a_spike():
    now, n = [0.0], [0]

    def a():  # 1 ms a call, but its 5th call (inside the second sample) stalls for a second
        n[0] += 1
        now[0] += 1.0 if n[0] == 5 else 1e-3

    def b():
        now[0] += 1.5e-3

    assert tune.time_candidates({"a": a, "b": b}, clock=lambda: now[0]) == pytest.approx({"a": 1e-3, "b": 1.5e-3})


def test_time_candidates_stops_sampling_a_path_far_slower_than_the_fastest():
    now, calls = [0.0], {"a": 0, "slow": 0}

    def fn(name, cost):
        return lambda: (calls.__setitem__(name, calls[name] + 1), now.__setitem__(0, now[0] + cost))

    times = tune.time_candidates({"a": fn("a", 1e-3), "slow": fn("slow", 5e-3)}, clock=lambda: now[0])
    assert times == pytest.approx({"a": 1e-3, "slow": 5e-3})
    assert calls["slow"] == 2 and calls["a"] == 2 + 2 * tune.REPEATS  # warm-up and one timed call only


# -- the real paths --------------------------------------------------------------------------------
@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("settings", ["auto", "dense:onednn", "dense:mkl"])
def test_the_chosen_dense_path_equals_f_linear(tmp_path, rows, settings):
    """Real timings on a tiny shape: whichever path wins (or is forced), the output is F.linear's."""
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(rows, 96, generator=gen), torch.randn(200, 96, generator=gen), torch.randn(200, generator=gen)
    _tuner(tmp_path, settings)
    with torch.no_grad():
        torch.testing.assert_close(dense.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    (d,) = tune.decisions()
    assert d.key.rows == tune.rows_bucket(rows) and d.source in ("measured", "forced", "fixed")


@needs_onednn
def test_dense_linear_takes_the_measured_path(tmp_path, monkeypatch):
    seen = []
    real = dense._onednn
    monkeypatch.setattr(dense, "_onednn", lambda *a: (seen.append(1), real(*a))[1])
    x, w = torch.randn(1, 96), torch.randn(200, 96)
    for times, calls in (({"f_linear": 2.0, "onednn": 1.0}, True), ({"f_linear": 1.0, "onednn": 2.0}, False)):
        _tuner(tmp_path / str(calls), timer=FakeTimer(**times))
        with torch.no_grad():
            dense.linear(x, w)
            seen.clear()
            dense.linear(x, w)
        assert bool(seen) == calls


def _int4_model():
    model = tiny_model("llama")
    apply(model, RTN(scheme="int4-g32"))  # 14 linears on int4_grouped_cpu
    return model


def test_a_quantized_layer_measured_slower_than_the_reference_runs_the_reference(tmp_path, monkeypatch):
    model = _int4_model()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        want = model(ids).logits  # the fixed rule (the suite's) passes the first-use check here
    _tuner(tmp_path, timer=FakeTimer(reference=1.0, fast=2.0))
    fast_calls = []
    real = Int4Grouped.matmul
    monkeypatch.setattr(Int4Grouped, "matmul", lambda *a: (fast_calls.append(1), real(*a))[1])
    with torch.no_grad():
        model(ids)  # decides (times both paths: the fast one runs here)
        fast_calls.clear()
        got = model(ids).logits
    assert fast_calls == []  # every layer answered from the reference path
    torch.testing.assert_close(got, want, rtol=0, atol=3e-2)
    report = kernel_report(model)
    assert report.counts == {"reference": 14}
    assert report.layers[0].reason.startswith("int4_grouped_cpu set aside for the reference path: measured")
    assert any(k.startswith("int4 64x64 float32 rows=1") for k in report.to_dict()["choices"])
    with pytest.raises(SlimlmError, match="not on a fast kernel"):
        require_fast(model)


@pytest.mark.parametrize("text, runs, source", [("auto", "int4_grouped_cpu", "measured"),
                                                ("int4:reference", "reference", "forced"),
                                                ("fixed", "int4_grouped_cpu", None)])
def test_the_report_says_why_each_layer_runs_its_path(tmp_path, text, runs, source):
    model = _int4_model()
    _tuner(tmp_path, text, timer=FakeTimer(reference=2.0, fast=1.0))
    report = kernel_report(model)
    assert report.counts == {runs: 14}
    why = report.layers[0].why
    if source is None:
        assert why.startswith("fixed rule") and "choices" not in report.to_dict()
    else:
        assert why.startswith(source) and "choices" in report.to_dict()
        assert "chose: int4 " in report.format()


@needs_onednn
def test_the_loop_with_measured_choices_equals_hf_generate(tmp_path):
    """Real timings, tiny llama: whichever paths win, greedy tokens are HF generate's."""
    model = varied_tiny("llama")
    _tuner(tmp_path, "measure")
    ours = generate(make_decoder(model), PROMPTS[:2], GenerationConfig(max_new_tokens=12))
    assert any(d.key.op == "dense" and d.source == "measured" for d in tune.decisions())
    assert ours == [_hf_greedy(model, p, 12) for p in PROMPTS[:2]]


@needs_onednn
def test_a_float_model_with_measured_choices_reports_them(tmp_path):
    """The eval JSON's ``kernels`` of an uncompressed model: absent under the fixed rule, the choices otherwise."""
    model = tiny_model("llama")
    assert kernel_summary(model) is None
    _tuner(tmp_path, timer=FakeTimer(f_linear=2.0, onednn=1.0))
    with torch.no_grad():
        dense.linear(torch.randn(1, 96), torch.randn(200, 96))
    summary = kernel_summary(model)
    assert summary == {"counts": {}, "fallbacks": {},
                       "choices": {str(KEY._replace(threads=torch.get_num_threads())):
                                   "onednn (measured 2.00x over f_linear at 1 row)"}}  # fmt: skip
    assert "  chose: dense 200x96 float32 rows=1" in format_kernels(summary)
