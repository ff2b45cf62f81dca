"""A tiny HF model with every decoder linear swapped to QuantLinear still generates."""

import pytest
import torch
from torch import nn

from slimlm.formats.granularity import PerChannel, PerGroup
from slimlm.formats.scheme import IntScheme
from slimlm.models.tiny import tiny_model
from slimlm.nn import QuantLinear, W8A8Linear


def _swap_decoder_linears(model: nn.Module, make) -> int:
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and ".layers." in f"{name}.":
                setattr(module, child_name, make(child))
                swapped += 1
    return swapped


@pytest.mark.parametrize("make", [
    lambda lin: QuantLinear.from_linear(lin, IntScheme(8, symmetric=True, granularity=PerChannel())),
    lambda lin: QuantLinear.from_linear(lin, IntScheme(4, granularity=PerGroup(32))),
    lambda lin: W8A8Linear.from_linear(lin),
], ids=["int8", "int4_g32", "w8a8"])  # fmt: skip
def test_swapped_tiny_llama_generates_close_to_float(device, make):
    model = tiny_model("llama").to(device)
    ids = torch.randint(4, 500, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ref = model(ids).logits
        assert _swap_decoder_linears(model, make) == 2 * 7
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 17)
    err = (logits - ref).norm() / ref.norm()
    assert err < 0.1
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.8


def test_swapped_model_moves_and_casts():
    model = tiny_model("llama")
    _swap_decoder_linears(model, lambda lin: QuantLinear.from_linear(lin, IntScheme(4, granularity=PerGroup(32))))
    model.to(torch.bfloat16)
    ids = torch.randint(4, 500, (1, 8))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16
