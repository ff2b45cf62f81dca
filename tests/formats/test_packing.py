import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.formats import pack_bits, pack_trits, packed_length, unpack_bits, unpack_trits


def reference_pack(row: list[int], bits: int) -> list[int]:
    """Scalar spec: one little-endian bit stream, code i at bits [i*b, (i+1)*b)."""
    acc = sum(c << (bits * i) for i, c in enumerate(row))
    return list(acc.to_bytes((len(row) * bits + 7) // 8, "little"))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 3, 7, 8, 13, 64, 101, 577])
def test_pack_round_trip_exact(bits, n, device):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, n), generator=g, dtype=torch.uint8).to(device)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.device == codes.device
    assert packed.shape == (3, packed_length(n, bits)) == (3, (n * bits + 7) // 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    assert packed[0].tolist() == reference_pack(codes[0].tolist(), bits)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_extreme_codes_and_leading_dims(bits, device):
    codes = torch.full((2, 3, 11), 2**bits - 1, dtype=torch.uint8, device=device)
    codes[..., ::2] = 0
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, 11), codes)


def test_pack_known_layouts():
    assert pack_bits(torch.tensor([1, 2, 3, 4, 5]), 4).tolist() == [0x21, 0x43, 0x05]  # low nibble first
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]  # 4 codes per byte
    assert pack_bits(torch.arange(8), 3).shape == (3,)  # 8 codes in 3 bytes
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0b10000001, 1]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_refuses_out_of_range(bits):
    with pytest.raises(SlimlmError, match=rf"must lie in \[0, {2**bits - 1}\]"):
        pack_bits(torch.tensor([0, 2**bits]), bits)
    with pytest.raises(SlimlmError, match="must lie in"):
        pack_bits(torch.tensor([-1, 0]), bits)


def test_pack_refuses_bad_bits_and_lengths():
    with pytest.raises(SlimlmError, match="1, 2, 3, 4, 5, 6, 7, 8"):
        pack_bits(torch.tensor([0]), 9)
    with pytest.raises(SlimlmError, match="need 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)


@pytest.mark.parametrize("n", [1, 4, 5, 6, 23, 576])
def test_trits_round_trip_exact(n, device):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(-1, 2, (4, n), generator=g, dtype=torch.int8).to(device)
    packed = pack_trits(codes)
    assert packed.shape == (4, -(-n // 5)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_trits(packed, n), codes)


def test_trits_layout_and_range():
    assert pack_trits(torch.tensor([1, 0, -1, 1, 1])).tolist() == [2 + 1 * 3 + 0 * 9 + 2 * 27 + 2 * 81]
    assert pack_trits(torch.ones(5, dtype=torch.int8)).tolist() == [242]  # 3^5 - 1 fits a byte
    with pytest.raises(SlimlmError, match=r"\[-1, 1\]"):
        pack_trits(torch.tensor([2]))
