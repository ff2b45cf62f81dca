"""Export a slimlm checkpoint to the formats other engines load.

One registry from format name to writer. Every writer takes the checkpoint
directory and the output path, writes to a temporary path and renames it into
place, refuses an existing output unless ``overwrite``, and never modifies the
checkpoint:

- ``hf``: a dequantized plain transformers directory (``slimlm.io.export_hf``).
- ``gguf``: a GGUF file for llama.cpp; matching grids are written code for code
  (``slimlm.export.gguf``).
- ``compressed-tensors``: the format llm-compressor writes and vLLM /
  transformers load (``slimlm.export.compressed_tensors``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.export.compressed_tensors import export_compressed_tensors
from slimlm.export.gguf import export_gguf
from slimlm.io import export_hf

Exporter = Callable[..., Path]

EXPORTERS: dict[str, Exporter] = {"hf": export_hf, "gguf": export_gguf, "compressed-tensors": export_compressed_tensors}


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, format: str = "hf",
           overwrite: bool = False, **options) -> Path:  # fmt: skip
    """Write ``checkpoint`` as ``format`` to ``out``; format-specific ``options`` go to its writer."""
    if format not in EXPORTERS:
        raise SlimlmError(f"unknown export format {format!r}; valid: {', '.join(EXPORTERS)}")
    return EXPORTERS[format](checkpoint, out, overwrite=overwrite, **options)
