"""int8 weight-only with one scale per tensor on CPU's ``_weight_int8pack_mm``: the scale row must be real memory.

The op reads N scales from memory; an expanded (stride-0) view of the one scale gave garbage (NaN). The first-use
guard caught it only when a per-tensor layer was the first int8 layer to run; after a per-channel one had passed
the check, per-tensor layers returned NaN unguarded."""

import torch
from torch import nn

from slimlm.formats import parse_scheme
from slimlm.kernels import reset_checks
from slimlm.nn import QuantLinear


def test_per_tensor_int8_after_per_channel_matches_the_reference():
    reset_checks()
    torch.manual_seed(0)
    lin = nn.Linear(64, 128, bias=False)
    per_channel = QuantLinear.from_linear(lin, parse_scheme("int8-channel-sym"))
    per_tensor = QuantLinear.from_linear(lin, parse_scheme("int8-tensor-sym"))
    assert per_tensor.kernel.name == "int8_weight_only_cpu"
    x = torch.randn(1, 64)
    per_channel(x)  # passes the first-use check for the kernel on cpu/float32
    ref = x @ per_tensor.dequantized_weight().T
    torch.testing.assert_close(per_tensor(x), ref, atol=2e-2, rtol=2e-2)  # bf16 activations inside the kernel
