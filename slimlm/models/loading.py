"""load_model: a built-in name, a local HF directory, a .gguf file or a hub id -> (model, tokenizer).

Every bad input becomes a one-line SlimlmError naming the problem and the
fix. Nothing the caller passes in is modified.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from slimlm.errors import SlimlmError
from slimlm.models._common import short_error
from slimlm.models.builtin import BUILTINS, builtin_dir
from slimlm.models.checks import check_causal, check_weight_files
from slimlm.models.gguf import load_gguf

log = logging.getLogger("slimlm.models")

KINDS = ("builtin", "hf_dir", "gguf", "hub", "slimlm")  # slimlm: a compressed checkpoint
# org/name as the hub spells repo ids (one slash, no leading dot or dash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # one of KINDS
    source: str  # the string the caller passed
    path: Path | None = None  # local directory or .gguf file, when there is one

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SlimlmError(f"model source kind {self.kind!r} is not one of {', '.join(KINDS)}")


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or source.lower().endswith((".gguf", ".safetensors", ".json", ".bin"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def resolve_source(source: str | os.PathLike) -> ModelSource:
    """Decide what ``source`` names, checking local paths exist and look like models."""
    text = os.fspath(source)
    if text in BUILTINS:
        return ModelSource("builtin", text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SlimlmError(
                f"{path} is a directory but not a model (no config.json): point at a Hugging Face model "
                "directory (config.json + weights), e.g. one written by save_pretrained"
            )
        if (path / "slimlm_manifest.json").is_file():
            return ModelSource("slimlm", text, path)
        return ModelSource("hf_dir", text, path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", text, path)
        raise SlimlmError(
            f"{path} is a file, not a model: pass the directory that holds config.json and the weights, "
            "or a .gguf file"
        )
    if _looks_like_path(text):
        raise SlimlmError(f"model path {path} does not exist: check the path (or pass a built-in name or hub id)")
    if _HUB_ID.match(text):
        return ModelSource("hub", text)
    raise SlimlmError(
        f"unknown model {text!r}: not a built-in (known: {', '.join(sorted(BUILTINS))}), not an existing "
        "path, and not a Hugging Face hub id like org/name"
    )


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
        from slimlm.models.lazy import load_lazy

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


def _read_config(path: Path):
    try:
        return AutoConfig.from_pretrained(path)
    # A malformed config.json surfaces as json/Value/OSError; an unknown
    # model_type as ValueError/KeyError.
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise SlimlmError(
            f"{path / 'config.json'} cannot be read as a transformers config ({short_error(e)}): "
            "fix or re-download config.json"
        ) from e


def _load_hf_dir(src: ModelSource, dtype: torch.dtype):
    path = src.path
    config = _read_config(path)
    check_causal(config, where=str(path))
    check_weight_files(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise SlimlmError(f"could not load the model in {path} ({short_error(e)}): re-save or re-download it") from e
    return model, _load_tokenizer(path, str(path))


def _load_tokenizer(where, label: str, **kwargs):
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SlimlmError(
            f"{label} has no usable tokenizer ({short_error(e)}): save one beside the model with "
            "tokenizer.save_pretrained(dir)"
        ) from e


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
    return model, _load_tokenizer(repo, repr(repo), **local_only)


def _load_slimlm(src: ModelSource, dtype: torch.dtype):
    from slimlm.io import load_compressed

    return load_compressed(src.path)  # keeps the dtype it was saved in


_LOADERS = {
    "slimlm": _load_slimlm,
    "builtin": _load_builtin,
    "hf_dir": _load_hf_dir,
    "gguf": _load_gguf,
    "hub": _load_hub,
}
