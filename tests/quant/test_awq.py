import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.calib import StatsSpec, calibrate_blocks
from slimlm.errors import SlimlmError
from slimlm.methods import METHOD_OF
from slimlm.formats import IntScheme, NF4Scheme, PerGroup, dequantize, fake_quantize, quantize
from slimlm.models.tiny import tiny_config, tiny_model
from slimlm.nn import QuantLinear
from slimlm.quant import RTN, apply_rtn
from slimlm.quant.awq import awq_clip_quantize, awq_scale, awq_search_scale, output_error
from slimlm.quant.awq_handler import AWQ, apply_awq, folder
from slimlm.quant.fold import scale_inputs

CALIB = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(1))
INT3, INT4 = IntScheme(3, granularity=PerGroup(16)), IntScheme(4, granularity=PerGroup(16))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _llama_without_gqa():
    cfg = tiny_config("llama")
    cfg.num_key_value_heads = cfg.num_attention_heads  # v_proj out == o_proj in: o_proj can be scaled too
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _with_outliers(model, channels=(3, 17, 40), factor=30.0):
    """Give the attention input a few large channels (as real LLMs have) without changing the function:
    the norm's output channel is multiplied by ``factor`` and q/k/v's columns divided by it."""
    for block in model.model.layers:
        block.input_layernorm.weight.data[list(channels)] *= factor
        for p in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
            p.weight.data[:, list(channels)] /= factor
    return model


MODELS = {"llama": lambda: tiny_model("llama"), "llama-mha": _llama_without_gqa, "gemma": lambda: tiny_model("gemma"),
          "opt": lambda: tiny_model("opt"), "gpt2": lambda: tiny_model("gpt2"), "phi3": lambda: tiny_model("phi3")}


@pytest.mark.parametrize("name", list(MODELS))
def test_folding_random_scales_leaves_the_float_model_unchanged(name):
    model = MODELS[name]()
    before = _logits(model)
    folded = []

    def on_block(ctx):
        gen = torch.Generator().manual_seed(ctx.index)
        for group in ctx.groups:
            fold = folder(ctx, group)
            if fold is None:
                continue
            n_in = ctx.stats[next(iter(group.linears))].in_features
            s = torch.rand(n_in, generator=gen) * 4 + 0.25  # far from 1
            fold(s)
            for lin in group.linears.values():
                scale_inputs(lin, s)
            folded.append(next(iter(group.linears)).split(".", 3)[-1])
        return True

    calibrate_blocks(model, CALIB[:2], on_block=on_block)
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)
    # per block: every group but o_proj under GQA (llama, gemma, phi3) and GPT-2's mlp.c_proj (reads GELU)
    per_block = {"llama": 3, "llama-mha": 4, "gemma": 3, "opt": 4, "gpt2": 3, "phi3": 3}[name]
    assert len(folded) == 2 * per_block


@pytest.mark.parametrize("name", ["llama", "gemma", "opt", "gpt2"])
def test_awq_without_quantizing_only_folds_exact_scales(name):
    model = _with_outliers(MODELS[name]()) if name == "llama" else MODELS[name]()
    before = _logits(model)
    w0 = [p.detach().clone() for p in model.parameters()]
    apply_awq(model, AWQ(scheme=INT3, quantize=False), CALIB)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert any(not torch.equal(a, b) for a, b in zip(w0, model.parameters()))  # scales were found and folded
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)


def test_alpha_zero_is_rtn():
    W = torch.randn(32, 64)
    assert torch.equal(awq_scale(torch.rand(64) * 10, 0.0), torch.ones(64))
    s, alpha, errors = awq_search_scale([W], torch.eye(64), torch.rand(64), INT4, grid=1)
    assert alpha == 0.0 and torch.equal(s, torch.ones(64))
    assert errors[0] == pytest.approx(output_error(W - fake_quantize(W, INT4), torch.eye(64)).item())
    model, ref = tiny_model("llama"), tiny_model("llama")
    apply_awq(model, AWQ(scheme=INT4, grid=1, clip_search=False), CALIB)
    apply_rtn(ref, RTN(scheme=INT4))
    for (n, a), b in zip(model.named_modules(), ref.modules()):
        if isinstance(a, QuantLinear):
            assert torch.equal(a.dequantized_weight(), b.dequantized_weight()), n


def _qkv_group_errors(model, scheme):
    """Output errors of layer 1's q/k/v on their calibration inputs: RTN, AWQ scaling, AWQ scaling + clipping."""
    out = {}

    def on_block(ctx):
        if ctx.index != 1:
            return False
        names = list(ctx.groups[0].linears)
        X = ctx.stats[names[0]].sample_rows()  # (rows, in): every calibration row
        Ws = [ctx.groups[0].linears[n].weight.detach() for n in names]
        H = X.t() @ X
        s, alpha, _ = awq_search_scale(Ws, ctx.stats[names[0]].H, X.abs().mean(0), scheme)
        Hs = H / s[:, None] / s[None, :]
        out["alpha"] = alpha
        out["rtn"] = sum(((X @ W.t() - X @ fake_quantize(W, scheme).t()) ** 2).sum().item() for W in Ws)
        out["awq"] = sum(((X @ W.t() - (X / s) @ fake_quantize(W * s, scheme).t()) ** 2).sum().item() for W in Ws)
        out["awq+clip"] = sum(((X @ W.t() - (X / s) @ dequantize(awq_clip_quantize(W * s, Hs, scheme)).t()) ** 2)
                              .sum().item() for W in Ws)  # fmt: skip
        return False

    calibrate_blocks(model, CALIB, on_block=on_block, spec=StatsSpec(hessian=True, keep_rows=10**6))
    return out


@pytest.mark.parametrize("scheme", [INT3, INT4], ids=["int3-g16", "int4-g16"])
def test_awq_beats_rtn_on_salient_channels(scheme):
    err = _qkv_group_errors(_with_outliers(tiny_model("llama")), scheme)
    assert err["alpha"] > 0
    assert err["awq"] < 0.8 * err["rtn"]  # the salient channels are protected
    assert err["awq+clip"] <= err["awq"] * 1.01


def test_clip_search_never_worse_per_group_and_stores_the_clipped_range():
    W = torch.randn(16, 64)
    X = torch.randn(256, 64)
    H = X.t() @ X
    qw = awq_clip_quantize(W, H, INT3)
    assert qw.codes.shape == W.shape and int(qw.codes.max()) <= 7
    Wq, Wr = dequantize(qw), fake_quantize(W, INT3)
    assert output_error(W - Wq, H) < output_error(W - Wr, H)
    rtn_scale = quantize(W, INT3).scale
    assert (qw.scale <= rtn_scale).all() and (qw.scale < rtn_scale).any()  # some ranges were shrunk


def test_handler_swaps_quant_linears_and_beats_rtn_at_int3():
    base = _logits(tiny_model("llama"))
    model, ref = tiny_model("llama"), tiny_model("llama")
    apply_awq(model, AWQ(scheme=INT3), CALIB)
    apply_rtn(ref, RTN(scheme=INT3))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert model.model.layers[0].mlp.down_proj.scheme == INT3
    assert (_logits(model) - base).norm() < (_logits(ref) - base).norm()


def test_refusals():
    with pytest.raises(SlimlmError, match="calibration"):
        apply_awq(tiny_model("llama"), AWQ(), None)
    with pytest.raises(SlimlmError, match="clip_search=False"):
        AWQ(scheme=NF4Scheme())
    with pytest.raises(SlimlmError, match="grid"):
        AWQ(grid=0)
    with pytest.raises(SlimlmError, match="does not divide in_features 64"):
        apply_awq(tiny_model("llama"), AWQ(scheme="int4-g48"), CALIB)
    assert METHOD_OF[AWQ].needs_calibration(AWQ()) and AWQ(scheme=NF4Scheme(), clip_search=False).scheme == NF4Scheme()
