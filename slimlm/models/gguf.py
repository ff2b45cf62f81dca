"""GGUF files: validate, load through transformers' GGUF support, dequantize to a plain model.

transformers dequantizes GGUF tensors to float on load but keeps a
``quantization_config`` that makes ``save_pretrained`` refuse the model; we
rebuild the model from its config without it and load the state dict, so the
result is an ordinary ``PreTrainedModel`` that can be saved and compressed.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.initialization import no_init_weights

from slimlm.errors import SlimlmError
from slimlm.models._common import short_error

log = logging.getLogger("slimlm.models")

GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> str:
    """Read the GGUF header and tensor table; return the architecture name.

    Raises SlimlmError for a file that is not GGUF, is truncated or corrupt,
    or holds an architecture transformers cannot load.
    """
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SlimlmError(
            f"{path} is not a GGUF file (it does not start with b'GGUF'): "
            "pass a .gguf model file, or a Hugging Face model directory"
        )
    try:
        reader = gguf.GGUFReader(path)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode("utf-8")
    # GGUFReader reports truncation and corruption as whatever numpy or struct
    # raised while mapping the file: ValueError (bad reshape), IndexError,
    # KeyError (missing field), OSError, UnicodeDecodeError (a ValueError).
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise SlimlmError(
            f"{path} is a corrupt or truncated GGUF file ({short_error(e)}): "
            "download or copy it again"
        ) from e
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise SlimlmError(
            f"{path} holds a GGUF {arch!r} model, which transformers cannot load; "
            f"supported GGUF architectures: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
        )
    return arch


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a freshly built model whose config has no quantization_config."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(model.parameters()).dtype
    # Random init of a model we overwrite next is wasted seconds; skipping it
    # may leave buffers that _init_weights would fill unset, so copy every
    # buffer (non-persistent ones such as rotary inv_freq included) as well.
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            plain.get_buffer(name).copy_(buf)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def load_gguf(path: Path, *, dtype: torch.dtype = torch.float32):
    """Load a GGUF file as (plain dequantized model, tokenizer)."""
    check_gguf(path)
    log.info("loading and dequantizing %s (takes a while for large files)", path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers raises ValueError / OSError / RuntimeError for GGUF contents
    # it cannot map (unknown tensor names, shape mismatches).
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise SlimlmError(
            f"transformers could not load {path} ({short_error(e)}): "
            "check that the file is a complete GGUF of a supported causal LM"
        ) from e
    return plain_copy(model), tokenizer
