"""Property-based tests (hypothesis) of the formats: for every scheme and shape, and any weights.

Packing is a bijection on in-range codes (and matches the scalar bit-stream spec); quantize gives
codes of the weight's shape inside the format's range; ``unpack(pack(qw))`` dequantizes to exactly
``dequantize(qw)``; the packed bytes are what ``bits_per_weight`` says; symmetric ints stay within
half a step of the weight. Derandomized with modest example counts, so CI sees the same cases.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from slimlm.formats import (BinaryScheme, IntScheme, KMeansScheme, NF4Scheme, PerChannel, PerGroup, PerTensor,
                            TernaryScheme, bits_per_weight, dequantize, pack, pack_bits, pack_trits, packed_bits,
                            packed_length, quantize, unpack, unpack_bits, unpack_trits)  # fmt: skip

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def _reference_pack(row: list[int], bits: int) -> list[int]:
    """Scalar spec: one little-endian bit stream, code i at bits [i*b, (i+1)*b)."""
    acc = sum(c << (bits * i) for i, c in enumerate(row))
    return list(acc.to_bytes((len(row) * bits + 7) // 8, "little"))


@st.composite
def _codes(draw, low: int, high: int):
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    n = draw(st.integers(1, 70))
    return np.array(draw(hnp.arrays(np.int16, (*lead, n), elements=st.integers(low, high))))


@pytest.mark.parametrize("bits", range(1, 9))
@SETTINGS
@given(data=st.data())
def test_pack_bits_is_exact_and_follows_the_bit_stream_spec(bits, data):
    codes = torch.from_numpy(data.draw(_codes(0, 2**bits - 1))).to(torch.uint8)
    n = codes.shape[-1]
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*codes.shape[:-1], packed_length(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    row = codes.reshape(-1, n)[0].tolist()
    assert packed.reshape(-1, packed.shape[-1])[0].tolist() == _reference_pack(row, bits)


@SETTINGS
@given(data=st.data())
def test_pack_trits_is_exact(data):
    codes = torch.from_numpy(data.draw(_codes(-1, 1))).to(torch.int8)
    packed = pack_trits(codes)
    assert packed.shape[-1] == math.ceil(codes.shape[-1] / 5)
    assert torch.equal(unpack_trits(packed, codes.shape[-1]), codes)


INT_GRANULARITIES = st.sampled_from([PerTensor(), PerChannel(), PerGroup(4), PerGroup(8), PerGroup(16)])
# every format and its storage-changing options as a test case; the rest of each scheme drawn
FAMILIES = {
    **{f"int{b}-{'sym' if sym else 'asym'}": st.builds(IntScheme, bits=st.just(b), symmetric=st.just(sym),
                                                       granularity=INT_GRANULARITIES)
       for b in range(2, 9) for sym in (True, False)},
    **{f"nf4{'-dq' if dq else ''}": st.builds(NF4Scheme, block_size=st.sampled_from([2, 16, 64]),
                                              double_quant=st.just(dq)) for dq in (False, True)},
    **{f"kmeans{b}": st.builds(KMeansScheme, bits=st.just(b), per_row=st.booleans(), iters=st.integers(0, 5))
       for b in range(1, 5)},
    **{f"ternary{'-base3' if b3 else ''}": st.builds(TernaryScheme, threshold=st.floats(0, 1),
                                                     pack_base3=st.just(b3)) for b3 in (False, True)},
    "binary": st.just(BinaryScheme()),
}  # fmt: skip
# weights: ordinary values, exact zeros, ties and outliers; float16-sized so the stored scales fit
WEIGHT_VALUES = st.one_of(st.floats(-8, 8, width=32), st.just(0.0), st.sampled_from([0.5, -0.5, 1e-3, 300.0]))


def _code_range(scheme) -> tuple[int, int]:
    if isinstance(scheme, IntScheme):
        half = 2 ** (scheme.bits - 1)
        return (-(half - 1), half - 1) if scheme.symmetric else (0, 2**scheme.bits - 1)
    if isinstance(scheme, NF4Scheme):
        return 0, 15
    if isinstance(scheme, KMeansScheme):
        return 0, 2**scheme.bits - 1
    return -1, 1  # ternary; binary is -1 or +1, checked below


@pytest.mark.parametrize("family", FAMILIES)
@SETTINGS
@given(out=st.integers(1, 6), in_groups=st.integers(1, 4), data=st.data())
def test_every_scheme_round_trips_exactly_with_codes_in_range(family, out, in_groups, data):
    scheme = data.draw(FAMILIES[family])
    shape = (out, 16 * in_groups)  # a multiple of every group size drawn
    W = torch.from_numpy(data.draw(hnp.arrays(np.float32, shape, elements=WEIGHT_VALUES)))
    qw = quantize(W, scheme)
    low, high = _code_range(scheme)
    assert tuple(qw.codes.shape) == shape and int(qw.codes.min()) >= low and int(qw.codes.max()) <= high
    if isinstance(scheme, BinaryScheme):
        assert set(qw.codes.unique().tolist()) <= {-1, 1}
    W_hat = dequantize(qw)
    assert W_hat.shape == shape and W_hat.dtype == torch.float32 and bool(torch.isfinite(W_hat).all())
    packed = pack(qw)
    assert torch.equal(dequantize(unpack(packed, scheme, shape)), W_hat)
    assert math.isclose(packed_bits(packed), bits_per_weight(scheme, shape) * shape[0] * shape[1])


@SETTINGS
@given(bits=st.integers(2, 8), granularity=INT_GRANULARITIES, out=st.integers(1, 6), data=st.data())
def test_symmetric_int_is_within_half_a_step(bits, granularity, out, data):
    W = torch.from_numpy(data.draw(hnp.arrays(np.float32, (out, 32), elements=WEIGHT_VALUES)))
    qw = quantize(W, IntScheme(bits=bits, symmetric=True, granularity=granularity))
    step = qw.scale.repeat_interleave(32 // qw.scale.shape[1], dim=1).expand(out, 32)  # (out, in): each weight's step
    assert bool(((dequantize(qw) - W).abs() <= step * 0.5 * (1 + 1e-3)).all())
