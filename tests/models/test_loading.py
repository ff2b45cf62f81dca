import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig

from slimlm.errors import SlimlmError
from slimlm.models import load_model, resolve_source, save_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def _digest(path: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()


def test_resolve_source_kinds(tiny_dir, tmp_path):
    assert resolve_source("smollm2-135m").kind == "builtin"
    src = resolve_source(str(tiny_dir))
    assert (src.kind, src.path, src.source) == ("hf_dir", tiny_dir, str(tiny_dir))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)).kind == "gguf"
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    with pytest.raises(Exception):
        src.kind = "hub"  # frozen


def test_missing_path(tmp_path):
    with pytest.raises(SlimlmError, match="does not exist") as e:
        load_model(str(tmp_path / "nope" / "model"))
    _one_line(e)
    with pytest.raises(SlimlmError, match="does not exist"):
        load_model("./not-here")
    with pytest.raises(SlimlmError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(SlimlmError, match="not a model \\(no config.json\\)") as e:
        load_model(str(tmp_path))
    _one_line(e)


def test_truncated_safetensors(tiny_dir, tmp_path):
    bad = _copy(tiny_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    before = _digest(bad)
    with pytest.raises(SlimlmError, match="model.safetensors is corrupt or truncated") as e:
        load_model(str(bad))
    _one_line(e)
    assert _digest(bad) == before  # inputs are never modified


def test_config_without_weights(tiny_dir, tmp_path):
    bad = _copy(tiny_dir, tmp_path / "noweights")
    (bad / "model.safetensors").unlink()
    with pytest.raises(SlimlmError, match="no weights"):
        load_model(str(bad))


def test_garbage_and_truncated_gguf(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(SlimlmError, match="not a GGUF file") as e:
        load_model(str(garbage))
    _one_line(e)
    truncated = tmp_path / "trunc.gguf"
    # A GGUF v3 header claiming one tensor and one metadata entry, then nothing.
    truncated.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") * 2)
    with pytest.raises(SlimlmError, match="corrupt or truncated GGUF") as e:
        load_model(str(truncated))
    _one_line(e)


def test_unknown_name_lists_builtins():
    with pytest.raises(SlimlmError, match="unknown model 'smollm9'.*known: smollm2-135m") as e:
        load_model("smollm9")
    _one_line(e)


def test_bert_is_refused(tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    with pytest.raises(SlimlmError, match="is a `bert` model with no causal-LM head.*needs a causal") as e:
        load_model(str(tmp_path))
    _one_line(e)


def test_base_model_without_head_is_refused(tiny_dir, tmp_path):
    bad = _copy(tiny_dir, tmp_path / "base")
    cfg = (bad / "config.json").read_text().replace('"LlamaForCausalLM"', '"LlamaModel"')
    (bad / "config.json").write_text(cfg)
    with pytest.raises(SlimlmError, match="`llama` model with no causal-LM head \\(its architectures are LlamaModel"):
        load_model(str(bad))


def test_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SlimlmError, match="could not fetch 'slimlm-test/no-such-model'.*HF_HUB_OFFLINE") as e:
        load_model("slimlm-test/no-such-model")
    msg = _one_line(e)
    assert "local directory" in msg and ".cache/huggingface" in msg


def test_bad_dtype_and_device(tiny_dir):
    with pytest.raises(SlimlmError, match="not a floating torch dtype"):
        load_model(str(tiny_dir), dtype=torch.int8)
    with pytest.raises(SlimlmError, match="cannot move the model to device 'nodevice'"):
        load_model(str(tiny_dir), device="nodevice")


def test_dtype_is_honoured(tiny_dir):
    model, _ = load_model(str(tiny_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training


def test_plain_copy_drops_quantization_config_and_keeps_weights(tmp_path):
    from slimlm.models.gguf import plain_copy
    from slimlm.models.tiny import tiny_model

    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    plain = plain_copy(model)
    assert not hasattr(plain.config, "quantization_config")
    assert hasattr(model.config, "quantization_config")  # the input is left as it was
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    ids = torch.tensor([[1, 40, 70, 100]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)
    plain.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
