"""Structured pruning: pure functions, and pruned models equal their masked / layer-skipped originals."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.models.adapters import decoder_blocks
from slimlm.models.tiny import tiny_config
from slimlm.eval.quality import mean_nll as _mean_nll
from slimlm.prune import structured as S
from slimlm.prune import structured_search as B
from slimlm.prune.structured_config import PruneDepth, PruneWidth, Structured
from slimlm.prune.structured_handler import apply_prune_depth, apply_prune_width, apply_structured
from slimlm.prune.structured_scores import block_importance_scores, perplexity_scores, prune_width
from slimlm.prune.structured_search import search_width
from slimlm.prune.surgery import remove_layers

CALIB = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1))
# sliding window 32 < 40 tokens: gemma2/3 sliding layers really differ from full ones
FAMILIES = ["llama", "qwen2", "qwen3", "gemma2", "gemma3"]


def tiny(family: str = "llama", *, layers: int = 2, seed: int = 0):
    """A tiny model of ``family`` with ``layers`` decoder layers (layer_types re-derived)."""
    d = tiny_config(family).to_dict()
    (d["text_config"] if "text_config" in d else d).update(num_hidden_layers=layers, layer_types=None)
    config = type(tiny_config(family)).from_dict(d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _kept(orig: torch.Tensor, new: torch.Tensor, unit: int) -> list[int]:
    """Which blocks of ``unit`` rows of ``orig`` the pruned ``new`` holds, in order."""
    o = orig.reshape(-1, unit * orig.shape[1])  # (blocks, unit*in)
    return [int((o == row).all(1).nonzero()[0]) for row in new.reshape(-1, unit * new.shape[1])]


def _mask_like(orig_model, pruned_model, head_dim: int):
    """The original with every head / neuron the pruned model lost zeroed (o_proj and down_proj columns)."""
    masked = copy.deepcopy(orig_model)
    for b_orig, b_new, b_mask in zip(decoder_blocks(orig_model), decoder_blocks(pruned_model), decoder_blocks(masked)):
        heads = _kept(b_orig.self_attn.q_proj.weight, b_new.self_attn.q_proj.weight, head_dim)
        gone = [h for h in range(b_orig.self_attn.q_proj.out_features // head_dim) if h not in heads]
        for h in gone:
            b_mask.self_attn.o_proj.weight.data[:, h * head_dim : (h + 1) * head_dim] = 0
        neurons = _kept(b_orig.mlp.gate_proj.weight, b_new.mlp.gate_proj.weight, 1)
        dead = [j for j in range(b_orig.mlp.gate_proj.out_features) if j not in neurons]
        b_mask.mlp.down_proj.weight.data[:, dead] = 0
    return masked


# ---------------------------------------------------------------- pure functions


def test_keep_top_and_drop_lowest_break_ties_by_index():
    s = torch.tensor([1.0, 3.0, 3.0, 0.5, 2.0])
    assert S.keep_top(s, 3).tolist() == [1, 2, 4]
    assert S.drop_lowest(s, 2) == [0, 3]
    assert S.keep_top(torch.ones(4), 2).tolist() == [0, 1] and S.drop_lowest(torch.ones(4), 1) == [3]


def test_select_heads_respects_groups():
    scores = torch.tensor([5.0, 1.0, 2.0, 9.0, 0.0, 3.0])  # 2 KV groups of 3 query heads: [5,1,2] [9,0,3]
    q, kv = S.select_heads(scores, 2, remove_per_group=1)
    assert q.tolist() == [0, 2, 3, 5] and kv.tolist() == [0, 1]
    q, kv = S.select_heads(scores, 2, remove_groups=1)  # group sums 8 < 12
    assert q.tolist() == [3, 4, 5] and kv.tolist() == [1]
    assert S.head_rows(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    with pytest.raises(ValueError):
        S.select_heads(scores, 2, remove_per_group=3)


def test_importance_reads_the_runner_statistics():
    x = torch.randn(10, 6)  # 10 tokens, 2 heads of dim 3
    ms = S.mean_square(x.square().sum(0), 10)
    assert torch.allclose(S.head_importance(ms, 3), x.reshape(10, 2, 3).square().sum(-1).mean(0))
    y = torch.randn(7, 8)
    assert torch.allclose(S.cosine_per_token(y, 2 * y), torch.ones(7))
    assert S.block_importance(7.0, 7) == 0.0 and S.block_importance(-7.0, 7) == 2.0


def test_width_plan_hits_the_target_within_one_neuron():
    # 6 query heads in 2 KV groups: attention holds 6*1000 + 2*500 = 7000 of a 20000 block; target 30%
    units = dict(head_params=1000, kv_params=500, neuron_params=30, block_params=20000)
    per_group, groups, neurons = B.width_plan(6000.0, n_heads=6, n_kv=2, attention="heads", **units)
    assert (per_group, groups) == (1, 0) and abs(2 * 1000 + neurons * 30 - 6000) <= 15  # 2/7 of attention
    per_group, groups, neurons = B.width_plan(6000.0, n_heads=6, n_kv=2, **units)  # default: whole groups
    assert (per_group, groups) == (0, 1) and abs(3500 + neurons * 30 - 6000) <= 15
    assert B.width_plan(6000.0, n_heads=6, n_kv=2, attention="none", **units) == (0, 0, 200)
    # one head per group (MHA): a "heads" step is a whole group
    assert B.width_plan(9000.0, n_heads=4, n_kv=4, attention="heads", **units)[:2] == (0, 2)  # 3000 of 6000 ~ 45%


# ---------------------------------------------------------------- width


def test_width_pruning_gives_expected_shapes_and_config():
    model = tiny("llama")  # hidden 64, 4 heads / 2 KV heads of 16, intermediate 128
    apply_prune_width(model, PruneWidth(heads=2, neurons=32), CALIB)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 2, 16, 96)
    for block in decoder_blocks(model):
        a, m = block.self_attn, block.mlp
        assert a.q_proj.weight.shape == (32, 64) and a.k_proj.weight.shape == (32, 64) and a.o_proj.weight.shape == (64, 32)
        assert m.gate_proj.weight.shape == (96, 64) and m.up_proj.weight.shape == (96, 64) and m.down_proj.weight.shape == (64, 96)
        assert a.num_key_value_groups == 1
    assert logits(model).isfinite().all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", [PruneWidth(heads=0.5, neurons=0.25), PruneWidth(groups=1, neurons=17)],
                         ids=["heads", "groups"])
def test_width_pruned_model_equals_masked_original(family, cfg):
    model = tiny(family)
    orig = copy.deepcopy(model)
    apply_prune_width(model, cfg, CALIB)
    masked = _mask_like(orig, model, model.config.get_text_config().head_dim)
    assert not torch.allclose(logits(masked), logits(orig), atol=1e-3)  # something was removed
    torch.testing.assert_close(logits(model), logits(masked), atol=1e-5, rtol=1e-5)
    gen = dict(max_new_tokens=6, do_sample=False)  # with the KV cache
    assert torch.equal(model.generate(IDS[:1, :8], **gen), masked.generate(IDS[:1, :8], **gen))


def test_width_removes_the_least_important_units():
    model = tiny("llama")
    blocks = decoder_blocks(model)
    for b in blocks:  # dead units: KV group 1 (v rows 16..31) and neurons 0..9 contribute nothing
        b.self_attn.v_proj.weight.data[16:32] = 0
        b.mlp.up_proj.weight.data[:10] = 0
    before = logits(model)
    apply_prune_width(model, PruneWidth(groups=1, neurons=10), CALIB)
    for b in decoder_blocks(model):
        assert b.self_attn.k_proj.out_features == 16 and b.mlp.down_proj.in_features == 118
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- depth


def _skip(model, i: int):
    """Make block ``i`` return its input (a forward hook); the handle removes it."""
    def hook(_m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    return decoder_blocks(model)[i].register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_dropping_layers_equals_skipping_them(family):
    model = tiny(family, layers=4)
    orig = copy.deepcopy(model)
    handles = [_skip(orig, 1), _skip(orig, 2)]
    remove_layers(model, [1, 2])
    cfg = model.config.get_text_config()
    assert cfg.num_hidden_layers == 2 and len(decoder_blocks(model)) == 2
    assert [b.self_attn.layer_idx for b in decoder_blocks(model)] == [0, 1]
    if family == "gemma2":  # sliding, full, sliding, full -> the kept layers' kinds
        assert cfg.layer_types == ["sliding_attention", "full_attention"]
    torch.testing.assert_close(logits(model), logits(orig), atol=1e-6, rtol=1e-6)
    gen = dict(max_new_tokens=6, do_sample=False)  # the KV cache is indexed by the renumbered layer_idx
    assert torch.equal(model.generate(IDS[:1, :8], **gen), orig.generate(IDS[:1, :8], **gen))
    for h in handles:
        h.remove()


@pytest.mark.parametrize("metric", ["block_importance", "perplexity"])
def test_depth_drops_the_layer_that_does_nothing(metric):
    model = tiny("llama", layers=4)
    idle = decoder_blocks(model)[2]  # zero residual branches: output == input
    idle.self_attn.o_proj.weight.data.zero_()
    idle.mlp.down_proj.weight.data.zero_()
    before = logits(model)
    scores = (block_importance_scores(model, CALIB) if metric == "block_importance"
              else perplexity_scores(model, CALIB, samples=2))  # fmt: skip
    assert scores.argmin() == 2 and abs(scores[2]) < 1e-6
    apply_prune_depth(model, PruneDepth(layers=1, metric=metric, ppl_samples=2), CALIB)
    assert model.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- parameter targets


@pytest.mark.parametrize("mode", ["width", "depth"])
@pytest.mark.parametrize("params", [0.1, 0.3])
def test_structured_removes_the_asked_fraction_of_total_parameters(mode, params):
    model = tiny("llama", layers=6)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields the tied embedding once
    block = sum(p.numel() for p in decoder_blocks(model)[0].parameters())
    apply_structured(model, Structured(params=params, mode=mode), CALIB)
    removed = total - sum(p.numel() for p in model.parameters())
    step = block / 2 if mode == "depth" else 6 * 3 * 64 / 2  # half a layer / half a neuron in each of 6 layers
    assert abs(removed - params * total) <= step
    assert model.config.num_hidden_layers == (6 if mode == "width" else 6 - round(params * total / block))
    assert logits(model).isfinite().all()


def test_width_search_keeps_the_split_with_the_lowest_calibration_loss():
    # Random tiny models say nothing about which split is better (removing heads can even lower
    # their loss), so this checks the mechanics; benchmarks/structured.py shows the quality.
    model = tiny("llama")
    before = logits(model)
    # 20% of 106,880 parameters over 2 layers: 56 neurons, or one whole KV group (6,144) + 24
    # neurons, or one query head per group (4,096) + 34 neurons
    plans = B.width_candidates(0.2 * 106_880 / 2, n_heads=4, n_kv=2, head_params=2048, kv_params=2048,
                               neuron_params=192)  # fmt: skip
    assert plans == [(0, 0, 56), (0, 1, 24), (1, 0, 34)]
    losses = [_mean_nll(prune_width(copy.deepcopy(model), p, CALIB), CALIB, 4) for p in plans]
    chosen = search_width(model, plans, CALIB, samples=4, batch_size=4)
    assert torch.equal(logits(model), before)  # candidates were tried on copies
    assert chosen == plans[losses.index(min(losses))] and len(set(losses)) == 3
    shapes = {(0, 0, 56): (4, 2, 72), (0, 1, 24): (2, 1, 104), (1, 0, 34): (2, 2, 94)}  # heads, KV heads, neurons
    apply_structured(model, Structured(params=0.2, mode="width"), CALIB)  # attention="search", the default
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == shapes[chosen]
    for attention, plan in [("none", plans[0]), ("groups", plans[1]), ("heads", plans[2])]:
        cfg = apply_structured(tiny("llama"), Structured(params=0.2, mode="width", attention=attention), CALIB).config
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == shapes[plan]
