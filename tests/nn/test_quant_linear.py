"""QuantLinear: error budgets per format, exact checkpoint round trips, storage accounting."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimlm.errors import SlimlmError
from slimlm.formats import codec
from slimlm.formats.granularity import PerChannel, PerGroup
from slimlm.formats.scheme import BinaryScheme, IntScheme, KMeansScheme, NF4Scheme, TernaryScheme
from slimlm.nn import QuantLinear
from tests.nn.conftest import sqnr_db

INT8 = IntScheme(8, symmetric=True, granularity=PerChannel())
INT4_G64 = IntScheme(4, symmetric=False, granularity=PerGroup(64))
EVERY_SCHEME = [
    INT8, INT4_G64, IntScheme(4, symmetric=True, granularity=PerGroup(32)),
    IntScheme(3, granularity=PerGroup(64)), IntScheme(2, granularity=PerGroup(32)),
    IntScheme(8, granularity=PerGroup(64)), NF4Scheme(), NF4Scheme(double_quant=True),
    KMeansScheme(bits=3, iters=5), KMeansScheme(bits=4, per_row=False, iters=5),
    TernaryScheme(), TernaryScheme(pack_base3=False), BinaryScheme(),
]  # fmt: skip


def _linear(in_f=576, out_f=128, *, bias=True, device="cpu", seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(device)


@pytest.mark.parametrize(("scheme", "floor_db"), [(INT8, 35.0), (INT4_G64, 15.0), (NF4Scheme(), 15.0)])
def test_output_within_error_budget(device, scheme, floor_db):
    lin = _linear(device=device)
    with torch.no_grad():
        lin.weight.normal_()  # Gaussian weights and inputs
    x = torch.randn(4, 9, 576, device=device)
    q = QuantLinear.from_linear(lin, scheme)
    with torch.no_grad():
        assert sqnr_db(q(x), lin(x)) > floor_db


@pytest.mark.parametrize("scheme", EVERY_SCHEME, ids=repr)
def test_state_dict_round_trip_is_bit_identical(device, scheme):
    lin = _linear(device=device)
    q = QuantLinear.from_linear(lin, scheme)
    sd = q.state_dict()
    assert set(sd) == {"bias", *codec.pack(codec.quantize(lin.weight.detach(), scheme))}
    shell = QuantLinear.empty(576, 128, scheme, bias=True, device=device)
    result = shell.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert shell.kernel.name == q.kernel.name
    x = torch.randn(3, 576, device=device)
    assert torch.equal(shell(x), q(x))
    assert torch.equal(shell.dequantized_weight(), q.dequantized_weight())


def test_state_dict_holds_the_portable_form_not_the_kernel_layout():
    lin = _linear()
    qw = codec.quantize(lin.weight.detach(), INT4_G64)
    q = QuantLinear.from_linear(lin, INT4_G64)
    assert q.kernel.name == "int4_grouped_cpu"
    sd = q.state_dict()
    for name, t in codec.pack(qw).items():
        assert torch.equal(sd[name], t)


def test_load_refuses_a_mismatched_shape():
    q = QuantLinear.from_linear(_linear(), INT4_G64)
    shell = QuantLinear.empty(576, 64, INT4_G64, bias=True)
    with pytest.raises(RuntimeError, match="codes"):
        shell.load_state_dict(q.state_dict())


@pytest.mark.parametrize(("scheme", "bits"), [(INT4_G64, 4.5), (INT8, 8 + 16 / 576), (BinaryScheme(), 1 + 16 / 576)])
def test_weight_storage_counts_every_packed_tensor(scheme, bits):
    q = QuantLinear.from_linear(_linear(), scheme)
    n, nbytes = q.weight_storage()
    packed = {k: v for k, v in q.state_dict().items() if k != "bias"}
    assert n == 576 * 128
    assert nbytes == sum(t.numel() * t.element_size() for t in packed.values())
    assert nbytes * 8 / n == pytest.approx(bits)
    assert nbytes * 8 / n == pytest.approx(codec.bits_per_weight(scheme, (128, 576)))


def test_dequantized_weight_matches_the_codec():
    lin = _linear()
    q = QuantLinear.from_linear(lin, INT4_G64)
    assert torch.equal(q.dequantized_weight(), codec.fake_quantize(lin.weight.detach(), INT4_G64))


def test_conv1d_is_handled_like_its_linear():
    torch.manual_seed(0)
    conv = Conv1D(128, 576)  # nf=out, nx=in; weight (in, out)
    nn.init.normal_(conv.weight, std=0.02)
    q = QuantLinear.from_linear(conv, INT8)
    x = torch.randn(2, 5, 576)
    assert (q.in_features, q.out_features) == (576, 128)
    assert sqnr_db(q(x), conv(x)) > 35


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", [INT8, INT4_G64, NF4Scheme()], ids=repr)
def test_output_dtype_follows_the_input(device, scheme, dtype):
    q = QuantLinear.from_linear(_linear(device=device), scheme, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 3, 576, device=device, dtype=dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (2, 3, 128)


def test_model_dtype_cast_keeps_the_stored_scales_exact():
    q = QuantLinear.from_linear(_linear(), INT4_G64)
    before = q.state_dict()
    q.to(torch.bfloat16)
    after = q.state_dict()
    assert after["bias"].dtype == torch.bfloat16
    assert all(torch.equal(after[k], before[k]) for k in before if k != "bias")
    assert q(torch.randn(2, 576, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_qweight_is_taken_as_given():
    lin = _linear(bias=False)
    qw = codec.quantize(lin.weight.detach() * 0.5, INT4_G64)  # e.g. what GPTQ produced
    q = QuantLinear.from_linear(lin, INT4_G64, qweight=qw)
    assert torch.equal(q.dequantized_weight(), codec.dequantize(qw))
    with pytest.raises(SlimlmError, match="qweight"):
        QuantLinear.from_linear(lin, INT8, qweight=qw)


def test_extra_repr_names_scheme_and_kernel():
    text = repr(QuantLinear.from_linear(_linear(), INT4_G64))
    assert "PerGroup(size=64)" in text and "kernel=int4_grouped_cpu" in text
