"""The Result JSON records which kernels a compressed model ran; old JSONs without the field still load."""

import json

import pytest

from slimlm.api import apply
from slimlm.eval import Protocol, evaluate, format_results, load_result
from slimlm.kernels import reset_checks
from slimlm.kernels.int4 import Int4Grouped
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.quant import RTN

SMALL = Protocol(name="pydoc-test", text="pydoc-v1", window=64, eval_tokens=128, prompt_tokens=16,
                 new_tokens=5, speed_runs=2, kl_top_k=32)


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    reset_checks()
    yield
    reset_checks()


def _raise(self, x, tensors, scheme, shape):
    raise RuntimeError("op missing in this build")


def test_eval_json_names_the_kernels_and_a_fallback(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    apply(model, RTN(scheme="int4-g32"))
    monkeypatch.setattr(Int4Grouped, "matmul", _raise)
    r = evaluate(model, tok, source="int4", protocol=SMALL, speed=False)
    assert r.kernels["counts"] == {"reference": 14}
    why = r.kernels["fallbacks"]["model.layers.1.mlp.down_proj"]
    assert why == "int4_grouped_cpu failed (op missing in this build) on cpu/float32"
    back = load_result(r.save(tmp_path / "r.json"))
    assert back.kernels == r.kernels
    text = format_results([back])
    assert "kernels of int4: reference x14" in text and "fell back: model.layers.1.mlp.down_proj" in text


def test_a_plain_model_writes_no_kernels_field_and_old_jsons_load(tmp_path):
    r = evaluate(tiny_model("llama"), tiny_tokenizer(), source="tiny", protocol=SMALL, speed=False)
    d = json.loads(r.save(tmp_path / "r.json").read_text())
    assert r.kernels is None and "kernels" not in d  # the JSON of an uncompressed model is as before
    assert "kernels of" not in format_results([r])
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert load_result(tmp_path / "old.json").kernels is None
