"""LowRankLinear: the forward, exactness at full rank, checkpoints, size accounting, info and exports."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.export import export
from slimlm.io import load_compressed, save_compressed
from slimlm.lowrank import SVD
from slimlm.models.info import format_info, model_info
from slimlm.models.size import bytes_read_per_token, measure_size
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import LowRankLinear, RuntimeModule
from slimlm.solvers.lowrank import lowrank_factors

IDS = torch.arange(3, 35).reshape(1, 32)


def _factors(out_f=24, in_f=40, rank=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g),
            torch.randn(out_f, generator=g))  # fmt: skip


def test_forward_is_b_times_a_plus_bias(device):
    A, B, b = (t.to(device) for t in _factors())
    m = LowRankLinear.from_factors(A, B, b)
    x = torch.randn(3, 7, 40, device=device)
    torch.testing.assert_close(m(x), F.linear(x, B @ A, b), rtol=1e-5, atol=1e-5)
    assert (m.rank, m.in_features, m.out_features) == (5, 40, 24)
    torch.testing.assert_close(m.dequantized_weight(), B @ A)
    no_bias = LowRankLinear.from_factors(A, B)
    torch.testing.assert_close(no_bias(x), F.linear(x, B @ A), rtol=1e-5, atol=1e-5)


def test_full_rank_reproduces_the_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24)
    A, B = lowrank_factors(lin.weight.detach(), 24)
    m = LowRankLinear.from_factors(A, B, lin.bias)
    x = torch.randn(16, 40)
    torch.testing.assert_close(m(x), lin(x), rtol=1e-5, atol=1e-5)


def test_factors_keep_the_dtype_and_a_dtype_cast_reaches_them():
    A, B, b = _factors()
    m = LowRankLinear.from_factors(A, B, b, dtype=torch.bfloat16)
    assert m.A.dtype == m.B.dtype == m.bias.dtype == torch.bfloat16
    m.float()
    assert m.A.dtype == torch.float32


def test_bad_factors_and_shells_are_refused():
    A, B, b = _factors()
    with pytest.raises(SlimlmError, match="A \\(rank, in\\) and B \\(out, rank\\)"):
        LowRankLinear.from_factors(A, B.t())
    with pytest.raises(SlimlmError, match="bias must have shape"):
        LowRankLinear.from_factors(A, B, b[:3])
    with pytest.raises(SlimlmError, match="rank must be a positive int"):
        LowRankLinear.empty(40, 24, bias=False, rank=0)
    with pytest.raises(SlimlmError, match="rank 25 exceeds min"):
        LowRankLinear.empty(40, 24, bias=False, rank=25)
    with pytest.raises(SlimlmError, match="cannot be built"):  # a manifest entry without its rank
        LowRankLinear.from_manifest({"type": "LowRankLinear", "in_features": 40, "out_features": 24,
                                     "bias": False}, dtype=torch.float32)  # fmt: skip


def test_manifest_entry_records_the_rank_and_rebuilds_the_shell():
    m = LowRankLinear.from_factors(*_factors())
    entry = m.manifest_entry()
    assert entry == {"type": "LowRankLinear", "in_features": 40, "out_features": 24, "bias": True, "rank": 5}
    shell = LowRankLinear.from_manifest(entry, dtype=torch.float16)
    assert isinstance(shell, RuntimeModule) and shell.A.shape == (5, 40) and shell.B.dtype == torch.float16


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])  # tied, biased q/k/v, Conv1D
def test_checkpoint_round_trip_is_bit_identical(tmp_path, family):
    model = tiny_model(family)
    apply(model, SVD(params=0.3))
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt", base_model="tiny")
    manifest = json.loads((out / "slimlm_manifest.json").read_text())
    ranks = {e["rank"] for e in manifest["modules"].values()}
    assert ranks and all(isinstance(r, int) and r > 0 for r in ranks)
    loaded, _ = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def _removed(model) -> int:
    """Weights the factorization removed from the decoder linears."""
    return sum(m.in_features * m.out_features - m.rank * (m.in_features + m.out_features)
               for m in model.modules() if isinstance(m, LowRankLinear))  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases, which are not linear weights
def test_size_counts_the_factors(family):
    base, model = tiny_model(family), tiny_model(family)
    apply(model, SVD(params=0.3))
    removed = _removed(model)
    assert removed > 0
    b, s = measure_size(base), measure_size(model)
    assert s.params == b.params - removed
    assert s.model_bytes == b.model_bytes - 4 * removed
    assert s.linear_weights == b.linear_weights - removed
    assert s.linear_bytes == b.linear_bytes - 4 * removed and s.bits_per_weight == 32.0
    assert bytes_read_per_token(model) == bytes_read_per_token(base) - 4 * removed
    half = measure_size(model.to(torch.bfloat16))
    assert half.bits_per_weight == 16.0 and half.linear_bytes * 2 == s.linear_bytes


def test_info_lists_rank_and_counts_parameters():
    model = tiny_model("llama")
    apply(model, SVD(rank=3))
    info = model_info(model)
    assert info.n_params == measure_size(model).params
    q = next(li for li in info.linears if li.name == "model.layers.0.self_attn.q_proj")
    assert (q.in_features, q.out_features, q.dtype) == (64, 64, "float32 rank 3")
    assert "float32 rank 3" in format_info(info)


def test_hf_export_multiplies_out_and_says_so(tmp_path, caplog):
    model = tiny_model("llama")
    apply(model, SVD(params=0.3))
    ckpt = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt", base_model="tiny")
    with caplog.at_level(logging.WARNING, logger="slimlm.io"):
        out = export(ckpt, tmp_path / "hf", format="hf")
    assert "saving is lost" in caplog.text
    stock = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(stock(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt,out", [("gguf", "m.gguf"), ("compressed-tensors", "ct")])
def test_gguf_and_compressed_tensors_refuse_in_one_line(tmp_path, fmt, out):
    model = tiny_model("llama")
    apply(model, SVD(params=0.3))
    ckpt = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt", base_model="tiny")
    with pytest.raises(SlimlmError, match="low-rank factorization") as e:
        export(ckpt, tmp_path / out, format=fmt)
    assert "\n" not in str(e.value) and "--format hf" in str(e.value)
    assert not (tmp_path / out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
