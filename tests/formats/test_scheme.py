import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.formats import (
    CODECS,
    BinaryScheme,
    IntScheme,
    KMeansInit,
    KMeansScheme,
    NF4Scheme,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    TernaryScheme,
    bits_per_weight,
    dequantize,
    fake_quantize,
    pack,
    packed_bits,
    quantize,
    unpack,
)

from .conftest import gaussian

SCHEMES = [
    IntScheme(4, symmetric=False, granularity=PerGroup(64)),
    IntScheme(4, symmetric=True, granularity=PerGroup(32)),
    IntScheme(3, symmetric=False, granularity=PerChannel(), clip_search=True),
    IntScheme(8, symmetric=True, granularity=PerChannel()),
    IntScheme(2, symmetric=True, granularity=PerTensor()),
    IntScheme(5, symmetric=False, granularity=PerGroup(96)),
    NF4Scheme(),
    NF4Scheme(block_size=128, double_quant=True),
    KMeansScheme(bits=3),
    KMeansScheme(bits=4, per_row=False, init=KMeansInit.QUANTILE),
    TernaryScheme(),
    TernaryScheme(threshold=0.5, pack_base3=False),
    BinaryScheme(),
]


def test_registry_covers_every_scheme():
    assert set(CODECS) == {IntScheme, NF4Scheme, KMeansScheme, TernaryScheme, BinaryScheme}


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
@pytest.mark.parametrize("shape", [(24, 192), (5, 576)])
def test_pack_unpack_exact(scheme, shape, device):
    W = gaussian(shape, seed=3, device=device)
    qw = quantize(W, scheme)
    assert qw.shape == shape and qw.codes.shape == shape and qw.device == W.device
    tensors = pack(qw)
    assert all(t.device == W.device for t in tensors.values())
    back = unpack(tensors, scheme, shape)
    assert torch.equal(back.codes, qw.codes) and back.codes.dtype == qw.codes.dtype
    for name in ["scale", "zero", "codebook"]:
        a, b = getattr(qw, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b)
    W_hat = dequantize(qw)
    assert W_hat.dtype == torch.float32 and W_hat.shape == shape
    assert torch.equal(dequantize(back), W_hat)
    assert torch.equal(fake_quantize(W, scheme), W_hat)
    # the size reported is the size written
    assert bits_per_weight(scheme, shape) == packed_bits(tensors) / (shape[0] * shape[1])


def test_stored_dtypes():
    W = gaussian((8, 128))
    t = pack(quantize(W, IntScheme(4, granularity=PerGroup(64))))
    assert {k: v.dtype for k, v in t.items()} == {"codes": torch.uint8, "scale": torch.float16, "zero": torch.float16}
    assert t["codes"].shape == (8, 64) and t["scale"].shape == (8, 2)
    t = pack(quantize(W, NF4Scheme(double_quant=True)))
    assert {k: v.dtype for k, v in t.items()} == {
        "codes": torch.uint8, "absmax_codes": torch.int8, "absmax_scale": torch.float32,
        "absmax_offset": torch.float32,
    }  # fmt: skip
    assert pack(quantize(W, KMeansScheme(bits=4)))["codebook"].dtype == torch.float16


def test_pack_refuses_inexact_scale():
    qw = quantize(gaussian((4, 64)), IntScheme(4, granularity=PerChannel()))
    bad = type(qw)(qw.scheme, qw.shape, qw.codes, scale=qw.scale + 1e-7, zero=qw.zero)
    with pytest.raises(SlimlmError, match="not exactly representable in torch.float16"):
        pack(bad)


SHAPE = (256, 576)
N = 256 * 576


@pytest.mark.parametrize(
    "scheme, expected",
    [
        (IntScheme(4, symmetric=False, granularity=PerGroup(64)), 4.5),  # 4 + (16 + 16) / 64
        (IntScheme(4, symmetric=True, granularity=PerGroup(64)), 4.25),  # 4 + 16 / 64
        (IntScheme(4, symmetric=False, granularity=PerGroup(64), clip_search=True), 4.5),
        (IntScheme(8, symmetric=True, granularity=PerChannel()), 8 + 16 / 576),
        (IntScheme(8, symmetric=False, granularity=PerChannel()), 8 + 32 / 576),
        (IntScheme(3, symmetric=False, granularity=PerGroup(64)), 3.5),
        (IntScheme(4, symmetric=True, granularity=PerTensor()), 4 + 16 / N),
        (NF4Scheme(), 4.5),  # 4 + 32 / 64
        (NF4Scheme(double_quant=True), 4 + 8 / 64 + (9 * 32 + 32) / N),  # ~4.127
        (KMeansScheme(bits=4), 4 + 16 * 16 / 576),  # float16 codebook per row
        (KMeansScheme(bits=4, per_row=False), 4 + 16 * 16 / N),
        (TernaryScheme(), (116 * 8 + 16) / 576),  # 5 trits per byte: ceil(576/5) bytes a row
        (TernaryScheme(pack_base3=False), 2 + 16 / 576),
        (BinaryScheme(), 1 + 16 / 576),
    ],
    ids=repr,
)
def test_bits_per_weight_exact(scheme, expected):
    assert bits_per_weight(scheme, SHAPE) == pytest.approx(expected, rel=1e-12)


def test_nf4_double_quant_bits():
    assert bits_per_weight(NF4Scheme(double_quant=True), SHAPE) == pytest.approx(4.127, abs=5e-4)


def test_group_size_refused_with_valid_list():
    W = gaussian((4, 576))
    msg = "group_size 128 does not divide in_features 576; valid: 1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 24, 32, 36, 48, 64, 72, 96, 144, 192, 288, 576"  # noqa: E501
    with pytest.raises(SlimlmError) as e:
        quantize(W, IntScheme(4, granularity=PerGroup(128)))
    assert str(e.value) == msg
    with pytest.raises(SlimlmError, match="does not divide"):
        bits_per_weight(IntScheme(4, granularity=PerGroup(128)), (4, 576))


@pytest.mark.parametrize("bits", [0, 1, 9, 16, "4", 4.0, True, None])
def test_int_bits_refused(bits):
    with pytest.raises(SlimlmError, match="bits must be one of 2, 3, 4, 5, 6, 7, 8"):
        IntScheme(bits=bits)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: IntScheme(granularity=PerToken()), "PerTensor\\(\\), PerChannel\\(\\) or PerGroup\\(size\\)"),
        (lambda: IntScheme(granularity="g64"), "PerGroup"),
        (lambda: IntScheme(symmetric="yes"), "symmetric must be true or false"),
        (lambda: PerGroup(0), "positive int"),
        (lambda: NF4Scheme(block_size=1), "block_size must be an int >= 2"),
        (lambda: KMeansScheme(bits=9), "bits must be one of 1, 2, 3, 4, 5, 6, 7, 8"),
        (lambda: KMeansScheme(init="linear"), "KMeansInit.LINEAR, KMeansInit.QUANTILE"),
        (lambda: KMeansScheme(iters=-1), "iters must be an int >= 0"),
        (lambda: TernaryScheme(threshold=1.5), r"threshold must be in \[0, 1\]"),
    ],
)
def test_invalid_configs_refused(make, match):
    with pytest.raises(SlimlmError, match=match):
        make()


def test_non_2d_weight_refused():
    with pytest.raises(SlimlmError, match="2-D"):
        quantize(torch.zeros(2, 3, 4), NF4Scheme())
    with pytest.raises(SlimlmError, match="2-D"):
        quantize(torch.zeros(8), IntScheme(8, granularity=PerChannel()))


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_all_zero_weight_is_finite(scheme, device):
    W = torch.zeros(4, 192, device=device)
    W_hat = fake_quantize(W, scheme)
    assert torch.isfinite(W_hat).all()
    if not isinstance(scheme, BinaryScheme):  # binary has no zero level
        assert (W_hat == 0).all()
