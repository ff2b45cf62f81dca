import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.formats import (
    BinaryScheme,
    IntScheme,
    KMeansInit,
    KMeansScheme,
    NF4Scheme,
    PerChannel,
    PerGroup,
    PerTensor,
    TernaryScheme,
    check_group_size,
    dequantize_per_token,
    divisors,
    parse_scheme,
    quantize_per_token,
    scheme_to_dict,
)

from .conftest import gaussian


@pytest.mark.parametrize(
    "text, scheme",
    [
        ("int4-g64", IntScheme(4, symmetric=False, granularity=PerGroup(64))),
        ("int4-g128-sym", IntScheme(4, symmetric=True, granularity=PerGroup(128))),
        ("int3-g32-asym-clip", IntScheme(3, symmetric=False, granularity=PerGroup(32), clip_search=True)),
        ("int8-channel", IntScheme(8, symmetric=False, granularity=PerChannel())),
        ("INT8-Channel-Sym", IntScheme(8, symmetric=True, granularity=PerChannel())),
        ("int8-tensor-sym", IntScheme(8, symmetric=True, granularity=PerTensor())),
        ("nf4", NF4Scheme()),
        ("nf4-dq", NF4Scheme(double_quant=True)),
        ("nf4-b128-dq", NF4Scheme(block_size=128, double_quant=True)),
        ("kmeans3", KMeansScheme(bits=3)),
        ("kmeans4-tensor", KMeansScheme(bits=4, per_row=False)),
        ("ternary", TernaryScheme()),
        ("binary", BinaryScheme()),
    ],
)
def test_parse_strings(text, scheme):
    assert parse_scheme(text) == scheme
    assert parse_scheme(scheme_to_dict(scheme)) == scheme


@pytest.mark.parametrize(
    "obj, scheme",
    [
        ({"format": "int", "bits": 4, "group_size": 64, "symmetric": False}, IntScheme(4, False, PerGroup(64))),
        ({"format": "int", "bits": 8, "group_size": "channel", "symmetric": True}, IntScheme(8, True, PerChannel())),
        ({"format": "int", "bits": 8, "group_size": "tensor"}, IntScheme(8, False, PerTensor())),
        ({"format": "int"}, IntScheme()),
        ({"format": "nf4", "double_quant": True}, NF4Scheme(double_quant=True)),
        ({"format": "kmeans", "bits": 2, "init": "quantile"}, KMeansScheme(bits=2, init=KMeansInit.QUANTILE)),
        ({"format": "ternary", "threshold": 0.5}, TernaryScheme(threshold=0.5)),
        ({"format": "binary"}, BinaryScheme()),
    ],
)
def test_parse_dicts(obj, scheme):
    assert parse_scheme(obj) == scheme
    assert parse_scheme(scheme_to_dict(scheme)) == scheme


def test_parse_passes_schemes_through():
    s = NF4Scheme()
    assert parse_scheme(s) is s


@pytest.mark.parametrize("bad", ["int4", "g64", "int4-g64-foo", "fp8", "nf3", "", 4, None, ["int4-g64"]])
def test_parse_refuses_unknown_forms(bad):
    with pytest.raises(SlimlmError, match=r"valid strings: int<bits>-g<size>.*nf4.*ternary, binary"):
        parse_scheme(bad)


def test_parse_refusals_name_the_fix():
    with pytest.raises(SlimlmError, match="bits must be one of 2, 3, 4, 5, 6, 7, 8"):
        parse_scheme("int9-g64")
    with pytest.raises(SlimlmError, match="unknown key\\(s\\) groupsize for format int; valid: format, bits"):
        parse_scheme({"format": "int", "groupsize": 64})
    with pytest.raises(SlimlmError, match="group_size must be an int, 'channel' or 'tensor'"):
        parse_scheme({"format": "int", "group_size": "row"})
    with pytest.raises(SlimlmError, match="kmeans init must be one of linear, quantile"):
        parse_scheme({"format": "kmeans", "init": "random"})
    with pytest.raises(SlimlmError, match="format one of int, nf4, kmeans, ternary, binary"):
        parse_scheme({"format": "fp8"})


def test_divisors_and_group_check():
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert {32, 64, 96, 192, 288, 576} <= set(divisors(576)) and 128 not in divisors(576)
    check_group_size(576, 64)
    with pytest.raises(SlimlmError, match=r"^group_size 128 does not divide in_features 576; valid: 1, 2, 3,"):
        check_group_size(576, 128)


# --- per-token activations ---------------------------------------------------


def test_per_token_round_trip(device):
    X = gaussian((2 * 5, 64), seed=7, device=device).reshape(2, 5, 64)
    X[0, 1] *= 100.0  # an outlier token must not hurt the others
    X[1, 2] = 0.0  # an all-zero token
    codes, scale = quantize_per_token(X)
    assert codes.dtype == torch.int8 and codes.shape == X.shape and scale.shape == (2, 5, 1)
    assert int(codes.abs().max()) == 127 and codes.device == X.device
    X_hat = dequantize_per_token(codes, scale)
    assert ((X_hat - X).abs() <= scale / 2 * (1 + 1e-5)).all()  # rounding error at most half a step
    assert (X_hat[1, 2] == 0).all()
    rel = (X_hat - X).norm(dim=-1) / X.norm(dim=-1).clamp(min=1e-9)  # (2, 5)
    assert (rel < 0.01).all()  # int8 per token: under 1 % relative error on every token


def test_per_token_fewer_bits(device):
    X = gaussian((16, 64), device=device)
    errs = [(dequantize_per_token(*quantize_per_token(X, bits=b)) - X).pow(2).sum().item() for b in [4, 6, 8]]
    assert errs[0] > errs[1] > errs[2]
    with pytest.raises(SlimlmError, match="bits must be one of"):
        quantize_per_token(X, bits=1)


def test_parse_refuses_granularity_key_on_other_formats():
    with pytest.raises(SlimlmError, match="unknown key\\(s\\) granularity for format nf4; valid: format, block_size"):
        parse_scheme({"format": "nf4", "granularity": "channel"})
    with pytest.raises(SlimlmError, match="unknown key\\(s\\) granularity for format int"):
        parse_scheme({"format": "int", "granularity": "channel"})
