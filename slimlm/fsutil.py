"""Atomic writes: outputs appear complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from slimlm.errors import SlimlmError


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; rename it into place on success.

    An exception (or an interrupt) inside the block removes the temporary
    directory and leaves ``dest`` as it was.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise SlimlmError(f"{dest} already exists; pass --overwrite to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to a temporary file beside ``dest`` and rename it into place."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise SlimlmError(f"{dest} already exists; pass --overwrite to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def atomic_write_text(dest: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    return atomic_write_bytes(dest, text.encode("utf-8"), overwrite=overwrite)


def cache_dir() -> Path:
    """slimlm's cache root: ``$SLIMLM_CACHE``, else ``~/.cache/slimlm``."""
    root = os.environ.get("SLIMLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "slimlm")
    return Path(root)
