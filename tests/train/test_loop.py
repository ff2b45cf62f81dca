import json
import logging

import pytest
import torch

from slimlm.distill import teacher_objective
from slimlm.errors import SlimlmError
from slimlm.models.tiny import tiny_model
from slimlm.train import TrainConfig, next_token_objective, sample_batch, train

_g = torch.Generator().manual_seed(0)
CALIB = torch.randint(3, 512, (16, 32), generator=_g)
HELD_OUT = torch.randint(3, 512, (8, 32), generator=_g)
# a learnable pattern: each row counts up from a random start
PATTERN = (torch.randint(0, 400, (16, 1), generator=_g) + torch.arange(32)) % 500 + 3


def _trained(model):
    return list(model.model.layers[0].mlp.parameters()) + list(model.model.layers[1].self_attn.parameters())


# Pinned from QAT's loop (slimlm.quant.qat.train_qat at c1db026) on the same parameters, config and data.
PINNED = {
    False: ([6.2414703369140625, 6.2490386962890625, 6.209260940551758, 6.219210147857666, 6.253900051116943],
            (0.0021168461496340876, 0.1290322135250388)),
    True: ([0.025876164436340332, 0.025103777647018433, 0.025309838354587555, 0.025273224338889122,
            0.02548954263329506], (0.0023410417696666493, 0.12729942310963238)),
}  # fmt: skip


@pytest.mark.parametrize("distill", [False, True])
def test_same_seed_same_losses_and_weights_as_qat_loop_before_the_move(distill):
    model = tiny_model("llama")
    objective = teacher_objective(tiny_model("llama", seed=1)) if distill else next_token_objective
    config = TrainConfig(steps=5, lr=1e-3, seq_len=24, batch_size=3, warmup=2, seed=5)
    report = train(model, _trained(model), objective, PATTERN, config)
    losses, digest = PINNED[distill]
    assert report.losses == pytest.approx(losses, rel=1e-5)
    with torch.no_grad():
        logits = model(HELD_OUT).logits.double()
    assert (logits.mean().item(), logits.abs().mean().item()) == pytest.approx(digest, rel=1e-5, abs=1e-8)
    assert report.tokens == 5 * 3 * 24


def test_only_given_params_change_flags_restored_hook_each_step():
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)  # a flag that must survive the run
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = {id(p) for p in _trained(model)}
    seen = []
    with torch.no_grad():  # as under apply(): the loop enables grad itself
        report = train(model, _trained(model), next_token_objective, PATTERN,
                       TrainConfig(steps=3, lr=1e-3, seq_len=16, batch_size=2), on_step=seen.append)  # fmt: skip
    assert seen == [0, 1, 2] and len(report.losses) == 3 and not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (id(p) in trained), n


def test_more_steps_reduce_the_loss_on_a_learnable_pattern():
    model = tiny_model("llama")
    config = TrainConfig(steps=15, lr=3e-3, seq_len=32, batch_size=4)
    report = train(model, list(model.parameters()), next_token_objective, PATTERN, config)
    assert sum(report.losses[-3:]) < sum(report.losses[:3])
    first, last, k = report.loss_trend()
    assert k == 3 and last < first


def test_sample_batch_draws_windows_of_the_rows():
    gen = torch.Generator().manual_seed(0)
    batch = sample_batch(PATTERN, seq_len=8, batch_size=5, generator=gen)
    assert batch.shape == (5, 8)
    assert (batch[:, 1:] - batch[:, :-1] != 0).all()
    rows = [r.tolist() for r in PATTERN]
    assert all(any(str(w.tolist())[1:-1] in str(r) for r in rows) for w in batch)
    assert sample_batch(PATTERN, seq_len=99, batch_size=2, generator=gen).shape == (2, 32)  # T = min(seq_len, L)


@pytest.mark.parametrize("kw, words", [
    (dict(steps=0), r"steps must be > 0"), (dict(steps=2.5), "steps must be > 0"),
    (dict(seq_len=True), "seq_len must be > 0"), (dict(batch_size=-1), "batch_size must be > 0"),
    (dict(warmup=-1), "warmup must be >= 0"), (dict(lr=0.0), "lr must be > 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"), (dict(grad_clip=0), "grad_clip must be > 0"),
    (dict(schedule="linear"), "one of cosine, constant"),
    (dict(seed=1.0), "seed must be an int"), (dict(grad_accum=0), "grad_accum must be > 0"),
    (dict(precision="fp16"), "precision must be one of fp32, bf16, auto"), (dict(log_every=0), "log_every must be > 0"),
    (dict(checkpoint_every=1.5), "checkpoint_every must be > 0"),
])  # fmt: skip
def test_config_refusals_one_line(kw, words):
    with pytest.raises(SlimlmError, match=words):
        TrainConfig(**kw)


def test_train_refuses_no_params_and_bad_data():
    model = tiny_model("llama")
    with pytest.raises(SlimlmError, match="no parameters to train"):
        train(model, [], next_token_objective, PATTERN, TrainConfig(steps=1))
    with pytest.raises(SlimlmError, match=r"non-empty \(N, L\) tensor"):
        train(model, list(model.parameters()), next_token_objective, PATTERN[0], TrainConfig(steps=1))
    with pytest.raises(TypeError):
        TrainConfig(5)  # keyword-only


def test_accumulating_two_micro_batches_trains_the_weights_of_one_batch_of_four():
    """One draw of batch_size * grad_accum windows, each micro-batch's loss / A: the same windows, the same mean."""
    runs = []
    for batch_size, grad_accum in [(4, 1), (2, 2)]:
        model = tiny_model("llama")
        config = TrainConfig(steps=3, lr=1e-3, seq_len=16, batch_size=batch_size, grad_accum=grad_accum, seed=4,
                             precision="fp32")  # fmt: skip
        report = train(model, _trained(model), next_token_objective, PATTERN, config)
        runs.append((report, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (one, w_one), (two, w_two) = runs
    assert two.losses == pytest.approx(one.losses, rel=1e-5) and one.tokens == two.tokens == 3 * 4 * 16
    moved = 0
    for name, W in w_one.items():
        torch.testing.assert_close(w_two[name], W, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(W, tiny_model("llama").state_dict()[name])
    assert moved == len(_trained(model))


def test_report_json_and_progress_log(caplog):
    model = tiny_model("llama")
    config = TrainConfig(steps=4, lr=1e-3, seq_len=16, batch_size=2, grad_accum=2, log_every=2, precision="fp32")
    with caplog.at_level(logging.INFO, logger="slimlm.train"):
        report = train(model, _trained(model), next_token_objective, PATTERN, config, desc="probe")
    lines = [r.getMessage() for r in caplog.records if "tokens/s" in r.getMessage()]
    assert [line.split(",")[0] for line in lines] == ["probe: step 2/4", "probe: step 4/4"]
    assert all(", loss " in line and ", lr " in line for line in lines)
    data = json.loads(json.dumps(report.to_json()))
    assert data["config"] == config.as_dict() and data["config"]["grad_accum"] == 2
    assert (data["steps"], data["tokens"], data["precision"], data["resumed_from"]) == (4, 4 * 2 * 2 * 16, "fp32", None)
    assert data["losses"] == [round(x, 6) for x in report.losses] and len(data["losses"]) == 4
