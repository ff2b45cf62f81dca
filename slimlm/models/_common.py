"""Small helpers shared by the model loaders."""

from __future__ import annotations


def short_error(e: BaseException) -> str:
    """``Type: first line of the message``, for wrapping a library error in one line."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
