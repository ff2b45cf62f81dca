"""SharedQuantEmbedding: the rows of a quantized head's table, bit for bit, read from those rows alone."""

import copy

import pytest
import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.formats import parse_scheme
from slimlm.kernels import REFERENCE
from slimlm.nn import QuantLinear, SharedQuantEmbedding

V, D = 64, 64
IDS = torch.tensor([[5, 0, 63, 5], [17, 17, 2, 40]])  # repeats, both ends of the table

# (scheme, kernel the head runs on the CPU: the int8 and int4 layouts differ from the portable one)
SCHEMES = [("int8-channel-sym", "int8_weight_only_cpu"), ("int8-tensor-sym", "int8_weight_only_cpu"),
           ("int4-g32", "int4_grouped_cpu"), ("int4-g32-sym", "int4_grouped_cpu"), ("int3-g32", "int4_grouped_cpu"),
           ("int4-g16", "reference"), ("int2-channel", "reference"), ("int6-tensor", "reference"),
           ({"format": "kmeans", "bits": 3}, "reference"),
           ({"format": "kmeans", "bits": 3, "per_row": False}, "reference"),
           ({"format": "ternary"}, "reference"), ({"format": "binary"}, "reference")]  # fmt: skip


def _head(scheme) -> QuantLinear:
    lin = nn.Linear(D, V, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(V, D, generator=torch.Generator().manual_seed(0)))
    return QuantLinear.from_linear(lin, parse_scheme(scheme))


@pytest.mark.parametrize("scheme,kernel", SCHEMES)
def test_rows_are_the_dequantized_table_bit_for_bit(scheme, kernel):
    head = _head(scheme)
    assert head.kernel.name == kernel
    emb = SharedQuantEmbedding.reading(head, reads="lm_head", dtype=torch.float32)
    want = head.dequantized_weight()[IDS]  # (2, 4, D)
    assert torch.equal(emb(IDS), want)
    head.set_weight_kernel(REFERENCE)  # the portable layout read by the generic rows path
    assert torch.equal(emb(IDS), want)
    assert torch.equal(emb.weight, head.dequantized_weight())


def test_output_follows_the_model_dtype():
    head = _head("int8-channel-sym")
    emb = SharedQuantEmbedding.reading(head, reads="lm_head", dtype=torch.float32)
    holder = nn.ModuleDict({"emb": emb, "head": head}).to(torch.bfloat16)
    out = holder["emb"](IDS)
    assert out.dtype == torch.bfloat16 and torch.equal(out, head.dequantized_weight()[IDS].to(torch.bfloat16))


def test_holds_no_tensor_and_reads_the_head_s_storage():
    head = _head("int4-g32")
    emb = SharedQuantEmbedding.reading(head, reads="lm_head", dtype=torch.float32)
    assert emb.state_dict() == {} and list(emb.parameters()) == [] and list(emb.children()) == []
    assert emb.head is head
    copied = copy.deepcopy(nn.ModuleDict({"emb": emb, "head": head}))  # a deep copy keeps the sharing
    assert copied["emb"].head is copied["head"]


def test_refusals():
    with pytest.raises(SlimlmError, match="NF4Scheme keeps no per-row scales"):
        SharedQuantEmbedding.reading(_head("nf4"), reads="lm_head", dtype=torch.float32)
    with pytest.raises(SlimlmError, match="only a weight-only quantized head"):
        SharedQuantEmbedding.reading(nn.Linear(D, V), reads="lm_head", dtype=torch.float32)
    shell = SharedQuantEmbedding.empty(V, D, parse_scheme("int8-channel-sym"), bias=False, reads="lm_head")
    with pytest.raises(SlimlmError, match="not linked to lm_head"):
        shell(IDS)
    with pytest.raises(SlimlmError, match="does not match lm_head"):
        shell._attach(_head("int4-g32"))
