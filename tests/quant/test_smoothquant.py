"""SmoothQuant: exact smoothing, beats naive W8A8 under outliers, configs, checkpoint round trip."""

import pytest
import torch

from slimlm.api import needs_calibration
from slimlm.errors import SlimlmError
from slimlm.io import load_compressed, save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import W8A8Linear, W8A8PerTensorLinear
from slimlm.quant.fold import fold_into_norm
from slimlm.quant.smoothquant import grouped_head_scales, smoothing_scales
from slimlm.quant.w8a8 import W8A8, SmoothQuant, apply_smoothquant, apply_w8a8, smooth_model
from tests.quant.outliers import CALIB, logits, outlier_llama, rel_err


def test_smoothing_scales_follow_the_paper():
    ax, aw = torch.tensor([4.0, 100.0, 0.0, 1.0]), torch.tensor([0.25, 0.5, 1.0, 0.0])
    s = smoothing_scales(ax, aw, alpha=0.5)
    assert torch.allclose(s[:2], torch.tensor([4.0, (100 / 0.5) ** 0.5]))
    assert torch.equal(s[2:], torch.ones(2))  # a dead channel (X or W all zero) is left alone
    assert torch.allclose(smoothing_scales(ax[:2], aw[:2], alpha=1.0), ax[:2])


def test_gemma_norm_folding_uses_one_plus_w():
    w, s = torch.tensor([0.5, -0.2]), torch.tensor([2.0, 4.0])
    w2, _ = fold_into_norm(w, None, s, offset=1.0)
    assert torch.allclose(1 + w2, (1 + w) / s)


def test_grouped_head_scales_are_shared_by_the_heads_of_a_kv_head():
    torch.manual_seed(0)
    s_o, s_v = grouped_head_scales(torch.rand(4 * 8) + 0.1, torch.rand(4 * 8) + 0.1, 0.5, n_heads=4,
                                   n_kv_heads=2, head_dim=8)  # fmt: skip
    assert s_v.shape == (16,) and s_o.shape == (32,)
    heads = s_o.reshape(4, 8)
    assert torch.equal(heads[0], heads[1]) and torch.equal(heads[2], heads[3])
    assert torch.equal(heads[0], s_v[:8]) and torch.equal(heads[2], s_v[8:])


@pytest.mark.parametrize("family", ["llama", "gemma", "opt", "qwen3", "gpt2"])
def test_smoothing_leaves_the_float_model_unchanged(family):
    model = tiny_model(family)
    before = logits(model)
    w0 = next(iter(model.parameters())).clone()
    n = smooth_model(model, CALIB, alpha=0.5)
    assert n >= 4  # every block's norm-fed groups (and o/down through v/up where that is exact)
    assert rel_err(logits(model), before) < 1e-5
    assert torch.equal(next(iter(model.parameters())), w0)  # embeddings untouched


def test_smoothing_moves_outliers_out_of_the_norm():
    model = outlier_llama()
    before = model.model.layers[0].input_layernorm.weight.clone()
    smooth_model(model, CALIB)
    after = model.model.layers[0].input_layernorm.weight
    assert after.abs().max() / after.abs().median() < before.abs().max() / before.abs().median() / 3


def test_smoothquant_beats_naive_w8a8_with_outlier_channels():
    base = logits(tiny_model("llama"))
    errs = {}
    methods = [("tensor", W8A8("tensor"), apply_w8a8), ("token", W8A8("token"), apply_w8a8),
               ("sq", SmoothQuant(alpha=0.5), apply_smoothquant),
               ("sq-tensor", SmoothQuant(alpha=0.5, act_granularity="tensor"), apply_smoothquant)]  # fmt: skip
    for name, cfg, handler in methods:
        model = outlier_llama()
        handler(model, cfg, CALIB)
        errs[name] = rel_err(logits(model), base)
    assert errs["sq"] < errs["token"] / 3 and errs["token"] < errs["tensor"]
    assert errs["sq-tensor"] < errs["tensor"] / 3


def test_handlers_swap_the_right_modules():
    model = tiny_model("llama")
    apply_smoothquant(model, SmoothQuant(act_granularity="tensor"), CALIB)
    kinds = [type(m) for m in model.modules() if isinstance(m, W8A8Linear)]
    assert len(kinds) == 14 and set(kinds) == {W8A8PerTensorLinear}
    assert all("smooth_scale" not in m.state_dict() for m in model.modules() if isinstance(m, W8A8Linear))
    model = tiny_model("llama")
    apply_w8a8(model, W8A8())
    assert type(model.model.layers[1].mlp.down_proj) is W8A8Linear


def test_configs_refuse_bad_values_and_missing_calibration():
    with pytest.raises(SlimlmError, match="token, tensor"):
        W8A8(act_granularity="channel")
    with pytest.raises(SlimlmError, match="alpha"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(SlimlmError, match="calibration"):
        apply_smoothquant(tiny_model("llama"), SmoothQuant(), None)
    assert needs_calibration([SmoothQuant()]) and not needs_calibration([W8A8()])


@pytest.mark.parametrize("act", ["token", "tensor"])
def test_checkpoint_round_trip_is_bit_identical(tmp_path, act):
    model = outlier_llama()
    apply_smoothquant(model, SmoothQuant(act_granularity=act), CALIB)
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "sq")
    loaded, _ = load_compressed(out)
    assert type(loaded.model.layers[0].self_attn.q_proj) is type(model.model.layers[0].self_attn.q_proj)
    assert torch.equal(logits(loaded), logits(model))
