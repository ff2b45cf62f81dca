"""Number formats: granularity, affine ints, codebooks (NF4, k-means, ternary, binary), packing.

Each format is a spec: a reference quantize/dequantize in plain torch, an
exact pack/unpack, and a ``bits_per_weight`` counted from the packed bytes.
"""

from slimlm.formats.activation import dequantize_per_token, quantize_per_token
from slimlm.formats.affine import (
    CLIP_FACTORS,
    affine_dequantize,
    affine_fake_quantize,
    affine_params,
    affine_qrange,
    affine_quantize,
    check_bits,
)
from slimlm.formats.binary import binary_dequantize, binary_quantize
from slimlm.formats.codec import (
    CODECS,
    Codec,
    bits_per_weight,
    dequantize,
    fake_quantize,
    pack,
    packed_bits,
    quantize,
    unpack,
)
from slimlm.formats.granularity import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    check_group_size,
    divisors,
    group_view,
)
from slimlm.formats.kmeans import KMeansInit, kmeans_codebook, kmeans_dequantize, kmeans_quantize
from slimlm.formats.nf4 import (
    NF4_VALUES,
    double_dequantize,
    double_quantize,
    nf4_absmax,
    nf4_dequantize,
    nf4_quantize,
    nf4_values,
)
from slimlm.formats.packing import pack_bits, pack_trits, packed_length, unpack_bits, unpack_trits
from slimlm.formats.parse import parse_scheme, scheme_to_dict
from slimlm.formats.scheme import (
    BinaryScheme,
    DoubleQuant,
    IntScheme,
    KMeansScheme,
    NF4Scheme,
    QuantizedWeight,
    Scheme,
    TernaryScheme,
)
from slimlm.formats.ternary import ternary_dequantize, ternary_quantize

__all__ = [
    "CLIP_FACTORS", "CODECS", "NF4_VALUES",
    "BinaryScheme", "Codec", "DoubleQuant", "Granularity", "IntScheme", "KMeansInit", "KMeansScheme",
    "NF4Scheme", "PerChannel", "PerGroup", "PerTensor", "PerToken", "QuantizedWeight", "Scheme",
    "TernaryScheme",
    "affine_dequantize", "affine_fake_quantize", "affine_params", "affine_qrange", "affine_quantize",
    "binary_dequantize", "binary_quantize", "bits_per_weight", "check_bits", "check_group_size",
    "dequantize", "dequantize_per_token", "divisors", "double_dequantize", "double_quantize",
    "fake_quantize", "group_view", "kmeans_codebook", "kmeans_dequantize", "kmeans_quantize",
    "nf4_absmax", "nf4_dequantize", "nf4_quantize", "nf4_values", "pack", "pack_bits", "pack_trits",
    "packed_bits", "packed_length", "parse_scheme", "quantize", "quantize_per_token", "scheme_to_dict",
    "ternary_dequantize", "ternary_quantize", "unpack", "unpack_bits", "unpack_trits",
]  # fmt: skip
