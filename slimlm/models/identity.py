"""Stable identities for model sources: where their files are and a fingerprint of them.

``model_id(source)`` keys caches of a model's outputs: the source as given
plus a cheap fingerprint of its files, so an edited checkpoint (new sizes or
mtimes) is never mistaken for the one measured before.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from slimlm.models.builtin import builtin_dir
from slimlm.models.loading import resolve_source

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".json")


def fingerprint_path(path: str | os.PathLike) -> str:
    """A cheap identity for a model on disk: names, sizes and mtimes of its files."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        if f.suffix in _WEIGHT_SUFFIXES:
            st = f.stat()
            h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def local_path(source: str) -> Path | None:
    """Where the model's files are, for built-ins too (their converted cache); None for a hub id."""
    src = resolve_source(source)
    return builtin_dir(source) if src.kind == "builtin" else src.path


def model_id(source: str) -> str:
    """A stable identity for caching: the source and a fingerprint of its files."""
    path = local_path(source)
    return f"{source}@{fingerprint_path(path)}" if path else source


def model_dir(source: str) -> str | None:
    """The model's directory (whose files size reports count), or None for a single file or hub id."""
    path = local_path(source)
    return str(path) if path and path.is_dir() else None
