import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimlm.errors import SlimlmError
from slimlm.models import (
    ADAPTERS,
    HeadLayout,
    TINY_FAMILIES,
    block_linears,
    decoder_blocks,
    get_adapter,
    head_layout,
    kv_bytes_per_token,
    tiny_model,
)
from slimlm.models.adapters import text_config


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


def _linears_in(block: nn.Module) -> set[str]:
    return {name for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def test_every_tiny_family_has_an_adapter():
    assert set(TINY_FAMILIES) <= set(ADAPTERS)
    assert {"llama", "mistral", "qwen2", "gemma", "gemma3_text", "gemma3", "opt", "gpt2"} <= set(ADAPTERS)


def test_adapter_finds_every_linear_in_order(family_model):
    family, model = family_model
    adapter = get_adapter(model)
    blocks = decoder_blocks(model)
    assert len(blocks) == text_config(model.config).num_hidden_layers == 2
    for block in blocks:
        found = block_linears(block, adapter)
        assert list(found) == list(adapter.linear_names())
        assert set(found) == _linears_in(block)
        kind = Conv1D if adapter.linear_kind == "conv1d" else nn.Linear
        assert all(isinstance(m, kind) for m in found.values())


def test_named_norms_and_paths_exist(family_model):
    _, model = family_model
    adapter = get_adapter(model)
    block = decoder_blocks(model)[0]
    for group in adapter.groups:
        if group.norm is not None:
            norm = block.get_submodule(group.norm)
            assert norm.weight.shape == (text_config(model.config).hidden_size,)
    assert model.get_submodule(adapter.lm_head) is model.get_output_embeddings()
    assert model.get_submodule(adapter.embeddings[0]) is model.get_input_embeddings()
    if adapter.final_norm:
        model.get_submodule(adapter.final_norm)


def test_norm_feeds_its_group(family_model):
    """The named norm's output is exactly the input each linear in its group sees."""
    _, model = family_model
    adapter = get_adapter(model)
    block = decoder_blocks(model)[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        block.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, a[0] if a else out))
        for g in adapter.groups
        for n in g.linears
    ]
    hooks += [
        block.get_submodule(g.norm).register_forward_hook(lambda m, a, out, n=g.norm: seen.__setitem__(n, out))
        for g in adapter.groups
        if g.norm
    ]
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 13, 17]]))
    for h in hooks:
        h.remove()
    for group in adapter.groups:
        first = seen[group.linears[0]]
        for name in group.linears[1:]:
            torch.testing.assert_close(seen[name], first)
        if group.norm:
            torch.testing.assert_close(seen[group.norm], first)


def test_head_layout_and_kv_bytes():
    llama = tiny_model("llama")
    assert head_layout(llama.config) == HeadLayout(4, 2, 16)
    assert kv_bytes_per_token(llama.config, 2) == 2 * 2 * 2 * 16 * 2
    gpt2 = tiny_model("gpt2")
    assert head_layout(gpt2.config) == HeadLayout(4, 4, 16)  # no GQA: kv heads = heads
    assert head_layout(tiny_model("gemma3").config).n_kv_heads == 2  # read from text_config


def test_post_norm_opt_has_no_feeding_norms():
    model = tiny_model("opt")
    model.config.do_layer_norm_before = False
    assert all(g.norm is None for g in get_adapter(model).groups)


def test_unknown_model_type_lists_supported():
    class Fake(nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

    with pytest.raises(SlimlmError, match="mamba.*supported: .*llama"):
        get_adapter(Fake())


def test_every_producer_feeds_a_group_without_a_norm():
    for adapter in ADAPTERS.values():
        no_norm = {name for g in adapter.groups if g.norm is None for name in g.linears}
        for consumer, producer in adapter.producers:
            assert consumer in no_norm, (adapter.family, consumer)
            assert producer.linear in adapter.linear_names(), (adapter.family, producer.linear)
            assert producer.through in ("channels", "heads") and producer.parts >= 1
            assert adapter.producer(consumer) is producer
        assert adapter.producer("not.a.linear") is None
