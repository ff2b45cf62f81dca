"""A quantized lm_head on a tied model: its own scheme, the tie broken and recorded, the fast kernel, honest sizes."""

import json

import pytest
import torch
from torch import nn

from slimlm.api import apply, apply_all
from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, PerChannel, PerGroup, codec
from slimlm.io import load_compressed, save_compressed
from slimlm.kernels import require_fast, select_weight_kernel
from slimlm.kernels.int8 import CPU_LARGE_M
from slimlm.kernels.report import kernel_report
from slimlm.models import format_info, load_lazy, load_model, model_info
from slimlm.models.size import bytes_read_per_token, measure_size_light
from slimlm.models.tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer
from slimlm.nn import QuantLinear
from slimlm.pipelines.lazy import compress_lazy
from slimlm.prune import Magnitude
from slimlm.quant import GPTQ, RTN
from slimlm.quant.awq_handler import AWQ
from slimlm.quant.lazy import check_gptq_lazy
from slimlm.recipe import load_recipe, recipe_from_dict
from slimlm.targets import Targets

INT8_CHANNEL = IntScheme(8, symmetric=True, granularity=PerChannel())
INT4_G64 = IntScheme(4, granularity=PerGroup(64))
IDS = torch.arange(3, 35).reshape(1, 32)
CALIB = torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(0))


def _head8(model=None):
    model = tiny_model("llama") if model is None else model  # tie_word_embeddings=True
    apply_all(model, load_recipe("rtn-int4-g64-head8").steps)
    return model


def test_the_head_takes_its_own_scheme_from_the_tied_table_and_the_embedding_stays_float():
    model = tiny_model("llama")
    table = model.model.embed_tokens.weight.detach().clone()  # (V, d), also the head's weight
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _head8(model)
    head = model.lm_head
    assert isinstance(head, QuantLinear) and head.scheme == INT8_CHANNEL
    assert model.model.layers[0].mlp.down_proj.scheme == INT4_G64  # the step's scheme elsewhere
    assert torch.equal(head.dequantized_weight(), codec.dequantize(codec.quantize(table, INT8_CHANNEL)))
    emb = model.model.embed_tokens
    assert type(emb) is nn.Embedding and emb.weight.dtype == torch.float32 and torch.equal(emb.weight, table)


def _kernel_error(y, x, head, W=None):
    """Largest error of ``y`` against ``x @ W^T`` computed as the CPU int8 kernel does (``W``: the head's
    codes times scales unless given), in units of its rounding: below CPU_LARGE_M rows x and the scales in
    bfloat16, float32 sums, the output rounded to bfloat16 (2^-9 of |y|, and 2^-9 for the scale product);
    from CPU_LARGE_M rows (prefill) the same with float32 scales where the fixed rule (the suite's) multiplies
    in bfloat16 (slimlm.kernels.prefill), else float32 throughout (2^-20). Above 1: not what the kernel computes."""
    qw = codec.unpack(head.portable_tensors(), head.scheme, head.shape)
    codes, scale = qw.codes.double(), qw.scale.double().reshape(1, -1)  # (V, d), (1, V)
    if W is not None:
        codes, scale = W.double(), torch.ones_like(scale)
    if x.shape[0] < CPU_LARGE_M:
        xd, scale, unit = x.to(torch.bfloat16).double(), scale.to(torch.bfloat16).double(), 2.0**-8
    else:
        xd, unit = x.double(), 2.0**-20
    ref = (xd @ codes.T) * scale  # (T, V)
    slack = 2.0**-20 * (xd.abs() @ codes.abs().T) * scale.abs()  # float32 sums in another order
    return ((y.double() - ref).abs() / (unit * ref.abs() + slack + 1e-300)).max().item()  # 0/0: a zero row (padding)


@pytest.mark.parametrize("n_tokens", [8, 32])  # the int8 pack kernel (decode, few rows), the float path (prefill)
def test_logits_are_the_dequantized_head_times_the_hidden_state(n_tokens):
    model = _head8()
    ids = IDS[:, :n_tokens]
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0]  # (T, d), after the final norm
        logits = model(ids).logits[0]  # (T, V)
    assert _kernel_error(logits, hidden, model.lm_head) <= 1
    assert _kernel_error(logits, hidden, model.lm_head, W=model.model.embed_tokens.weight.detach()) > 1


def test_the_tie_is_broken_saved_and_reloaded_untied(tmp_path):
    model = _head8()
    assert model.config.tie_word_embeddings is False and "lm_head.weight" not in model.all_tied_weights_keys
    model.tie_weights()  # re-reads the config: must not hang the embedding on the quantized head
    assert isinstance(model.lm_head, QuantLinear) and not list(model.lm_head.parameters())
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "c")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded, _ = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
        x = torch.randn(2, 64)
        before = loaded.lm_head(x)
        loaded.model.embed_tokens.weight.add_(1.0)  # the head is its own tensor now
        assert torch.equal(loaded.lm_head(x), before)
    assert loaded.config.tie_word_embeddings is False


def test_a_checkpoint_that_still_says_tied_reloads_untied(tmp_path):
    """Checkpoints written before the tie was recorded: loading swaps the head shell in and unties then."""
    model = _head8()
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    loaded, _ = load_compressed(out)
    assert loaded.config.tie_word_embeddings is False and not list(loaded.lm_head.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_lazy_rtn_of_the_head_is_bit_identical_and_untied(tmp_path):
    src = save_tiny_model_dir(tmp_path / "m", "llama")
    steps = list(load_recipe("rtn-int4-g64-head8").steps)
    eager = _head8(load_model(src)[0])
    model, tok = load_lazy(src)
    out = compress_lazy(model, tok, steps, tmp_path / "lazy")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded, _ = load_compressed(out)
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.scheme == INT8_CHANNEL
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, eager(IDS).logits)


def test_bytes_read_per_token_counts_the_quantized_head_and_one_embedding_row():
    plain = tiny_model("llama")
    apply_all(plain, load_recipe("rtn-int4-g64").steps)  # head float, still the tied table
    head8 = _head8()
    V, d = 512, 64
    table, row, head = V * d * 4, d * 4, V * d + V * 2  # float32 table; int8 codes + one float16 scale per row
    assert head8.lm_head.weight_storage() == (V * d, head)
    assert bytes_read_per_token(plain) - bytes_read_per_token(head8) == table - head - row
    assert measure_size_light(head8)[1] - measure_size_light(plain)[1] == head  # stored once more


def test_the_head_runs_the_fast_int8_kernel():
    model = _head8()
    layers = {layer.layer: layer for layer in kernel_report(model).layers}
    assert layers["lm_head"].runs == "int8_weight_only_cpu" and layers["lm_head"].reason is None
    require_fast(model)


def test_info_lists_the_quantized_head_with_its_kernel_and_the_untied_embedding():
    info = model_info(_head8())
    assert not info.tied_embeddings
    assert ("lm_head", 64, 512, "int8-channel-sym") in info.linears
    head_line = next(line for line in format_info(info).splitlines() if line.strip().startswith("lm_head"))
    assert "int8-channel-sym" in head_line and "[int8_weight_only_cpu]" in head_line


def test_the_fast_int8_kernel_takes_the_built_in_models_head_shape():
    linear = nn.Linear(576, 49152, bias=False)  # SmolLM2-135M's vocabulary x hidden
    assert select_weight_kernel(INT8_CHANNEL, (49152, 576), torch.device("cpu")).name == "int8_weight_only_cpu"
    head = QuantLinear.from_linear(linear, INT8_CHANNEL)
    x = torch.randn(1, 576)
    with torch.no_grad():
        assert _kernel_error(head(x), x, head) <= 1
    assert kernel_report(nn.Sequential(head)).layers[0].reason is None


def test_gptq_and_awq_quantize_the_head_in_its_scheme():
    for config in (GPTQ(scheme="int4-g64", targets=Targets(lm_head="int8-channel-sym")),
                   AWQ(scheme="int4-g64", targets=Targets(lm_head="int8-channel-sym"), grid=4)):  # fmt: skip
        model = apply(tiny_model("llama"), config, CALIB)
        assert model.lm_head.scheme == INT8_CHANNEL and model.model.layers[1].self_attn.q_proj.scheme == INT4_G64
        assert model.config.tie_word_embeddings is False
    load_recipe("gptq-int4-g64-head8")


def test_lm_head_true_keeps_the_steps_scheme_and_the_head_scheme_wins_over_overrides():
    model = apply(tiny_model("llama"), RTN(scheme="int4-g64", targets=Targets(lm_head=True)))
    assert model.lm_head.scheme == INT4_G64
    model = apply(tiny_model("llama"), RTN(scheme="int4-g64", overrides=(("lm_head", "int4-g32"),),
                                           targets=Targets(lm_head="int8-channel-sym")))  # fmt: skip
    assert model.lm_head.scheme == INT8_CHANNEL


@pytest.mark.parametrize("make, message", [
    (lambda: Targets(lm_head="int9-channel"), "lm_head must be true, false or a scheme"),
    (lambda: Targets(lm_head=1), "lm_head must be true, false or a scheme"),
    (lambda: Magnitude(targets=Targets(lm_head="int8-channel-sym")), "taken only by weight-only quantization"),
    (lambda: recipe_from_dict({"steps": [{"method": "wanda", "lm_head": "int8-channel-sym"}]}),
     "taken only by weight-only quantization"),
    (lambda: GPTQ(targets=Targets(lm_head="nf4")), "GPTQ quantizes to IntScheme"),
    (lambda: AWQ(quantize=False, targets=Targets(lm_head="int8-channel-sym")), "quantize is false"),
    (lambda: check_gptq_lazy(GPTQ(targets=Targets(lm_head="int8-channel-sym"))), "with --lazy set lm_head: false"),
])  # fmt: skip
def test_bad_head_options_are_refused_in_one_line(make, message):
    with pytest.raises(SlimlmError, match=message) as e:
        make()
    assert "\n" not in str(e.value)
