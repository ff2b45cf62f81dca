"""The kernel report (``slimlm info``, the eval JSON) says whether the native CPU kernels loaded, or why not."""

from __future__ import annotations

import torch
from torch import nn

from slimlm.formats import parse_scheme
from slimlm.kernels import kernel_report
from slimlm.kernels.native import build
from slimlm.kernels.report import format_kernels
from slimlm.nn import QuantLinear


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = QuantLinear.from_linear(nn.Linear(96, 37, bias=False), parse_scheme("int8-g32-sym"))


def test_a_loaded_library_is_named_in_the_report(native_on):
    d = kernel_report(_Model()).to_dict()
    assert d["counts"] == {"int8_native_cpu": 1}
    assert d["native"].startswith("AVX") and "build (" in d["native"]
    assert "  native CPU kernels: AVX" in format_kernels(d)


def test_a_refused_library_says_why_and_a_deliberate_switch_off_says_nothing(native_on):
    build.reset(build.Native(reason="no C compiler found (install gcc)"))
    d = kernel_report(_Model()).to_dict()
    assert d["counts"] == {"int8_grouped": 1}  # the torch-only kernel instead
    assert d["native"] == "off: no C compiler found (install gcc)"
    assert "  native CPU kernels: off: no C compiler found (install gcc)" in format_kernels(d)
    build.reset(build.Native(reason="disabled by SLIMLM_NATIVE=0"))
    assert "native" not in kernel_report(_Model()).to_dict()
