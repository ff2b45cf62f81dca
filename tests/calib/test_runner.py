import pytest
import torch

from slimlm.calib import StatsSpec, calibrate_blocks
from slimlm.calib.runner import calibrate_linears
from slimlm.models.adapters import decoder_blocks
from slimlm.models.tiny import tiny_model

CALIB = torch.randint(3, 512, (6, 24), generator=torch.Generator().manual_seed(0))


def _block_inputs_from_full_forward(model):
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, kw, i=i: seen.setdefault(i, []).append(
        (a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True) for i, b in enumerate(decoder_blocks(model))]
    with torch.no_grad():
        for s in range(0, 6, 4):
            model(CALIB[s:s + 4])
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in seen.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "opt", "gpt2", "phi3"])
def test_block_inputs_match_a_full_forward_when_nothing_changes(family):
    model = tiny_model(family)
    expected = _block_inputs_from_full_forward(model)
    got = {}

    def on_block(ctx):
        got[ctx.index] = torch.cat(ctx.inputs)
        return False

    report = calibrate_blocks(model, CALIB, on_block=on_block, batch_size=4)
    assert report.blocks == len(decoder_blocks(model))
    for i in expected:
        torch.testing.assert_close(got[i], expected[i], rtol=1e-5, atol=1e-5)


def test_statistics_are_those_of_the_linear_inputs():
    model = tiny_model("llama")
    q_inputs = []
    h = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: q_inputs.append(a[0].clone()))
    with torch.no_grad():
        model(CALIB[:4]), model(CALIB[4:])
    h.remove()
    X = torch.cat([x.reshape(-1, 64) for x in q_inputs])  # (rows, in)
    found = {}

    def on_block(ctx):
        if ctx.index == 1:
            found.update(ctx.stats)
            assert [sorted(g.linears) for g in ctx.groups][0] == sorted(
                f"model.layers.1.self_attn.{p}_proj" for p in "qkv")
            assert ctx.groups[0].norm is ctx.block.input_layernorm
        return False

    spec = StatsSpec(hessian=True, absmax=True, sq_sum=True, keep_rows=50)
    calibrate_blocks(model, CALIB, on_block=on_block, spec=spec, batch_size=4)
    s = found["model.layers.1.self_attn.q_proj"]
    assert s.n == X.shape[0]
    torch.testing.assert_close(s.H, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.absmax, X.abs().amax(0))
    torch.testing.assert_close(s.sq_sum, X.square().sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.sample_rows(), X[:50])


@pytest.mark.parametrize("family", ["llama", "opt", "phi3"])
def test_every_linear_gets_the_statistics_of_its_own_input(family):
    """Linears of a group share one LinearStats; each still equals a hook on that very linear."""
    model = tiny_model(family)
    block = decoder_blocks(model)[0]
    names = {m: n for n, m in block.named_modules()}
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.setdefault(names[m], []).append(a[0].clone()))
             for m in block.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    with torch.no_grad():
        model(CALIB[:4]), model(CALIB[4:])
    for h in hooks:
        h.remove()
    found = {}

    def on_block(ctx):
        if ctx.index == 0:
            found.update({n[len(ctx.prefix) + 1:]: st for n, st in ctx.stats.items()})
            shared = [g.linears for g in ctx.groups if len(g.linears) > 1]
            assert all(len({id(ctx.stats[n]) for n in lin}) == 1 for lin in shared)
        return False

    calibrate_blocks(model, CALIB, on_block=on_block, spec=StatsSpec(hessian=True), batch_size=4)
    assert len(found) == len(inputs)
    for name, s in found.items():
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[name]])
        torch.testing.assert_close(s.H, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-5)


def test_a_rewritten_block_feeds_its_new_outputs_forward():
    model = tiny_model("llama")
    seen = {}

    def on_block(ctx):
        seen[ctx.index] = torch.cat(ctx.inputs)
        if ctx.index == 0:
            ctx.block.mlp.down_proj.weight.zero_()  # changes block 0's function
            return True
        return False

    calibrate_blocks(model, CALIB, on_block=on_block, batch_size=3)
    expected = _block_inputs_from_full_forward(model)  # the model with block 0 rewritten
    torch.testing.assert_close(seen[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [40, 256, 257, 576, 1025])  # one band; two bands, even and uneven; 3 and 5
def test_add_gram_is_the_scaled_running_gram_matrix(n):
    from slimlm.calib.stats import add_gram

    gen = torch.Generator().manual_seed(n)
    X1, X2 = torch.randn(50, n, generator=gen), torch.randn(70, n, generator=gen)
    H = torch.zeros(n, n)
    add_gram(H, X1, beta=0.0, alpha=2 / 50)
    add_gram(H, X2, beta=50 / 120, alpha=2 / 120)
    X = torch.cat([X1, X2]).double()
    torch.testing.assert_close(H.double(), 2 * X.t() @ X / 120, rtol=1e-5, atol=1e-5)


def test_calibrate_linears_visits_each_name_once_and_lm_head_last():
    model = tiny_model("llama")
    names = ["model.layers.1.mlp.down_proj", "lm_head", "model.layers.0.self_attn.q_proj"]
    seen = []

    def fix(name, stats):
        seen.append((name, stats.n, stats.sq_sum.shape[0]))

    calibrate_linears(model, CALIB, names, fix, spec=StatsSpec(sq_sum=True), batch_size=4)
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    tokens = CALIB.numel()
    assert seen == [("model.layers.0.self_attn.q_proj", tokens, hidden),
                    ("model.layers.1.mlp.down_proj", tokens, inter), ("lm_head", tokens, hidden)]  # fmt: skip


def _down_proj_calls(model):
    calls = []
    hooks = [b.mlp.down_proj.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
             for i, b in enumerate(decoder_blocks(model))]  # fmt: skip
    return calls, hooks


@pytest.mark.parametrize("changes", [True, False])
def test_a_block_known_to_change_skips_the_tail_of_its_statistics_pass(changes):
    """``rewrites``: statistics equal to a full pass; down_proj runs only in the re-runs (none after the last block)."""
    full, early = {}, {}

    def walk(found, rewrites):
        model = tiny_model("llama")
        calls, hooks = _down_proj_calls(model)

        def on_block(ctx):
            found.update({n: s.H.clone() for n, s in ctx.stats.items()})
            found[f"inputs {ctx.index}"] = torch.cat(ctx.inputs)
            if changes:
                ctx.block.mlp.down_proj.weight.mul_(0.5)
            return changes

        calibrate_blocks(model, CALIB, on_block=on_block, spec=StatsSpec(hessian=True), batch_size=4,
                         rewrites=rewrites)  # fmt: skip
        for h in hooks:
            h.remove()
        return calls

    n_batches, n_blocks = 2, 2
    assert walk(full, None) == [0] * n_batches * (1 + changes) + [1] * n_batches  # the last block: no re-run
    early_calls = walk(early, lambda ctx: True)
    assert early_calls == [0] * n_batches  # block 0's re-run only (the promise was wrong when not changes: rerun)
    assert full.keys() == early.keys() and len(full) == 7 * n_blocks + n_blocks
    for k in full:
        assert torch.equal(full[k], early[k]), k


def test_autocast_runs_the_block_matmuls_in_bfloat16():
    model = tiny_model("llama")
    dtypes = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: dtypes.setdefault(n, a[0].dtype) and None)
             for n, m in decoder_blocks(model)[0].named_modules() if n.endswith(("o_proj", "down_proj", "q_proj"))]
    calibrate_blocks(model, CALIB, on_block=lambda ctx: False, batch_size=4, autocast=torch.bfloat16)
    for h in hooks:
        h.remove()
    # attention and the gated product come out of bf16 matmuls; the norm output feeding q stays float32
    assert dtypes == {"self_attn.o_proj": torch.bfloat16, "mlp.down_proj": torch.bfloat16,
                      "self_attn.q_proj": torch.float32}  # fmt: skip
