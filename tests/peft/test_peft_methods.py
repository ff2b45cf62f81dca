"""Every PEFT method trains a tiny model a few steps: the loss goes down, only its own parameters change."""

import pytest
import torch

from slimlm.api import apply
from slimlm.eval.quality import mean_nll
from slimlm.models.tiny import tiny_model
from slimlm.nn import QuantLinear
from slimlm.peft import IA3, Adapters, BitFit, DoRA, LoRA, PromptTuning, QLoRA
from slimlm.peft.houlsby import HoulsbyLinear
from slimlm.peft.inject import RuntimeLoraLinear
from slimlm.quant.rtn import RTN
from slimlm.targets import Targets
from slimlm.train import TrainRun
from tests.peft.helpers import FAST, learnable_calib, model, snapshot

CALIB = learnable_calib()

CONFIGS = {
    "lora": LoRA(r=4, lr=1e-2, **FAST),
    "dora": DoRA(r=4, lr=1e-2, **FAST),
    "qlora": QLoRA(r=4, lr=1e-2, **FAST),
    "ia3": IA3(lr=5e-2, **FAST),
    "adapters": Adapters(size=8, lr=1e-2, **FAST),
    "prompt_tuning": PromptTuning(n_tokens=4, lr=5e-2, **FAST),
    "bitfit": BitFit(lr=5e-2, **FAST),
    "bitfit_zero": BitFit(zero_biases=True, lr=5e-2, **FAST),
}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if k in after and not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_method_lowers_the_loss_and_changes_only_its_parameters(name):
    m = model()
    if name == "qlora":
        apply(m, RTN(scheme="nf4", targets=Targets(include=("*.mlp.*",))))
    before, nll = snapshot(m), mean_nll(m, CALIB)
    run = TrainRun()
    apply(m, CONFIGS[name], CALIB, run=run)
    assert mean_nll(m, CALIB) < nll - 0.01, (mean_nll(m, CALIB), nll, run.reports[0]["losses"])
    after = snapshot(m)
    # the base, bit for bit: no tensor the model had before changed, except BitFit's biases and norms
    changed = _changed(before, after)
    if name.startswith("bitfit"):
        assert changed and all(k.endswith("bias") or "norm" in k for k in changed), changed
    else:
        assert changed == set(), changed
    new = {k for k in set(after) - set(before) if any(p in k for p in ("lora_", "ia3_", "soft_prompt", ".adapter."))}
    if not name.startswith("bitfit"):  # the report counts exactly the adapter's tensors
        assert new and run.reports[0]["trainable_params"] == sum(after[k].numel() for k in new)


def test_qlora_keeps_the_base_packed_and_quantizes_float_targets():
    m = model()
    apply(m, RTN(scheme="int4-g32", targets=Targets(include=("*.mlp.*",))))
    codes = {n: mod.portable_tensors() for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    apply(m, QLoRA(r=4, **FAST), CALIB)
    wrapped = {n: mod for n, mod in m.named_modules() if isinstance(mod, RuntimeLoraLinear)}
    assert len(wrapped) == 14  # every block linear: 6 int4 from before, 8 attention linears rounded to NF4 by qlora
    for n, layer in wrapped.items():
        base = layer.get_base_layer()
        assert isinstance(base, QuantLinear) and not any(p.requires_grad for p in base.parameters())
        if n in codes:  # the int4 base kept its packed codes, bit for bit
            assert all(torch.equal(v, codes[n][k]) for k, v in base.portable_tensors().items())
        else:
            assert type(base.scheme).__name__ == "NF4Scheme"


def test_prompt_tuned_model_scores_its_windows_like_the_plain_model_at_start():
    """With the prompt's logits cut off, outputs line up with the input: same shape, evaluation works."""
    m = model()
    nll = mean_nll(m, CALIB[:2, :16])
    apply(m, PromptTuning(n_tokens=3, **{**FAST, "steps": 2}), CALIB)
    with torch.no_grad():
        out = m(input_ids=CALIB[:2, :16], labels=CALIB[:2, :16], use_cache=False)
    assert out.logits.shape == (2, 16, 512)
    # labels: the same 15 targets as the plain model (the prompt and BOS are never targets)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    manual = -logp.gather(-1, CALIB[:2, 1:16, None]).mean()
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert mean_nll(m, CALIB[:2, :16]) != nll


def test_houlsby_adapters_start_as_the_identity():
    m = model()
    with torch.no_grad():
        ref = m(CALIB[:2]).logits
    apply(m, Adapters(size=4, **{**FAST, "steps": 1, "lr": 1e-9}), CALIB)
    assert sum(isinstance(x, HoulsbyLinear) for x in m.modules()) == 4  # o_proj and down_proj of 2 blocks
    with torch.no_grad():
        assert torch.allclose(m(CALIB[:2]).logits, ref, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "opt", "phi3"])
def test_lora_adapters_and_prompt_on_other_families(family):
    for cfg in (LoRA(r=4, lr=1e-2, **FAST), Adapters(size=4, lr=1e-2, **FAST), PromptTuning(n_tokens=2, **FAST)):
        m = tiny_model(family)
        before, nll = snapshot(m), mean_nll(m, CALIB)
        apply(m, cfg, CALIB)
        assert mean_nll(m, CALIB) < nll and not _changed(before, snapshot(m))


def test_a_lora_run_resumes_from_its_saved_state(tmp_path):
    """The adapter is re-made (new random A) by a resumed run; the saved state must win, bit for bit."""
    cfg = LoRA(r=4, lr=1e-2, checkpoint_every=3, **FAST)
    first = apply(model(), cfg, CALIB, run=TrainRun(state_dir=tmp_path / "state"))
    cut = {k: v for k, v in snapshot(first).items() if "lora_" in k}
    again = model()
    torch.manual_seed(123)  # another initial A than the first run's
    apply(again, cfg, CALIB, run=(run := TrainRun(state_dir=tmp_path / "state")))
    assert run.reports[0]["resumed_from"] == 6
    assert all(torch.equal(v, snapshot(again)[k]) for k, v in cut.items())
