"""Where measured kernel choices live between processes: one JSON file per machine.

``$SLIMLM_CACHE/kernels/<fingerprint>.json``, the fingerprint a hash of what
decides which kernel is fastest and is not in the choice's key: the CPU model
string, the core count, the torch and slimlm versions (a new torch build or
new kernels can change the winner). The file repeats the fingerprint's fields
so a person can tell which machine it describes. Layout::

    {"fingerprint": {"cpu": ..., "cores": ..., "torch": ..., "slimlm": ...},
     "choices": {"<key>": {"path": "onednn", "why": "measured 1.9x over f_linear at 1 row",
                           "times_us": {"f_linear": 30.2, "onednn": 15.9}}}}

A file that does not parse, or holds another machine's fingerprint, is
ignored with one warning and replaced by the next write. Writes are atomic
(temporary file, then rename) and merge with what the file holds then, so two
processes measuring different shapes both keep theirs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

from slimlm import __version__
from slimlm.fsutil import atomic_write_text, cache_dir

log = logging.getLogger("slimlm.kernels")

Entry = dict[str, Any]  # {"path": str, "why": str, "times_us": {name: float}}


@functools.cache
def cpu_model() -> str:
    """The CPU's model string (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Model", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: fall through to platform's answer
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_fingerprint() -> dict[str, str]:
    """What a measured choice depends on besides its key."""
    return {"cpu": cpu_model(), "cores": str(os.cpu_count()), "torch": torch.__version__, "slimlm": __version__}


def fingerprint_id(fingerprint: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def cache_file_for(fingerprint: dict[str, str]) -> Path:
    """``$SLIMLM_CACHE/kernels/<fingerprint id>.json``."""
    return cache_dir() / "kernels" / f"{fingerprint_id(fingerprint)}.json"


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("why"), str)
            and isinstance(entry.get("times_us", {}), dict))  # fmt: skip


def _load(path: Path, fingerprint: dict[str, str]) -> tuple[dict[str, Entry], str | None]:
    """(the choices in ``path``, None), or ({}, what is wrong with the file)."""
    if not path.exists():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        problem = None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
            problem = "no 'choices' table"
        elif data.get("fingerprint") != fingerprint:
            problem = f"fingerprint {data.get('fingerprint')} is not this machine's"
        elif not all(_valid_entry(e) for e in data["choices"].values()):
            problem = "an entry without path/why"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"{type(e).__name__}: {e}"
    return ({}, problem) if problem is not None else (data["choices"], None)


def read_choices(path: Path, fingerprint: dict[str, str]) -> dict[str, Entry]:
    """The choices stored in ``path`` for this machine; {} (with a warning) for a corrupt or foreign file."""
    choices, problem = _load(path, fingerprint)
    if problem is not None:
        log.warning("kernel choice cache %s ignored (%s); it will be rewritten", path, problem)
    return choices


def write_choices(path: Path, fingerprint: dict[str, str], new: dict[str, Entry]) -> None:
    """Merge ``new`` into the file's current choices and write it atomically."""
    choices = {**_load(path, fingerprint)[0], **new}
    text = json.dumps({"fingerprint": fingerprint, "choices": dict(sorted(choices.items()))}, indent=1)
    try:
        atomic_write_text(path, text + "\n")
    except OSError as e:  # a read-only cache only costs a re-measurement next time
        log.warning("could not write the kernel choice cache %s (%s); choices are kept for this process", path, e)
