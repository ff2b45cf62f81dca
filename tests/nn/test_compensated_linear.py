"""CompensatedLinear: the forward is base + B A, checkpoints hold it as one entry carrying its base, and
the size accounting counts the side path once, byte for byte."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, PerGroup
from slimlm.kernels import REFERENCE
from slimlm.io import MANIFEST, WEIGHTS, compressed_modules, export_hf, load_compressed, save_compressed
from slimlm.models.checkpoint import _shell
from slimlm.models.info import list_linears
from slimlm.models.size import bytes_read_per_token, measure_size, measure_size_light
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import CompensatedLinear, QuantLinear, SparseLinear
from slimlm.targets import candidate_linears, replace_module

IDS = torch.arange(3, 35).reshape(1, 32)
INT3 = IntScheme(3, granularity=PerGroup(32))


def _factors(out_f, in_f, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn(rank, in_f, generator=g), 0.05 * torch.randn(out_f, rank, generator=g)


def _compensated(family="llama", rank=4, scheme=INT3):
    """Every block linear quantized in ``scheme`` with a random side path of ``rank``."""
    model = tiny_model(family)
    for i, (name, lin) in enumerate(candidate_linears(model).items()):
        q = QuantLinear.from_linear(lin, scheme)
        A, B = _factors(q.out_features, q.in_features, rank, seed=i)
        replace_module(model, name, CompensatedLinear(q, A, B))
    return model


def test_forward_is_base_plus_side_path_and_the_merged_weight_computes_the_same():
    lin = nn.Linear(64, 40, bias=True)  # 40 rows: not the int4 kernel (bf16) but the float32 reference path
    q = QuantLinear.from_linear(lin, INT3)
    A, B = _factors(40, 64, 8, seed=0)
    c = CompensatedLinear(q, A, B)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(c(x), q(x) + x @ A.t() @ B.t())
        merged = nn.functional.linear(x, c.dequantized_weight(), c.bias)
        torch.testing.assert_close(c(x), merged, rtol=1e-5, atol=1e-5)
    assert c.bias is q.bias and c.rank == 8


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])  # qwen2: biased q/k/v; gpt2: Conv1D
def test_checkpoint_round_trip_is_bit_identical_with_one_entry_per_layer(tmp_path, family):
    model = _compensated(family)
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")
    modules = json.loads((out / MANIFEST).read_text())["modules"]
    assert set(modules) == set(candidate_linears(model))  # no entry of its own for a nested base
    entry = next(iter(modules.values()))
    assert entry["type"] == "CompensatedLinear" and entry["rank"] == 4 and entry["base"]["type"] == "QuantLinear"
    assert entry["base"]["scheme"]["bits"] == 3
    loaded, _ = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert all(isinstance(m, CompensatedLinear) for m in compressed_modules(loaded).values())


def test_a_sparse_base_round_trips_too(tmp_path):
    model = tiny_model("llama")
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    s = SparseLinear.from_linear(lin, torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    replace_module(model, name, CompensatedLinear(s, *_factors(64, 128, 16, seed=3)))
    loaded, _ = load_compressed(save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_size_counts_the_side_path_once_byte_for_byte(tmp_path):
    rank = 4
    plain = tiny_model("llama")
    for name, lin in candidate_linears(plain).items():
        replace_module(plain, name, QuantLinear.from_linear(lin, INT3))
    comp = _compensated(rank=rank)
    out = save_compressed(comp, tiny_tokenizer(), tmp_path / "ckpt")
    stored = load_file(str(out / WEIGHTS))
    # by hand: float32 factors of r * (in + out) values per layer, and the base's stored tensors
    side_params = sum(rank * (m.in_features + m.out_features) for m in candidate_linears(comp).values())
    side_bytes = 4 * side_params
    base_bytes = sum(t.numel() * t.element_size() for k, t in stored.items() if ".base." in k and "bias" not in k)
    n_weights = sum(m.in_features * m.out_features for m in candidate_linears(comp).values())
    size = measure_size(comp)
    assert size.linear_bytes == base_bytes + side_bytes
    assert size.bits_per_weight == 8 * (base_bytes + side_bytes) / n_weights
    assert size.linear_bytes - measure_size(plain).linear_bytes == side_bytes
    (p_c, b_c), (p_p, b_p) = measure_size_light(comp), measure_size_light(plain)
    assert (p_c - p_p, b_c - b_p) == (side_params, side_bytes)
    assert bytes_read_per_token(comp) - bytes_read_per_token(plain) == side_bytes
    # and what is on disk: the checkpoint holds the same bytes (plus the rest of the model)
    assert sum(t.numel() * t.element_size() for k, t in stored.items() if k.endswith((".A", ".B"))) == side_bytes


def test_hf_export_merges_the_side_path_into_a_dense_weight(tmp_path, caplog):
    model = _compensated(rank=8)
    ck = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")
    with caplog.at_level("INFO", logger="slimlm.nn"):
        hf = export_hf(ck, tmp_path / "hf")
    assert "merging the rank-8 side path" in caplog.text
    stock = AutoModelForCausalLM.from_pretrained(hf)
    assert not any(".base." in k or k.endswith((".A", ".B")) for k in stock.state_dict())
    for m in model.modules():  # the float32 reference path: the int4 kernel multiplies in bfloat16
        if isinstance(m, QuantLinear):
            m.set_weight_kernel(REFERENCE)
    with torch.no_grad():
        torch.testing.assert_close(stock(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)


def test_bad_pieces_are_refused_in_one_line():
    lin = nn.Linear(64, 48)
    q = QuantLinear.from_linear(lin, INT3)
    with pytest.raises(SlimlmError, match="does not fit a 64 -> 48 layer"):
        CompensatedLinear(q, *_factors(64, 48, 4, seed=0))
    with pytest.raises(SlimlmError, match="compressed linear with a dequantized weight, got Linear"):
        CompensatedLinear(lin, *_factors(48, 64, 4, seed=0))
    c = CompensatedLinear(q, *_factors(48, 64, 4, seed=0))
    with pytest.raises(SlimlmError, match="got CompensatedLinear"):
        CompensatedLinear(c, *_factors(48, 64, 4, seed=0))


def test_damaged_manifest_entries_are_refused(tmp_path):
    model = _compensated()
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")
    manifest = json.loads((out / MANIFEST).read_text())
    name = next(iter(manifest["modules"]))
    for change, match in [({"rank": 65}, "rank 65 exceeds min"), ({"base": None}, "needs its base's manifest"),
                          ({"base": {**manifest["modules"][name]["base"], "type": "Nope"}}, "unknown type 'Nope'"),
                          ({"base": {**manifest["modules"][name]["base"], "in_features": 32}}, "contradicts")]:
        bad = {**manifest, "modules": {**manifest["modules"], name: {**manifest["modules"][name], **change}}}
        with pytest.raises(SlimlmError, match=match) as e:
            _shell(tiny_model("llama"), name, bad["modules"][name], torch.float32)
        assert "\n" not in str(e.value)


def test_info_lists_a_compensated_layer_once_with_its_base_format_and_side_path():
    model = _compensated(rank=4)
    names = list(candidate_linears(tiny_model("llama")))
    linears = {i.name: i for i in list_linears(model)}
    for name in names:
        assert linears[name].dtype.startswith("int3-g32") and linears[name].dtype.endswith("rank 4 side path")
        assert not any(n.startswith(name + ".") for n in linears)  # the nested base is not a second line
