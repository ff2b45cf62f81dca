import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.api import apply
from slimlm.calib import StatsSpec, calibrate_blocks
from slimlm.pipelines.lazy import check_lazy, compress_lazy
from slimlm.errors import SlimlmError
from slimlm.io import INDEX, MANIFEST, WEIGHTS, ShardWriter, export_hf, load_compressed, save_compressed
from slimlm.models import decoder_blocks, lazy_blocks, load_lazy, load_model
from slimlm.models.tiny import save_tiny_model_dir, tiny_config, tiny_tokenizer
from slimlm.quant import RTN
from slimlm.quant.awq_handler import AWQ
from slimlm.quant.gptq_handler import GPTQ
from slimlm.quant.mixed_handler import MixedPrecision
from slimlm.quant.qat import QAT
from slimlm.targets import Targets

CALIB = torch.randint(3, 512, (6, 24), generator=torch.Generator().manual_seed(0))
IDS = torch.arange(3, 35).reshape(1, 32)
MIXED = MixedPrecision(budget_bpw=4.5, candidates=("int3-g32", "int4-g32", "int8-channel-sym"), sensitivity="hessian")
CONFIGS = {"rtn": RTN(scheme="int4-g16"), "gptq": GPTQ(scheme="int4-g16"), "awq": AWQ(scheme="int4-g16", grid=5),
           "mixed": MIXED, "mixed-gptq": dataclasses.replace(MIXED, quantizer="gptq")}


def _deep_dir(path, layers=6, **save_kw):
    """A tiny llama with ``layers`` blocks (tied embeddings) saved as an HF directory."""
    config = tiny_config("llama")
    config.num_hidden_layers = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, **save_kw)
    tiny_tokenizer().save_pretrained(path)
    return path


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _eager_and_lazy(src, config, out):
    eager, _ = load_model(src)
    apply(eager, config, CALIB)
    model, tok = load_lazy(src)
    compress_lazy(model, tok, [config], out, calib=CALIB)
    return eager, load_compressed(out)[0], model


@pytest.mark.parametrize("family, method", [("llama", "rtn"), ("llama", "gptq"), ("llama", "awq"),
                                            ("llama", "mixed"), ("llama", "mixed-gptq"), ("gpt2", "gptq"),
                                            ("opt", "awq"),
                                            ("phi3", "gptq"), ("gemma3", "gptq")])
def test_lazy_compression_is_bit_identical_to_the_eager_path(tmp_path, family, method):
    src = save_tiny_model_dir(tmp_path / "m", family)
    eager, loaded, husk = _eager_and_lazy(src, CONFIGS[method], tmp_path / "c")
    assert torch.equal(_logits(loaded), _logits(eager))
    assert lazy_blocks(husk).peak_live == 1
    with pytest.raises(SlimlmError, match="freed"):  # the compressed blocks left memory as they were written
        husk(IDS)


def test_sharded_source_and_sharded_checkpoint(tmp_path):
    src = _deep_dir(tmp_path / "m", layers=4, max_shard_size="100KB")
    assert (src / INDEX).is_file() and not (src / WEIGHTS).exists()
    eager, loaded, _ = _eager_and_lazy(src, CONFIGS["gptq"], tmp_path / "c")
    assert torch.equal(_logits(loaded), _logits(eager))
    out = tmp_path / "c"
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert shards == [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
    assert weight_map["model.layers.2.mlp.down_proj.codes"] == shards[2]
    assert weight_map["model.embed_tokens.weight"] == shards[-1] and "lm_head.weight" not in weight_map  # tied
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "slimlm.checkpoint/1" and len(manifest["modules"]) == 4 * 7


def test_single_file_and_sharded_layouts_load_identically_and_export(tmp_path):
    src = save_tiny_model_dir(tmp_path / "m", "llama")
    eager, _ = load_model(src)
    apply(eager, RTN(scheme="int4-g16"), None)
    single = save_compressed(eager, tiny_tokenizer(), tmp_path / "single")
    model, tok = load_lazy(src)
    sharded = compress_lazy(model, tok, [RTN(scheme="int4-g16")], tmp_path / "sharded")
    assert torch.equal(_logits(load_compressed(single)[0]), _logits(load_compressed(sharded)[0]))
    stock = AutoModelForCausalLM.from_pretrained(export_hf(sharded, tmp_path / "hf"))
    torch.testing.assert_close(_logits(stock), _logits(eager), rtol=1e-4, atol=1e-4)


def test_damaged_sharded_checkpoints_get_clear_errors(tmp_path):
    model, tok = load_lazy(save_tiny_model_dir(tmp_path / "m", "llama"))
    out = compress_lazy(model, tok, [RTN(scheme="int4-g16")], tmp_path / "c")
    (out / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(SlimlmError, match="model-00002-of-00003.safetensors is missing"):
        load_compressed(out)
    (out / INDEX).write_text("{not json")
    with pytest.raises(SlimlmError, match="damaged"):
        load_compressed(out)


def test_only_one_block_is_in_memory_while_a_method_works(tmp_path):
    src = _deep_dir(tmp_path / "m")
    model, tok = load_lazy(src)
    blocks = decoder_blocks(model)
    assert all(p.is_meta for p in blocks.parameters())
    live, written = [], []

    def on_block(ctx):
        live.append([i for i, b in enumerate(blocks) if any(not p.is_meta for p in b.parameters())])
        ctx.block.mlp.down_proj.weight.mul_(0.5)  # a rewrite: must reach the sink
        return True

    writer = ShardWriter(tmp_path, blocks_prefix="model.layers", n_blocks=len(blocks))
    lazy_blocks(model).sink = lambda i, block: (written.append(i), writer.write_block(i, block))
    report = calibrate_blocks(model, CALIB, on_block=on_block, spec=StatsSpec(hessian=True), batch_size=4)
    assert live == [[i] for i in range(6)] and written == list(range(6)) and report.lazy


def test_peak_tracked_memory_is_one_block_not_the_model(tmp_path):
    src = _deep_dir(tmp_path / "m")
    reports = {}

    def run(model, key):
        reports[key] = calibrate_blocks(model, CALIB, on_block=lambda ctx: False, spec=StatsSpec(hessian=True),
                                        batch_size=4)  # fmt: skip

    eager = load_model(src)[0]
    run(eager, "eager")
    run(load_lazy(src)[0], "lazy")  # nothing rewritten: blocks go back to disk without a sink
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    block = nbytes(decoder_blocks(eager)[0].parameters())
    rest = nbytes(eager.parameters()) - 6 * block  # embeddings (tied to lm_head), final norm
    hessians = 4 * (6 * 64 * 64 + 128 * 128)  # one block's linears: 6 read 64 features, down_proj 128
    acts = reports["lazy"].peak_activation_mb * 1e6
    assert reports["lazy"].peak_tracked_mb * 1e6 <= rest + block + acts + hessians + 4096  # + RoPE tables
    assert reports["eager"].peak_tracked_mb - reports["lazy"].peak_tracked_mb >= 5 * block / 1e6
    assert reports["lazy"].peak_rss_mb > 0


def test_a_rewrite_without_a_sink_is_refused_not_lost(tmp_path):
    model, _ = load_lazy(save_tiny_model_dir(tmp_path / "m", "llama"))
    with pytest.raises(SlimlmError, match="no sink"):
        apply(model, GPTQ(scheme="int4-g16"), CALIB)


@pytest.mark.parametrize("configs, pattern", [
    ([RTN(), GPTQ()], "exactly one step"),
    ([QAT()], "QAT cannot run lazily"),
    ([GPTQ(targets=Targets(lm_head=True))], "lm_head: false"),
    ([MixedPrecision(sensitivity="fisher")], "sensitivity: hessian"),
])
def test_recipes_lazy_compression_cannot_run_are_refused(configs, pattern):
    with pytest.raises(SlimlmError, match=pattern):
        check_lazy(configs)


def test_sources_without_safetensors_are_refused(tmp_path):
    src = save_tiny_model_dir(tmp_path / "m", "llama")
    with pytest.raises(SlimlmError, match="needs a model from"):
        compress_lazy(load_model(src)[0], None, [RTN()], tmp_path / "c")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((src / "config.json").read_text())
    torch.save(AutoModelForCausalLM.from_pretrained(src).state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(SlimlmError, match="reads safetensors and .* has none"):
        load_lazy(tmp_path / "bin")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(SlimlmError, match="is a gguf source"):
        load_lazy(tmp_path / "x.gguf")


def test_cli_compress_lazy(tmp_path, monkeypatch, capsys):
    from slimlm.cli import main

    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    src = str(save_tiny_model_dir(tmp_path / "m", "llama"))
    fast = ["--protocol", "pydoc-v1", "--tokens", "512", "--no-speed", "--calib-samples", "2", "--model", src]
    out = tmp_path / "g"
    assert main(["compress", "--lazy", "--recipe", "gptq-int4-g64", "--out", str(out), *fast]) == 0
    assert (out / INDEX).is_file() and "saved to" in capsys.readouterr().out
    assert main(["compress", "--lazy", "--recipe", "awq-gptq-int4-g64", "--out", str(tmp_path / "h"), *fast]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exactly one step" in err[0] and not (tmp_path / "h").exists()
