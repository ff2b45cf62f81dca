"""Give the C heap's free pages back to the operating system between calibration steps.

Calibration allocates and frees many tensors of 10-30 MB (a mini-batch's
activations) while others stay alive across a whole block (in the one-pass
walk, every suspended forward's). glibc serves such sizes from its heap once
a chunk of that size has been freed (its dynamic mmap threshold), and a heap
with long-lived chunks between free ones keeps the free pages resident: the
process's RSS grows by memory no tensor holds. ``malloc_trim(0)`` returns
every whole free page of the heap to the system. Measured on the built-in
model, GPTQ one-pass at 64 x 512 calibration tokens: peak RSS 2,131 -> 1,833 MB
with a trim after every rewritten group (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("slimlm.calib")


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        fn = None
    if fn is None:
        log.debug("no malloc_trim in the C library: freed heap pages stay with the process")
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Return the heap's free pages to the system; True if the C library could (glibc), False elsewhere."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
