"""compressed-tensors export, read back by stock transformers and by the compressed-tensors package itself.

Exactness: transformers' model of the export must give *bit-identical* logits to slimlm's float model
of the same dequantized weights (same graph, same float32 weights), and within float tolerance of
slimlm's own forward (its int kernels). Asymmetric exports load through ``dequantize=True``: the
default path of transformers 5.24 with compressed-tensors 0.20.1 cannot load any asymmetric
pack-quantized checkpoint, llm-compressor's own included (it builds the zero point unpacked on the
meta model; see the module docstring of slimlm.export.compressed_tensors).
"""

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig

from slimlm.api import apply
from slimlm.formats import codec
from slimlm.io import compressed_modules
from slimlm.models.tiny import tiny_model
from slimlm.nn import SparseLinear, SparseQuantLinear
from slimlm.nn.packed import PackedLinear
from slimlm.prune import Magnitude
from slimlm.prune.structured_config import PruneDepth, PruneWidth
from slimlm.prune.structured_handler import apply_prune_depth, apply_prune_width
from slimlm.quant import RTN
from slimlm.quant.w8a8 import W8A8, SmoothQuant, apply_smoothquant, apply_w8a8
from slimlm.targets import Targets
from tests.export.ct_helpers import CALIB, ct_config, ct_tensors, dequantized_logits, export, load_hf, logits

# (scheme, transformers path): symmetric exports load on both paths, asymmetric ones with dequantize=True
WEIGHT_ONLY = [("int4-g16", True), ("int4-g16-sym", False), ("int4-g16-sym", True), ("int8-channel-sym", False),
               ("int8-channel-sym", True), ("int4-channel", True), ("int8-tensor-sym", False), ("int3-g32", True)]


def _rtn(scheme, **kw):
    model = tiny_model("llama")
    apply(model, RTN(scheme=scheme, **kw))
    return model


def _check_logits(model, out, *, dequantize):
    got = logits(load_hf(out, dequantize=dequantize))
    assert torch.equal(got, dequantized_logits(model))  # code for code: slimlm's weights, bit for bit
    # the int4 kernel (also 3-bit codes) multiplies in bfloat16 at these few rows; the others in float32 here
    bf16 = any(m.kernel.name.startswith("int4_grouped") for m in model.modules() if isinstance(m, PackedLinear))
    tol = 2e-2 if bf16 else 1e-4
    torch.testing.assert_close(got, logits(model), rtol=tol, atol=tol / (2 if bf16 else 10))  # and slimlm's own kernels


@pytest.mark.parametrize("scheme,dequantize", WEIGHT_ONLY)
def test_weight_only_logits_equal_slimlms(tmp_path, scheme, dequantize):
    model = _rtn(scheme)
    _, out = export(tmp_path, model)
    qc = ct_config(out)
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    _check_logits(model, out, dequantize=dequantize)


@pytest.mark.parametrize("family", ["qwen2", "phi3", "opt", "gemma3"])  # biases, fused qkv, OPT, a vision tower
def test_other_families_load_code_for_code(tmp_path, family):
    model = tiny_model(family)
    apply(model, RTN(scheme="int4-g16-sym"))
    _, out = export(tmp_path, model)
    got = logits(load_hf(out, dequantize=False))
    assert torch.equal(got, dequantized_logits(model))


def _module_state(tensors, name):
    return {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.") and "bias" not in k}


@pytest.mark.parametrize("scheme", ["int4-g16", "int4-g16-sym", "int8-channel-sym", "int4-channel", "int2-g16",
                                    "int3-g32-sym", "int8-tensor"])  # fmt: skip
def test_package_validates_the_config_and_decompresses_slimlms_weights(tmp_path, scheme):
    model = _rtn(scheme)
    _, out = export(tmp_path, model)
    qc = QuantizationConfig.model_validate(ct_config(out))  # compressed-tensors' own schema
    assert qc.quantization_status == "compressed"
    (ct_scheme,) = qc.config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(ct_scheme.format)
    tensors = ct_tensors(out)
    for name, m in compressed_modules(model).items():
        ours = _module_state(tensors, name)
        W = compressor.decompress(ours, ct_scheme)["weight"]
        assert W.dtype == torch.float32 and torch.equal(W, m.dequantized_weight())
        # The package's compressor, given slimlm's weight, scales and zero points, writes our tensors exactly.
        qw = codec.unpack(m.portable_tensors(), m.scheme, m.shape)
        params = {"weight": W, "weight_scale": ours["weight_scale"]}
        if not m.scheme.symmetric:  # compressed-tensors' signed zero point: slimlm's minus 2^(b-1)
            z = qw.zero.expand(m.out_features, qw.zero.shape[1]) - 2 ** (m.scheme.bits - 1)
            params["weight_zero_point"] = z.to(torch.int8)
        theirs = compressor.compress(params, ct_scheme)
        assert theirs.keys() == ours.keys()
        for k in ours:
            assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), (name, k)


@pytest.mark.parametrize("method", ["w8a8", "smoothquant"])
def test_w8a8_weights_exact_and_activations_per_token(tmp_path, method):
    model = tiny_model("llama")
    if method == "w8a8":
        apply_w8a8(model, W8A8())
    else:  # smoothing folded into the norms and producing linears: no run-time division left
        apply_smoothquant(model, SmoothQuant(alpha=0.5), CALIB)
    _, out = export(tmp_path, model)
    qc = QuantizationConfig.model_validate(ct_config(out))
    (g,) = qc.config_groups.values()
    assert qc.format == g.format == "int-quantized"
    acts = g.input_activations
    assert (acts.strategy, acts.dynamic, acts.num_bits, acts.symmetric) == ("token", True, 8, True)
    assert torch.equal(logits(load_hf(out, dequantize=True)), dequantized_logits(model))  # dense: no activation quant
    hf = load_hf(out, dequantize=False)
    got = logits(hf)
    assert not torch.equal(got, dequantized_logits(model))  # the activations really are quantized
    # transformers' dynamic per-token int8 is absmax/127.5 with codes in [-128, 127], slimlm's (and vLLM's)
    # absmax/127 in [-127, 127]: two roundings of the same activations to grids of the same step, so the
    # two models differ by about as much as either differs from float activations.
    act_err = (logits(model) - dequantized_logits(model)).abs().max()
    assert (got - logits(model)).abs().max() <= 2 * act_err
    for m in hf.modules():
        if hasattr(m, "quantization_scheme"):
            m.quantization_enabled = False
    assert torch.equal(logits(hf), dequantized_logits(model))  # the weights, code for code


def test_structurally_pruned_model_goes_out_with_its_new_shapes(tmp_path):
    model = tiny_model("llama")
    apply_prune_width(model, PruneWidth(heads=2, neurons=48), CALIB)
    apply_prune_depth(model, PruneDepth(layers=1), CALIB)
    apply(model, RTN(scheme="int4-g16-sym"))
    _, out = export(tmp_path, model)
    hf = load_hf(out, dequantize=False)
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim"):
        assert getattr(hf.config, key) == getattr(model.config, key)
    assert hf.config.num_hidden_layers == 1 and hf.config.intermediate_size == 80
    _check_logits(model, out, dequantize=False)


def test_unstructured_pruned_linears_go_out_dense_with_their_zeros(tmp_path):
    model = tiny_model("llama")
    apply(model, Magnitude(sparsity=0.5))
    apply(model, RTN(scheme="int4-g16", targets=Targets(include=("*.mlp.*",))))  # attention stays float sparse
    kinds = {type(m) for m in compressed_modules(model).values()}
    assert kinds == {SparseLinear, SparseQuantLinear}
    _, out = export(tmp_path, model)
    qc = ct_config(out)
    assert sorted(qc["ignore"]) == sorted(["lm_head"] + [n for n, m in compressed_modules(model).items()
                                                          if isinstance(m, SparseLinear)])  # fmt: skip
    hf = load_hf(out, dequantize=True)
    for name, m in compressed_modules(model).items():
        W = hf.get_submodule(name).weight
        assert torch.equal(W == 0, ~m.keep_mask()) and torch.equal(W, m.dequantized_weight())
    _check_logits(model, out, dequantize=True)


def test_mixed_schemes_become_one_group_each_and_a_quantized_lm_head_unties(tmp_path):
    model = _rtn("int4-g16-sym", overrides=(("*.mlp.*", "int8-channel-sym"),), targets=Targets(lm_head=True))
    _, out = export(tmp_path, model)
    qc = QuantizationConfig.model_validate(ct_config(out))
    groups = {g.weights.num_bits: g.targets for g in qc.config_groups.values()}
    assert sorted(groups[8]) == sorted(n for n in compressed_modules(model) if ".mlp." in n)
    assert "lm_head" in groups[4] and qc.ignore == [] and qc.format == "pack-quantized"
    hf = load_hf(out, dequantize=False)
    assert hf.config.tie_word_embeddings is False
    _check_logits(model, out, dequantize=False)
