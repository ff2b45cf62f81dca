"""W8A8Linear: error budget, SmoothQuant folding, checkpoint round trip, storage."""

import pytest
import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.nn import W8A8Linear
from tests.nn.conftest import sqnr_db


def _linear(device="cpu", bias=True):
    torch.manual_seed(0)
    return nn.Linear(576, 256, bias=bias).to(device)


def test_output_within_error_budget(device):
    lin = _linear(device)
    x = torch.randn(2, 20, 576, device=device)
    q = W8A8Linear.from_linear(lin)
    assert q.kernel.name == "w8a8_int_mm"
    assert sqnr_db(q(x), lin(x)) > 30


def test_smoothing_tames_an_outlier_channel(device):
    lin = _linear(device)
    x = torch.randn(32, 576, device=device)
    x[:, 7] *= 100.0  # one outlier input channel, as in LLM activations
    absmax_x = x.abs().amax(0)
    absmax_w = lin.weight.detach().abs().amax(0)
    s = (absmax_x.sqrt() / absmax_w.sqrt()).clamp(min=1e-5)  # SmoothQuant, alpha = 0.5
    plain, smooth = W8A8Linear.from_linear(lin), W8A8Linear.from_linear(lin, smooth_scale=s)
    ref = lin(x)
    assert sqnr_db(smooth(x), ref) > sqnr_db(plain(x), ref) + 3


def test_smoothing_folded_elsewhere_expects_divided_input():
    lin = _linear()
    s = torch.rand(576) + 0.5
    folded = W8A8Linear.from_linear(lin, smooth_scale=s, divide_input=False)
    divides = W8A8Linear.from_linear(lin, smooth_scale=s)
    x = torch.randn(4, 576)
    assert "smooth_scale" not in folded.state_dict()
    assert torch.allclose(folded(x / s), divides(x), rtol=1e-5, atol=1e-5)


def test_refuses_a_bad_smoothing_vector():
    with pytest.raises(SlimlmError, match="smooth_scale"):
        W8A8Linear.from_linear(_linear(), smooth_scale=torch.ones(100))


@pytest.mark.parametrize("smooth", [False, True])
def test_state_dict_round_trip_is_bit_identical(device, smooth):
    s = torch.rand(576, device=device) + 0.5 if smooth else None
    q = W8A8Linear.from_linear(_linear(device), smooth_scale=s)
    shell = W8A8Linear.empty(576, 256, bias=True, smooth=smooth, device=device)
    result = shell.load_state_dict(q.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 576, device=device)
    assert torch.equal(shell(x), q(x))
    n, nbytes = q.weight_storage()
    assert n == 576 * 256
    assert nbytes == 576 * 256 + 256 * 2 + (576 * 4 if smooth else 0)  # codes, fp16 scales, fp32 smoothing


def test_per_tensor_activation_scale_is_one_scale_for_the_whole_input(device):
    from slimlm.formats.activation import quantize_per_token
    from slimlm.nn import W8A8PerTensorLinear

    lin = _linear(device)
    x = torch.randn(2, 20, 576, device=device)
    q = W8A8PerTensorLinear.from_linear(lin)
    assert q.kernel.name == "w8a8_int_mm_tensor"
    codes, scale = quantize_per_token(x.reshape(1, -1))  # one absmax scale over every element
    x_fake = (codes.float() * scale).reshape(x.shape)
    ref = torch.nn.functional.linear(x_fake, q.dequantized_weight(), lin.bias)
    assert torch.allclose(q(x), ref, rtol=1e-4, atol=1e-4)
    x[0, 0, 7] = 500.0  # one outlier coarsens every token's grid in per-tensor mode, only its own per token
    assert sqnr_db(W8A8Linear.from_linear(lin)(x), lin(x)) > sqnr_db(q(x), lin(x)) + 10


def test_empty_takes_the_scheme_a_checkpoint_records_and_adopts_a_smoothing_slot():
    from slimlm.nn import W8A8_WEIGHT_SCHEME

    q = W8A8Linear.from_linear(_linear(), smooth_scale=torch.rand(576) + 0.5)
    shell = W8A8Linear.empty(576, 256, W8A8_WEIGHT_SCHEME, bias=True)  # no smooth flag: the manifest lacks it
    result = shell.load_state_dict(q.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(3, 576)
    assert torch.equal(shell(x), q(x))
    with pytest.raises(SlimlmError, match="W8A8 weights"):
        W8A8Linear.empty(576, 256, W8A8_WEIGHT_SCHEME.__class__(bits=4), bias=True)
