"""Compile ``gemv.c``, ``attention.c`` and ``dequant.c`` on first use, cache the shared library, load it with ctypes.

The library is built with the system C compiler (``gcc``, else ``cc``, else
``sysconfig``'s ``CC``) and ``-O3 -march=native -fopenmp -shared -fPIC`` into

    $SLIMLM_CACHE/native/slimlm_native-<key>.so     (default ~/.cache/slimlm/native/)

``key`` hashes the sources, the flags, the compiler's ``--version`` and the
CPU's feature flags, so an edited kernel, another compiler or another CPU
builds its own copy and a second load of the same one builds nothing. The
compiler writes to a temporary name beside it, renamed into place: two
processes building at once both end with a whole file.

OpenMP: the library needs ``libgomp.so.1``; torch's wheel ships a
``libgomp.so.1`` and has loaded it by the time this runs, and the dynamic
loader resolves a soname already in the process to that copy, so the kernels
and torch share one thread pool (tests check it). The kernels take the
thread count per call (``torch.get_num_threads()``).

Unsupported (one log line with the reason, once per process; the torch
kernels run instead): ``SLIMLM_NATIVE=0``, not x86-64, a CPU without AVX2 and
FMA, no C compiler, or a failed build or load.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slimlm.fsutil import cache_dir

log = logging.getLogger("slimlm.kernels")

ENV = "SLIMLM_NATIVE"
SOURCES = tuple(Path(__file__).with_name(n) for n in ("gemv.c", "attention.c", "dequant.c"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
NEEDED_CPU_FLAGS = ("avx2", "fma")
BUILD_TIMEOUT_S = 120

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
# exported symbol -> (argument types, result type)
SIGNATURES = {
    "slimlm_q4_matmul": ([_P, _P, _P, _F, _P, _P, _I, _I, _I, _I, _I], None),
    "slimlm_q8_matmul": ([_P, _P, _P, _F, _P, _P, _I, _I, _I, _I, _I], None),
    "slimlm_dequant": ([_P, _P, _P, _F, _P, _I, _I, _I, _I, _I], None),
    "slimlm_attn_decode": ([_P, _P, _P, _I, _P, _I, _I, _I, _I, _I, _L, _L, _L, _L, _F, _I], _I),
    "slimlm_native_isa": ([], _I),
    "slimlm_native_last_threads": ([], _I),
    "slimlm_native_omp_max_threads": ([], _I),
}


@dataclass(frozen=True)
class Native:
    """The loaded library (``lib``, ``path``, ``isa`` 512 or 256), or why there is none (``reason``)."""

    lib: ctypes.CDLL | None = None
    path: Path | None = None
    isa: int = 0
    reason: str | None = None
    built: bool = False  # this process compiled it (False: loaded from the cache)


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo``, or None where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:  # not Linux: the compiler's #error says whether AVX2 and FMA are there
        return None
    return frozenset()


def find_compiler() -> str | None:
    """Path of the C compiler to use: gcc, else cc, else the one Python was built with."""
    for name in ("gcc", "cc", (sysconfig.get_config_var("CC") or "").split(" ")[0]):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _compiler_version(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.strip()


def library_path(cc: str, flags: frozenset[str] | None, extra: tuple[str, ...] = ()) -> Path:
    """Where the library for this source, compiler, flags and CPU lives in the cache."""
    h = hashlib.sha256(b"".join(src.read_bytes() + b"\0" for src in SOURCES))
    for part in (" ".join(FLAGS + extra), _compiler_version(cc), " ".join(sorted(flags or ()))):
        h.update(b"\0" + part.encode())
    return cache_dir() / "native" / f"slimlm_native-{h.hexdigest()[:16]}.so"


def compile_library(cc: str, dest: Path, extra: tuple[str, ...] = ()) -> None:
    """Build the sources into ``dest`` through a temporary file renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", suffix=".so", dir=dest.parent)
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, *extra, *map(str, SOURCES), *LIBS, "-o", tmp]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        if out.returncode != 0:
            first = next((ln for ln in out.stderr.splitlines() if "error" in ln), out.stderr.strip()[:200])
            raise OSError(f"{Path(cc).name} exited {out.returncode}: {first.strip()}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, (args, res) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def why_unsupported() -> str | None:
    """Why this machine or environment cannot run the native kernels before building, else None."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"disabled by {ENV}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"no native kernels for {platform.machine()} (x86-64 with AVX2 and FMA only)"
    flags = cpu_flags()
    missing = [f for f in NEEDED_CPU_FLAGS if flags is not None and f not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    return None


def load(extra: tuple[str, ...] = ()) -> Native:
    """Build (once per machine) and load the library; ``extra`` compiler flags (tests: ``-mno-avx512f``)."""
    reason = why_unsupported()
    if reason is not None:
        return Native(reason=reason)
    cc = find_compiler()
    if cc is None:
        return Native(reason="no C compiler found (install gcc)")
    try:
        path = library_path(cc, cpu_flags(), extra)
        built = not path.exists()
        if built:
            log.info("building slimlm native kernels with %s into %s", cc, path)
            compile_library(cc, path, extra)
        lib = _bind(ctypes.CDLL(str(path)))
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        return Native(reason=f"build or load failed ({e})")
    return Native(lib=lib, path=path, isa=lib.slimlm_native_isa(), built=built)


_STATE: Native | None = None


def native() -> Native:
    """This process's library, built or loaded on first use; the reason is logged once when there is none."""
    global _STATE
    if _STATE is None:
        _STATE = load()
        if _STATE.reason is not None:  # a deliberate switch-off is news, not a warning
            level = logging.INFO if _STATE.reason.startswith("disabled") else logging.WARNING
            log.log(level, "native CPU kernels unavailable: %s; the torch kernels run", _STATE.reason)
        else:
            log.debug("native CPU kernels: AVX%d from %s", _STATE.isa, _STATE.path)
    return _STATE


def status() -> str | None:
    """One line for reports: the library this process loaded, or why it has none; None before its first use
    and when switched off on purpose (``SLIMLM_NATIVE=0``)."""
    if _STATE is None or (_STATE.lib is None and _STATE.reason.startswith("disabled")):
        return None
    if _STATE.lib is None:
        return f"off: {_STATE.reason}"
    return f"{'AVX-512' if _STATE.isa == 512 else 'AVX2'} build ({_STATE.path})"


def available() -> bool:
    return native().lib is not None


def reset(state: Native | None = None) -> None:
    """Install ``state`` (tests), or forget the library so the next use re-reads ``$SLIMLM_NATIVE``."""
    global _STATE
    _STATE = state
