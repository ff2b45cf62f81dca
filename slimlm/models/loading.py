"""load_model: a built-in name, a local HF directory, a .gguf file, a hub id or a slimlm checkpoint -> (model, tokenizer).

Every bad input becomes a one-line SlimlmError naming the problem and the
fix. Nothing the caller passes in is modified.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from slimlm.errors import SlimlmError
from slimlm.models._common import short_error
from slimlm.models.builtin import builtin_dir
from slimlm.models.checks import check_causal, check_weight_files
from slimlm.models.checkpoint import load_compressed
from slimlm.models.gguf import load_gguf
from slimlm.models.lazy import load_lazy
from slimlm.models.source import ModelSource, load_tokenizer, read_config, resolve_source

__all__ = ["ModelSource", "load_model", "resolve_source"]

log = logging.getLogger("slimlm.models")


def load_model(
    source: str | os.PathLike = "smollm2-135m",
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    lazy: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; returns (model in eval mode, tokenizer).

    ``lazy=True`` leaves the decoder blocks' weights on disk until a block is
    needed (see :func:`slimlm.models.lazy.load_lazy`; built-ins and local HF
    directories of safetensors).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SlimlmError(
            f"dtype {dtype!r} is not a floating torch dtype: use torch.float32, torch.bfloat16 or torch.float16"
        )
    if lazy:
        return load_lazy(source, dtype=dtype, device=device)
    resolved = resolve_source(source)
    model, tokenizer = _LOADERS[resolved.kind](resolved, dtype)
    model = _to_device(model, device)
    n_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        log.warning(
            "tokenizer of %s has %d tokens but the model embeds only %d", resolved.source, len(tokenizer), n_embeddings
        )
    log.info("loaded %s (%s) as %s on %s", resolved.source, resolved.kind, type(model).__name__, device)
    return model.eval(), tokenizer


def _to_device(model: PreTrainedModel, device: str) -> PreTrainedModel:
    try:
        return model.to(torch.device(device))
    # torch raises RuntimeError for an unknown device string and AssertionError
    # ("Torch not compiled with CUDA enabled") for a backend it was built without.
    except (RuntimeError, AssertionError) as e:
        raise SlimlmError(
            f"cannot move the model to device {device!r} ({short_error(e)}): use 'cpu' or an available device"
        ) from e


def _load_builtin(src: ModelSource, dtype: torch.dtype):
    return _load_hf_dir(ModelSource("hf_dir", src.source, builtin_dir(src.source)), dtype)


def _load_hf_dir(src: ModelSource, dtype: torch.dtype):
    path = src.path
    config = read_config(path)
    check_causal(config, where=str(path))
    check_weight_files(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise SlimlmError(f"could not load the model in {path} ({short_error(e)}): re-save or re-download it") from e
    return model, load_tokenizer(path, str(path))


def _load_gguf(src: ModelSource, dtype: torch.dtype):
    return load_gguf(src.path, dtype=dtype)


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; re-read it so a
    # variable set later in the process (tests, notebooks) is honoured.
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _load_hub(src: ModelSource, dtype: torch.dtype):
    repo = src.source
    local_only = {"local_files_only": True} if _hub_offline() else {}
    try:
        config = AutoConfig.from_pretrained(repo, **local_only)
        check_causal(config, where=repo)
        model = AutoModelForCausalLM.from_pretrained(repo, dtype=dtype, **local_only)
    except OSError as e:
        log.debug("hub load of %s failed: %s", repo, e)
        raise SlimlmError(
            f"could not fetch {repo!r} from the Hugging Face hub (offline? or no such repo; {short_error(e)}): "
            "download it once with network access, or point at a local directory; with HF_HUB_OFFLINE=1 "
            "only the local cache (~/.cache/huggingface) is used"
        ) from e
    return model, load_tokenizer(repo, repr(repo), **local_only)


def _load_slimlm(src: ModelSource, dtype: torch.dtype):
    return load_compressed(src.path)  # keeps the dtype it was saved in


_LOADERS = {
    "slimlm": _load_slimlm,
    "builtin": _load_builtin,
    "hf_dir": _load_hf_dir,
    "gguf": _load_gguf,
    "hub": _load_hub,
}
