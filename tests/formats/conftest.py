"""Shared fixtures for the format tests: devices, a fixed Gaussian weight, SQNR."""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def gaussian(shape=(256, 576), seed=0, device="cpu") -> torch.Tensor:
    """The same N(0, 1) weight on every device (drawn on CPU, then moved)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device)


def sqnr_db(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|W|^2 / |W - W_hat|^2)."""
    W, W_hat = W.float(), W_hat.float()
    return (10 * torch.log10(W.pow(2).sum() / (W - W_hat).pow(2).sum())).item()
