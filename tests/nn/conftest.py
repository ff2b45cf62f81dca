import logging

import pytest
import torch

from slimlm.kernels import reset_checks

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def fresh_kernel_checks():
    """Each test sees kernels' first-use checks run afresh."""
    reset_checks()
    yield
    reset_checks()


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal to quantization-noise ratio in dB."""
    y, ref = y.detach().float(), ref.detach().float()
    noise = (y - ref).pow(2).mean()
    return float(10 * torch.log10(ref.float().pow(2).mean() / noise))


@pytest.fixture
def caplog_kernels(caplog):
    caplog.set_level(logging.WARNING, logger="slimlm.kernels")
    return caplog
