"""LoRA / DoRA / adapters start from the config's seed, not from whatever the global RNG holds."""

import pytest
import torch

from slimlm.api import apply
from slimlm.peft import DoRA, LoRA
from slimlm.peft.config import Adapters
from slimlm.peft.inject import inject
from tests.peft.helpers import FAST, learnable_calib, model

CALIB = learnable_calib()


def _adapter(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items() if "lora_" in k or ".adapter." in k}


def _injected(config, global_seed):
    m = model()
    torch.manual_seed(global_seed)  # whatever the caller's RNG holds
    inject(m, config)
    return _adapter(m)


@pytest.mark.parametrize("cls", [LoRA, DoRA])
def test_same_config_seed_gives_the_same_initial_adapter_whatever_the_global_rng(cls):
    a, b = _injected(cls(r=4, seed=7), 1), _injected(cls(r=4, seed=7), 2)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = _injected(cls(r=4, seed=8), 1)
    assert any(not torch.equal(a[k], other[k]) for k in a if "lora_A" in k)


def test_injection_leaves_the_global_rng_where_it_was():
    m = model()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    inject(m, LoRA(r=4))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("config", [LoRA(r=4, dropout=0.0, **FAST), DoRA(r=4, **FAST), Adapters(size=4, **FAST)],
                         ids=["lora", "dora", "adapters"])
def test_two_trained_runs_with_one_seed_give_identical_adapters(config):
    runs = []
    for global_seed in (1, 2):
        m = model()
        torch.manual_seed(global_seed)
        apply(m, config, CALIB)
        runs.append(_adapter(m))
    a, b = runs
    assert a and all(torch.equal(a[k], b[k]) for k in a)
