"""embedding: shared: a tied model's input embedding reads the quantized lm_head's table (stored once)."""

import copy
import json

import pytest
import torch
from safetensors import safe_open

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.io import load_compressed, save_compressed
from slimlm.models.info import format_info, model_info
from slimlm.models.size import bytes_read_per_token, measure_size
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import SharedQuantEmbedding, float_embeddings
from slimlm.pipelines.lazy import check_lazy
from slimlm.prune import Magnitude
from slimlm.quant import GPTQ, RTN
from slimlm.recipe import config_from_dict
from slimlm.targets import Targets

IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(0))
SHARED = Targets(lm_head="int8-channel-sym", embedding="shared")
TABLE = 512 * 64 * 4  # the tiny llama's float32 embedding table, in bytes


def _rtn(targets=SHARED, family="llama"):
    model = tiny_model(family)
    apply(model, RTN(scheme="int4-g32", targets=targets))
    return model


@torch.no_grad()
def _logits(model):
    return model(IDS).logits


def test_embedding_reads_the_head_and_the_model_equals_its_dequantized_table():
    model = _rtn()
    emb = model.model.embed_tokens
    assert isinstance(emb, SharedQuantEmbedding) and emb.head is model.lm_head
    assert torch.equal(emb(IDS), model.lm_head.dequantized_weight()[IDS])
    float_table = float_embeddings(copy.deepcopy(model))  # the same model with the table dequantized, in float
    assert float_table == ["model.embed_tokens"]
    floated = copy.deepcopy(model)
    float_embeddings(floated)
    assert torch.equal(_logits(model), _logits(floated))


def test_stored_once_in_memory_in_the_size_and_per_token_read():
    shared, untied = _rtn(), _rtn(Targets(lm_head="int8-channel-sym"))
    assert measure_size(untied).model_bytes - measure_size(shared).model_bytes == TABLE
    assert measure_size(shared).params == measure_size(untied).params - 512 * 64  # the table's weights once
    head = measure_size(shared).model_bytes - measure_size(_rtn(Targets())).model_bytes + TABLE  # packed head
    assert head == 512 * 64 + 512 * 2  # int8 codes + one float16 scale per row
    # a decode step reads the head's table once; untied it also reads one float row of the embedding
    assert bytes_read_per_token(untied) - bytes_read_per_token(shared) == 64 * 4
    info = model_info(shared)
    assert info.shared_table == "model.embed_tokens reads lm_head" and info.tied_embeddings
    assert "one quantized table (model.embed_tokens reads lm_head)" in format_info(info)
    assert "model.embed_tokens" not in [li.name for li in info.linears]


def test_checkpoint_round_trip_is_bit_identical_and_stores_the_table_once(tmp_path):
    model = _rtn()
    ckpt = save_compressed(model, tiny_tokenizer(), tmp_path / "shared")
    untied = save_compressed(_rtn(Targets(lm_head="int8-channel-sym")), tiny_tokenizer(), tmp_path / "untied")
    entry = json.loads((ckpt / "slimlm_manifest.json").read_text())["modules"]["model.embed_tokens"]
    assert entry["type"] == "SharedQuantEmbedding" and entry["reads"] == "lm_head"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("model.embed_tokens") for k in f.keys())
    saved = (untied / "model.safetensors").stat().st_size - (ckpt / "model.safetensors").stat().st_size
    assert 0 <= saved - TABLE < 512  # the float table, plus its entry in the header
    loaded, _ = load_compressed(ckpt)
    assert loaded.model.embed_tokens.head is loaded.lm_head  # one storage after load
    assert torch.equal(_logits(loaded), _logits(model))
    assert measure_size(loaded, model_dir=ckpt).model_bytes == measure_size(model).model_bytes


def test_a_shell_naming_a_missing_or_different_head_is_refused():
    model = _rtn()
    entry = model.model.embed_tokens.manifest_entry()
    shell = SharedQuantEmbedding.from_manifest({**entry, "reads": "model.nope"}, dtype=torch.float32)
    with pytest.raises(SlimlmError, match="reads 'model.nope', which the model does not have"):
        shell.link(model)
    shell = SharedQuantEmbedding.from_manifest({**entry, "reads": "model.layers.0.mlp.down_proj"}, dtype=torch.float32)
    with pytest.raises(SlimlmError, match="does not match model.layers.0.mlp.down_proj"):
        shell.link(model)


def test_gptq_shares_its_solved_head():
    model = tiny_model("llama")
    apply(model, GPTQ(scheme="int4-g32", targets=SHARED), calib=CALIB)
    assert model.model.embed_tokens.head is model.lm_head
    assert torch.equal(model.model.embed_tokens(IDS), model.lm_head.dequantized_weight()[IDS])


def test_recipe_key_and_refusals():
    step = config_from_dict({"method": "rtn", "scheme": "int4-g32", "lm_head": "int8-channel-sym",
                             "embedding": "shared"})  # fmt: skip
    assert step.targets.embedding == "shared"
    with pytest.raises(SlimlmError, match="embedding must be one of float, shared"):
        Targets(lm_head=True, embedding="int8")
    with pytest.raises(SlimlmError, match="set lm_head too"):
        Targets(embedding="shared")
    with pytest.raises(SlimlmError, match="taken only by weight-only quantization steps"):
        Magnitude(sparsity=0.5, targets=Targets(lm_head=True, embedding="shared"))
    with pytest.raises(SlimlmError, match="without --lazy"):
        check_lazy([RTN(targets=SHARED)])


@pytest.mark.parametrize("family,targets,match", [
    ("phi3", SHARED, "separate tables"),  # untied
    ("gemma3_text", SHARED, "Gemma3TextScaledWordEmbedding"),  # the lookup scales its rows
    ("llama", Targets(lm_head="nf4", embedding="shared"), "NF4Scheme keeps no per-row scales"),
    ("llama", Targets(lm_head=True, exclude=("lm_head",), embedding="shared"), "exclude leaves out"),
])  # fmt: skip
def test_refused_before_anything_changes(family, targets, match):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimlmError, match=match):
        apply(model, RTN(scheme="int4-g32", targets=targets))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
