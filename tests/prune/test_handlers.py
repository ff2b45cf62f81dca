import pytest
import torch
import torch.nn.functional as F

from slimlm.api import apply, apply_all
from slimlm.errors import SlimlmError
from slimlm.io import load_compressed, save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import QuantLinear, SparseLinear, SparseQuantLinear
from slimlm.prune import NM, Magnitude, SparseGPT, Unstructured, Wanda
from slimlm.prune.masks import is_nm
from slimlm.prune.patterns import n_pruned
from slimlm.quant import GPTQ, RTN
from slimlm.recipe import recipe_from_dict
from slimlm.targets import Targets, candidate_linears

_g = torch.Generator().manual_seed(0)
CALIB = torch.randint(3, 512, (8, 64), generator=_g)
HELD_OUT = torch.randint(3, 512, (4, 64), generator=_g)


def _pruned(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseQuantLinear))}


def _assert_every_matrix(model, pattern, sparsity, *, per_row=False):
    pruned = _pruned(model)
    assert set(pruned) == set(candidate_linears(model))  # every decoder-block linear, lm_head left alone
    for name, m in pruned.items():
        keep, W = m.keep_mask(), m.dequantized_weight()
        assert bool((W[~keep] == 0).all()), name
        if isinstance(pattern, NM):
            assert is_nm(keep, pattern.n, pattern.m), name
        elif per_row:
            assert ((~keep).sum(1) == n_pruned(keep.shape[1], sparsity)).all(), name
        else:
            assert int((~keep).sum()) == n_pruned(keep.numel(), sparsity), name


CONFIGS = [
    (Magnitude(sparsity=0.6), False), (Magnitude(pattern="2:4"), False), (Magnitude(scope="row"), True),
    (Wanda(sparsity=0.5), True), (Wanda(pattern="4:8"), False),
    (SparseGPT(sparsity=0.5, blocksize=32), False), (SparseGPT(pattern="2:4"), False),
    (SparseGPT(pattern=NM(4, 8), scheme="int4-g32"), False),
]  # fmt: skip


@pytest.mark.parametrize("config, per_row", CONFIGS, ids=lambda c: repr(c)[:60])
def test_exact_pattern_on_every_pruned_matrix_and_bit_identical_reload(tmp_path, config, per_row):
    model = tiny_model("llama")
    apply(model, config, CALIB)
    _assert_every_matrix(model, config.pattern, config.sparsity, per_row=per_row)
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "pruned")
    loaded, _ = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(loaded(HELD_OUT).logits, model(HELD_OUT).logits)
    for name, m in _pruned(loaded).items():
        assert torch.equal(m.keep_mask(), _pruned(model)[name].keep_mask())


def test_checkpoints_get_smaller(tmp_path):
    sizes = {}
    for name, config in [("dense", None), ("sparse", Magnitude()), ("joint", SparseGPT(scheme="int4-g32"))]:
        model = tiny_model("llama")
        if config is not None:
            apply(model, config, CALIB)
        out = save_compressed(model, tiny_tokenizer(), tmp_path / name)
        sizes[name] = (out / "model.safetensors").stat().st_size
    linears = sum(m.weight.numel() for m in candidate_linears(tiny_model("llama")).values()) * 4
    # 50% of float32 values + a 1-bit mask saves ~15/32 of the linears' bytes; int4 codes of half + mask much more
    assert sizes["dense"] - sizes["sparse"] > 0.45 * linears
    assert sizes["dense"] - sizes["joint"] > 0.85 * linears


def _kl(model, target):
    with torch.no_grad():
        logp = F.log_softmax(model(HELD_OUT).logits, -1)
    return float(F.kl_div(logp, F.log_softmax(target, -1), log_target=True, reduction="batchmean"))


def _loud_channel_model():
    """A tiny llama whose activations have loud channels, as real LLMs have (random tiny models do not)."""
    model = tiny_model("llama")
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.mul_(torch.exp(0.8 * torch.randn(norm.weight.shape, generator=g)))
    return model


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_and_sparsegpt_beat_magnitude_end_to_end(pattern):
    base = _loud_channel_model()
    with torch.no_grad():
        target = base(HELD_OUT).logits
    kls = {}
    for cls in (Magnitude, Wanda, SparseGPT):
        model = _loud_channel_model()
        apply(model, cls(pattern=pattern), CALIB)
        kls[cls.__name__] = _kl(model, target)
    assert kls["Wanda"] < kls["Magnitude"] and kls["SparseGPT"] < kls["Magnitude"], kls


def test_lm_head_on_request_and_conv1d_models():
    model = tiny_model("llama")
    apply(model, SparseGPT(targets=Targets(lm_head=True)), CALIB)
    assert isinstance(model.lm_head, SparseLinear) and model.lm_head.kept == model.lm_head.weight_storage()[0] // 2
    gpt2 = tiny_model("gpt2")
    apply(gpt2, Wanda(pattern="2:4"), CALIB)
    _assert_every_matrix(gpt2, NM(2, 4), 0.5)


def test_global_magnitude_prunes_the_set_to_the_level():
    model = tiny_model("llama")
    apply(model, Magnitude(sparsity=0.7, scope="global"))
    pruned = _pruned(model).values()
    total = sum(m.weight_storage()[0] for m in pruned)
    assert total - sum(m.kept for m in pruned) == n_pruned(total, 0.7)


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g32-sym", "int8-channel-sym"])
def test_prune_then_rtn_keeps_zeros_and_mask(scheme):
    model = tiny_model("llama")
    apply(model, Wanda(pattern="2:4"), CALIB)
    masks = {n: m.keep_mask() for n, m in _pruned(model).items()}
    apply(model, RTN(scheme=scheme))
    for name, m in _pruned(model).items():
        assert isinstance(m, SparseQuantLinear) and torch.equal(m.keep_mask(), masks[name])
        assert bool((m.dequantized_weight()[~masks[name]] == 0).all())


def test_prune_then_gptq_keeps_the_mask_and_beats_prune_then_rtn():
    base = _loud_channel_model()
    with torch.no_grad():
        target = base(HELD_OUT).logits
    kls = {}
    for name, quant in [("rtn", RTN(scheme="int3-g32")), ("gptq", GPTQ(scheme="int3-g32"))]:
        model = _loud_channel_model()
        apply_all(model, [Wanda(pattern="2:4"), quant], CALIB)
        _assert_every_matrix(model, NM(2, 4), 0.5)
        assert all(isinstance(m, SparseQuantLinear) for m in _pruned(model).values())
        kls[name] = _kl(model, target)
    assert kls["gptq"] < kls["rtn"], kls


def test_bad_input_one_line():
    model = tiny_model("llama")
    for config, words in [(lambda: Wanda(), "Wanda needs calibration"), (lambda: SparseGPT(), "SparseGPT needs")]:
        with pytest.raises(SlimlmError, match=words):
            apply(model, config())
    with pytest.raises(SlimlmError, match=r"sparsity must be a number in \[0, 1\)"):
        Magnitude(sparsity=1.0)
    with pytest.raises(SlimlmError, match="N \\(kept\\) must be < M"):
        Wanda(pattern="4:2")
    with pytest.raises(SlimlmError, match="M=5 of pattern 2:5 does not divide in_features 64; valid M: 2, 4, 8"):
        apply(model, Magnitude(pattern="2:5"))
    with pytest.raises(SlimlmError, match="q_proj: group_size 48 does not divide in_features 64"):
        apply(model, SparseGPT(scheme="int4-g48"), CALIB)
    assert not any(isinstance(m, SparseQuantLinear) for m in model.modules())  # nothing changed
    with pytest.raises(SlimlmError, match="scope must be one of"):
        Magnitude(scope="block")
    with pytest.raises(SlimlmError, match="joint mode rounds survivors to an int scheme|needs an int scheme"):
        SparseGPT(scheme="nf4")
    apply(model, RTN(scheme="int4-g32"))
    with pytest.raises(SlimlmError, match="already a QuantLinear; prune before quantizing"):
        apply(model, Magnitude())
    pruned = tiny_model("llama")
    apply(pruned, Magnitude())
    with pytest.raises(SlimlmError, match="needs an int scheme"):
        apply(pruned, RTN(scheme="nf4"))
    assert not any(isinstance(m, QuantLinear) for m in pruned.modules())  # refused before touching anything


def test_recipe_parses_pattern_shorthand_once():
    r = recipe_from_dict({"steps": [{"method": "wanda", "pattern": "2:4"},
                                    {"sparsegpt": {"sparsity": 0.6, "bits": 4, "group_size": 64}}]})  # fmt: skip
    assert r.steps[0].pattern == NM(2, 4) and r.steps[0].sparsity == 0.5
    assert r.steps[1].pattern == Unstructured() and r.steps[1].scheme.bits == 4
    with pytest.raises(SlimlmError, match="quote N:M patterns"):
        recipe_from_dict({"steps": [{"method": "wanda", "pattern": 124}]})


def test_info_shows_the_pattern_and_export_gives_a_stock_model_with_the_zeros(tmp_path):
    from transformers import AutoModelForCausalLM

    from slimlm.io import export_hf
    from slimlm.models.info import model_info

    model = tiny_model("llama")
    apply(model, Wanda(pattern="2:4"), CALIB)
    labels = {li.name: li.dtype for li in model_info(model).linears}
    assert labels["model.layers.0.mlp.down_proj"] == "float32 sparse 2:4" and labels["lm_head"] == "float32"
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "pruned")
    stock = AutoModelForCausalLM.from_pretrained(export_hf(out, tmp_path / "hf"))
    down = stock.model.layers[0].mlp.down_proj.weight
    assert is_nm(down != 0, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(stock(HELD_OUT).logits, model(HELD_OUT).logits, rtol=1e-5, atol=1e-5)
