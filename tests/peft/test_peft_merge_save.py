"""Merging (exact on float bases, requantized with its KLD on quantized ones) and the peft-format round trip."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.nn import QuantLinear
from slimlm.peft import DoRA, LoRA, PromptTuning, QLoRA, load_adapter, merge_lora, save_adapter
from slimlm.peft.config import Adapters
from slimlm.peft.merge import adapter_layers
from slimlm.quant.rtn import RTN
from slimlm.train import TrainRun
from tests.peft.helpers import FAST, learnable_calib, model

CALIB = learnable_calib()
IDS = learnable_calib(2, 24, seed=1)


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("cfg", [LoRA(r=4, lr=1e-2, **FAST), DoRA(r=4, lr=1e-2, **FAST)], ids=["lora", "dora"])
def test_merged_equals_unmerged_on_a_float_base(cfg):
    m = apply(model(), cfg, CALIB)
    unmerged = logits(m)
    assert (unmerged - logits(model())).abs().max() > 1e-3  # the adapter did something to merge
    report = merge_lora(m)
    assert report == {"merged": 14, "requantized": 0}
    assert not adapter_layers(m) and all(type(x).__name__ != "Linear" or isinstance(x, torch.nn.Linear)
                                         for x in m.modules())  # fmt: skip
    assert torch.allclose(logits(m), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_step_in_the_config_and_requantize_reports_the_kld():
    m = apply(model(), RTN(scheme="int4-g32"))
    run_cfg = QLoRA(r=4, lr=1e-2, merge=True, requantize=True, **FAST)
    run = TrainRun()
    apply(m, run_cfg, CALIB, run=run)
    merge = run.reports[0]["merge"]  # in the run's JSON
    assert not adapter_layers(m)
    assert sum(isinstance(x, QuantLinear) for x in m.modules()) == 14
    assert merge["requantized"] == 14 and merge["kld"] > 0


def test_requantized_merge_kld_is_measured_against_the_adapter_beside_the_base():
    m = apply(apply(model(), RTN(scheme="int4-g32")), QLoRA(r=4, lr=1e-2, **FAST), CALIB)
    beside = logits(m, CALIB[:8])
    no_adapter = logits(apply(model(), RTN(scheme="int4-g32")), CALIB[:8])
    report = merge_lora(m, calib=CALIB, requantize=True)
    after = logits(m, CALIB[:8])
    p, q = torch.log_softmax(beside, -1), torch.log_softmax(after, -1)
    assert report["requantized"] == 14 and report["kld"] == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(),
                                                                         rel=1e-4)  # fmt: skip
    assert report["kld"] > 0
    # the merge kept most of what the adapter learnt: much closer to it than the base without the adapter
    r = torch.log_softmax(no_adapter, -1)
    assert report["kld"] < 0.5 * (p.exp() * (p - r)).sum(-1).mean().item()


def test_lora_round_trips_through_peft_on_the_stock_base(tmp_path):
    base = model()
    base.save_pretrained(tmp_path / "base")
    m = apply(model(), LoRA(r=4, lr=1e-2, **FAST), CALIB)
    save_adapter(m, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(stock, tmp_path / "adapter").eval()
    assert torch.allclose(logits(loaded), logits(m), atol=1e-5)
    again = load_adapter(model(), tmp_path / "adapter")  # and through slimlm's loader, with the base checked
    assert torch.equal(logits(again), logits(m))


def test_prompt_tuning_round_trips_through_peft(tmp_path):
    model().save_pretrained(tmp_path / "base")
    m = apply(model(), PromptTuning(n_tokens=3, **FAST), CALIB)
    save_adapter(m, tmp_path / "adapter")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(stock, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = loaded(input_ids=IDS).logits[:, 3:]  # peft returns the prompt's positions too
    assert torch.allclose(theirs, logits(m), atol=1e-5)


def test_houlsby_and_qlora_adapters_round_trip_through_slimlm(tmp_path):
    for i, (base_cfg, cfg) in enumerate([(None, Adapters(size=4, **FAST)),
                                         (RTN(scheme="nf4"), QLoRA(r=4, lr=1e-2, **FAST))]):  # fmt: skip
        fresh = (lambda: apply(model(), base_cfg)) if base_cfg is not None else model
        m = apply(fresh(), cfg, CALIB)
        save_adapter(m, tmp_path / f"a{i}")
        assert torch.equal(logits(load_adapter(fresh(), tmp_path / f"a{i}")), logits(m))


def test_loading_onto_another_base_is_refused_before_anything_changes(tmp_path):
    m = apply(model(), LoRA(r=4, **FAST), CALIB)
    save_adapter(m, tmp_path / "adapter")
    other = model(seed=1)  # same shapes, other weights
    with pytest.raises(SlimlmError, match="trained on another base .*sha256"):
        load_adapter(other, tmp_path / "adapter")
    assert not adapter_layers(other)
    narrow = apply(model(), RTN(scheme="nf4"))  # other tensors: packed codes instead of weights
    with pytest.raises(SlimlmError, match="trained on another base: .* is"):
        load_adapter(narrow, tmp_path / "adapter")
    with pytest.raises(SlimlmError, match="already exists"):
        save_adapter(m, tmp_path / "adapter")
