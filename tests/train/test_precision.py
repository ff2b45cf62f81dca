import logging

import pytest
import torch

from slimlm.models.tiny import tiny_model
from slimlm.train import TrainConfig, choose_precision, next_token_objective, train
from slimlm.train import precision as P

PATTERN = (torch.randint(0, 400, (8, 1), generator=torch.Generator().manual_seed(0)) + torch.arange(16)) % 500 + 3
WIDE = [torch.zeros(3), torch.zeros(1536, 512)]  # H = 512: the smaller side of the first 2-D param


class FakeTimer:
    """Seconds per call from a table, fp32 first (the order choose_precision times them in); counts calls."""

    def __init__(self, fp32: float, bf16: float) -> None:
        self.times, self.calls = [fp32, bf16], 0

    def __call__(self, call, reps):
        self.calls += 1
        return self.times[(self.calls - 1) % 2]


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(P, "_CHOICES", {})


@pytest.mark.parametrize("fp32, bf16, chosen", [
    (0.17, 2.0, "fp32"),  # this machine's shape of result: emulated bf16 is ten times slower
    (1.0, 0.5, "bf16"),
    (1.0, 0.95, "fp32"),  # within the margin: keep the exact arithmetic
    (1.0, 0.85, "bf16"),
])  # fmt: skip
def test_auto_picks_the_faster_by_a_margin_and_records_the_timings(fp32, bf16, chosen):
    choice = choose_precision("auto", WIDE, timer=FakeTimer(fp32, bf16))
    assert (choice.precision, choice.fp32_s, choice.bf16_s) == (chosen, fp32, bf16)


def test_choice_cached_per_hidden_size_explicit_and_tiny_models_unmeasured(caplog):
    timer = FakeTimer(1.0, 0.5)
    with caplog.at_level(logging.INFO, logger="slimlm.train"):
        assert choose_precision("auto", WIDE, timer=timer).precision == "bf16"
    assert "fp32 1.0000 s, bf16 autocast 0.5000 s -> bf16" in caplog.text and "(512, 512) @ (512, 2048)" in caplog.text
    assert choose_precision("auto", WIDE, timer=timer).precision == "bf16" and timer.calls == 2  # cached
    choose_precision("auto", [torch.zeros(256, 1024)], timer=timer)
    assert timer.calls == 4  # another H: measured again
    assert choose_precision("fp32", WIDE, timer=timer) == P.PrecisionChoice("fp32")
    assert choose_precision("bf16", WIDE, timer=timer) == P.PrecisionChoice("bf16")
    assert choose_precision("auto", [torch.zeros(128, 64)], timer=timer) == P.PrecisionChoice("fp32")
    assert timer.calls == 4


def test_real_timer_times_a_forward_and_backward_in_each_precision():
    for precision in ("fp32", "bf16"):
        seconds = P.seconds_per_call(P._linear_step(torch.device("cpu"), 32, precision), 2)
        assert 0 < seconds < 5


@pytest.mark.parametrize("precision", ["bf16", "fp32", "auto"])
def test_bf16_runs_forward_and_loss_under_autocast_weights_stay_fp32(precision):
    model = tiny_model("llama")
    seen = []

    def objective(m, ids):
        loss = next_token_objective(m, ids)
        seen.append((torch.is_autocast_enabled("cpu"), m.model.layers[0].mlp.up_proj(m.model.embed_tokens(ids)).dtype))
        return loss

    params = list(model.model.layers[0].mlp.parameters())
    config = TrainConfig(steps=2, lr=1e-3, seq_len=16, batch_size=2, precision=precision)
    report = train(model, params, objective, PATTERN, config)
    bf16 = precision == "bf16"  # auto: the tiny model (H = 64) stays fp32 on every machine
    assert seen == [(bf16, torch.bfloat16 if bf16 else torch.float32)] * 2
    assert report.precision == ("bf16" if bf16 else "fp32")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert report.to_json()["precision"] == report.precision
