"""What a model source names (built-in, HF directory, .gguf, hub id, slimlm checkpoint), and the
config and tokenizer readers every loader shares (eager :mod:`slimlm.models.loading` and lazy
:mod:`slimlm.models.lazy`). Every bad input becomes a one-line SlimlmError naming the fix."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from slimlm.errors import SlimlmError
from slimlm.models._common import short_error
from slimlm.models.builtin import BUILTINS

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


def read_config(path: Path):
    try:
        return AutoConfig.from_pretrained(path)
    # A malformed config.json surfaces as json/Value/OSError; an unknown
    # model_type as ValueError/KeyError.
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise SlimlmError(
            f"{path / 'config.json'} cannot be read as a transformers config ({short_error(e)}): "
            "fix or re-download config.json"
        ) from e


def load_tokenizer(where, label: str, **kwargs):
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SlimlmError(
            f"{label} has no usable tokenizer ({short_error(e)}): save one beside the model with "
            "tokenizer.save_pretrained(dir)"
        ) from e
