"""Kernel choices by measurement on the machine at hand, cached per machine (issue 18).

Which matmul path is fastest depends on the CPU, the core count, the thread
count and the torch build: oneDNN's inner product beat MKL's ``F.linear`` 1.7x
at one row on one 2-core machine and lost 0.6x on another. So where more than
one exact path can run a matmul, the first call with a new key

    (op, out x in, dtype, rows bucket (1, 2-4, 5-16, 17+), threads, device)

times every candidate on that call's own operands (interleaved, warmed up,
median of :data:`REPEATS` samples of about :data:`SAMPLE_S` each) and keeps the
fastest; the choice is stored in the machine's cache file
(:mod:`slimlm.kernels.tune_cache`) and read from there by later processes.

* Candidates are ordered simplest first (``f_linear`` before ``onednn``,
  ``reference`` before ``fast``); a later one wins only when faster by more
  than :data:`TIE_MARGIN`, so noise never picks the more fragile path.
* Exactness: before it is timed, every candidate's output on the call's own
  operands is compared with the simplest candidate's (the caller's tolerance,
  the first-use check's); one that disagrees or raises cannot win.
* Prefill-sized inputs (17+ rows) keep the fixed rule: timing one call there
  costs up to a second per shape. The exception is the ``prefill`` op
  (:data:`MEASURED_AT_PREFILL`): whether a quantized weight-only kernel
  multiplies prefill-sized float32 inputs in float32 or in bfloat16 is a
  question about many rows only (:mod:`slimlm.kernels.prefill`).

``SLIMLM_KERNELS`` (comma-separated) sets the mode and per-op forces:

* ``auto`` (default): use the cache, measure on a miss.
* ``measure``: measure every key once in this process, ignoring the cache, and rewrite it.
* ``fixed``: today's hand-set rules (dense: oneDNN at <= 16 rows and >= 2^18
  weights; quantized: the first kernel in the table); the test suite's setting.
* ``op:path`` forces a path for one op, e.g. ``dense:mkl,int4:reference``;
  ops and paths: :data:`CANDIDATES` (``mkl`` means ``f_linear``).

``auto`` is the default for the library, the CLI and the benchmarks alike: the
fixed rules lost 0.81x against HF generate on a machine they were not tuned on,
and the measurement (about 0.1 s per distinct shape and rows bucket, once per
machine) is paid in the first forward pass only.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.kernels import tune_cache

log = logging.getLogger("slimlm.kernels")

ENV = "SLIMLM_KERNELS"
MODES = ("auto", "measure", "fixed")
# op -> its paths, simplest first (the order ties are broken in)
CANDIDATES: dict[str, tuple[str, ...]] = {"dense": ("f_linear", "onednn"), "int8": ("reference", "fast"),
                                          "int4": ("reference", "fast"), "int8_group": ("reference", "fast"),
                                          "int4_native": ("reference", "fast"), "int8_native": ("reference", "fast"),
                                          "int8_row": ("torch", "native"),  # int8.py: per-row int8, few rows
                                          "prefill": ("f32", "bf16")}  # fmt: skip
# Ops measured at prefill sizes too: the choice is about many rows (slimlm.kernels.prefill), and a sample
# there costs a few ms per shape (a 49152-row lm_head: about 2 s, once per machine).
MEASURED_AT_PREFILL = frozenset({"prefill"})
ALIASES = {"mkl": "f_linear"}  # ATen's float32 CPU F.linear is MKL's GEMV/GEMM
TIE_MARGIN = 0.05  # a less simple path must be > 5% faster to win
REPEATS = 7  # interleaved samples per candidate; the median is kept
SAMPLE_S = 2e-3  # each sample repeats the call until it lasts about this long
SLOW_CUTOFF = 4.0  # a path this many times slower than the fastest on one call is not sampled further
UNMEASURED = "17+"  # the rows bucket that keeps the fixed rule

Runs = dict[str, Callable[[], Tensor]]
Timer = Callable[[Runs], dict[str, float]]  # candidates -> median seconds per call


class Key(NamedTuple):
    """What a choice is made for. Fields hold torch's own objects (the lookup runs on every matmul); ``str``
    spells them out for the cache file and the report."""

    op: str
    out_features: int
    in_features: int
    dtype: torch.dtype
    rows: str  # bucket
    threads: int
    device: torch.device

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"{self.op} {self.out_features}x{self.in_features} {dtype} rows={self.rows} "
                f"threads={self.threads} {_device_name(self.device)}")  # fmt: skip


def rows_bucket(m: int) -> str:
    return "1" if m <= 1 else "2-4" if m <= 4 else "5-16" if m <= 16 else UNMEASURED


def make_key(op: str, shape: tuple[int, int], dtype: torch.dtype, rows: int, device: torch.device) -> Key:
    return Key(op, shape[0], shape[1], dtype, rows_bucket(rows), torch.get_num_threads(), device)


def _device_name(device: torch.device) -> str:
    """``cpu`` (the CPU model is in the cache's fingerprint), or the accelerator's model name."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


@dataclass(frozen=True)
class KernelSettings:
    """``mode`` in :data:`MODES`; ``forced``: (op, path) pairs that override it for one op."""

    mode: str = "auto"
    forced: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SlimlmError(f"{ENV}: unknown mode {self.mode!r}; valid: {', '.join(MODES)} (plus op:path forces)")
        for op, path in self.forced:
            if op not in CANDIDATES:
                raise SlimlmError(f"{ENV}: unknown op {op!r} in {op}:{path}; valid ops: {', '.join(CANDIDATES)}")
            if path not in CANDIDATES[op]:
                raise SlimlmError(f"{ENV}: {op} has no path {path!r}; valid: {', '.join(CANDIDATES[op])}"
                                  + (" (or mkl)" if op == "dense" else ""))  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> KernelSettings:
        """``"auto"``, ``"fixed,dense:onednn"``, ``"dense:mkl,int4:reference"`` (mode defaults to auto)."""
        modes, forced = [], []
        for token in filter(None, (t.strip() for t in text.split(","))):
            op, sep, path = token.partition(":")
            if sep:
                forced.append((op.strip(), ALIASES.get(path.strip(), path.strip())))
            else:
                modes.append(token)
        if len(modes) > 1:
            raise SlimlmError(f"{ENV}={text!r} names {len(modes)} modes; give one of {', '.join(MODES)}")
        return cls(modes[0] if modes else "auto", tuple(forced))

    def force(self, op: str) -> str | None:
        return dict(self.forced).get(op)


@dataclass(frozen=True)
class Decision:
    key: Key
    path: str
    source: str  # "measured", "cached", "forced" or "fixed"
    why: str
    times_us: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        return f"{self.key}: {self.path} ({self.why})"


def time_candidates(runs: Runs, *, sync: Callable[[], None] = lambda: None,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:  # fmt: skip
    """Median seconds per call of each candidate: warmed up, each sample ~SAMPLE_S, candidates interleaved."""
    loops, first = {}, {}
    for name, fn in runs.items():
        fn()  # warm-up: first-call allocations, oneDNN primitive creation
        sync()
        t0 = clock()
        fn()
        sync()
        first[name] = clock() - t0
        loops[name] = max(1, min(1000, int(SAMPLE_S / max(first[name], 1e-7))))
    # A path SLOW_CUTOFF x slower than the fastest on its timed call cannot win: keep that time (a dequantizing
    # reference of a 49152-row lm_head would otherwise cost a second of samples).
    floor = min(first.values())
    samples: dict[str, list[float]] = {name: [t] for name, t in first.items() if t > SLOW_CUTOFF * floor}
    timed = {name: fn for name, fn in runs.items() if name not in samples}
    samples.update({name: [] for name in timed})
    for _ in range(REPEATS):  # interleaved: a load change hits every candidate alike
        for name, fn in timed.items():
            t0 = clock()
            for _ in range(loops[name]):
                fn()
            sync()
            samples[name].append((clock() - t0) / loops[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def pick(times: dict[str, float], order: tuple[str, ...], *, margin: float = TIE_MARGIN) -> str:
    """The fastest of ``times``; a path later in ``order`` must beat the current best by > ``margin``."""
    ranked = [name for name in order if name in times]
    best = ranked[0]
    for name in ranked[1:]:
        if times[name] < times[best] * (1 - margin):
            best = name
    return best


def _measured_why(times: dict[str, float], winner: str, order: tuple[str, ...], rows: int) -> str:
    at = f"at {rows} row{'s' if rows != 1 else ''}"
    others = sorted((n for n in times if n != winner), key=times.get)
    if not others:
        return f"measured: the only path that agrees {at}"
    rival = others[0]
    if order.index(winner) > order.index(rival):
        return f"measured {times[rival] / times[winner]:.2f}x over {rival} {at}"
    return f"measured: {rival} {times[winner] / times[rival]:.2f}x of {winner}'s speed {at}, kept the simpler path"


def _fixed_why(rows: str) -> str:
    if rows == UNMEASURED:
        return "fixed rule: prefill-sized inputs (17+ rows) are not measured"
    return f"fixed rule ({ENV}=fixed)"


class Tuner:
    """The choices of one process: decided once per key, from a force, the cache, a measurement or the rule."""

    def __init__(self, settings: KernelSettings, *, cache_file: Path | None = None, timer: Timer | None = None,
                 fingerprint: dict[str, str] | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.fingerprint = fingerprint or tune_cache.machine_fingerprint()
        self.cache_file = cache_file or tune_cache.cache_file_for(self.fingerprint)
        self.timer = timer
        self.measurements = 0  # how many keys were timed in this process
        self._decisions: dict[Key, Decision] = {}
        self._cached: dict[str, tune_cache.Entry] | None = None  # loaded on the first miss
        forced = {op for op, _ in settings.forced}
        self._rule_ops = frozenset(op for op in CANDIDATES if settings.mode == "fixed" and op not in forced)

    def uses_rule(self, op: str) -> bool:
        """True when ``op`` keeps the fixed rule in every case (the hot path skips the key)."""
        return op in self._rule_ops

    def decisions(self) -> tuple[Decision, ...]:
        return tuple(self._decisions.values())

    def decision(self, key: Key) -> Decision | None:
        return self._decisions.get(key)

    def choose(self, key: Key, *, fixed: str, candidates: Callable[[], Runs],
               agree: Callable[[Tensor, Tensor], bool]) -> str:  # fmt: skip
        """The path for ``key``: ``fixed`` is the rule's answer; ``candidates()`` the paths runnable on the
        current operands, simplest first; ``agree(y, y_simplest)`` the exactness check."""
        d = self._decisions.get(key)
        if d is None:
            with torch.no_grad():
                d = self._decisions[key] = self._decide(key, fixed, candidates, agree)
            log.info("kernel choice %s", d.format())
        return d.path

    def _decide(self, key: Key, fixed: str, candidates: Callable[[], Runs], agree) -> Decision:  # noqa: ANN001
        forced = self.settings.force(key.op)
        if forced is not None:
            if forced in _agreeing(key, candidates(), agree)[0]:
                return Decision(key, forced, "forced", f"forced by {ENV}={key.op}:{forced}")
            return Decision(key, fixed, "fixed", f"forced {forced} disagrees with the reference here; fixed rule")
        if self.settings.mode == "fixed" or (key.rows == UNMEASURED and key.op not in MEASURED_AT_PREFILL):
            return Decision(key, fixed, "fixed", _fixed_why(key.rows))
        if self.settings.mode == "auto":
            if self._cached is None:
                self._cached = tune_cache.read_choices(self.cache_file, self.fingerprint)
            entry = self._cached.get(str(key))
            if entry is not None and entry["path"] in CANDIDATES[key.op]:
                return Decision(key, entry["path"], "cached", entry["why"] + ", cached", entry.get("times_us", {}))
        return self._measure(key, candidates(), agree)

    def _measure(self, key: Key, runs: Runs, agree) -> Decision:  # noqa: ANN001
        runs, rows = _agreeing(key, runs, agree)
        times = self._timer(key)(runs)
        self.measurements += 1
        path = pick(times, CANDIDATES[key.op])
        why = _measured_why(times, path, CANDIDATES[key.op], rows)
        times_us = {name: round(t * 1e6, 2) for name, t in times.items()}
        entry = {"path": path, "why": why, "times_us": times_us}
        if self._cached is not None:
            self._cached[str(key)] = entry
        tune_cache.write_choices(self.cache_file, self.fingerprint, {str(key): entry})
        return Decision(key, path, "measured", why, times_us)

    def _timer(self, key: Key) -> Timer:
        if self.timer is not None:
            return self.timer
        sync = torch.cuda.synchronize if key.device.type == "cuda" else (lambda: None)
        return lambda runs: time_candidates(runs, sync=sync)


def _agreeing(key: Key, runs: Runs, agree: Callable[[Tensor, Tensor], bool]) -> tuple[Runs, int]:
    """The candidates whose output agrees with the simplest one's on these operands (the simplest always),
    and the number of rows they multiply."""
    names = [n for n in CANDIDATES[key.op] if n in runs]
    ref = runs[names[0]]()
    kept = {names[0]: runs[names[0]]}
    for name in names[1:]:
        try:
            ok = agree(runs[name](), ref)
        except RuntimeError as e:  # an op this build or device refuses
            log.warning("kernel path %s for %s failed (%s); not a candidate", name, key, e)
            continue
        if ok:
            kept[name] = runs[name]
        else:
            log.warning("kernel path %s for %s disagrees with %s; not a candidate", name, key, names[0])
    return kept, ref.shape[0]


_TUNER: Tuner | None = None


def tuner() -> Tuner:
    """This process's tuner, built on first use from ``$SLIMLM_KERNELS`` and ``$SLIMLM_CACHE``."""
    global _TUNER
    if _TUNER is None:
        _TUNER = Tuner(KernelSettings.parse(os.environ.get(ENV, "")))
    return _TUNER


def reset(tuner_: Tuner | None = None) -> None:
    """Install ``tuner_`` (tests), or forget every choice so the next use re-reads the environment."""
    global _TUNER
    _TUNER = tuner_


def decisions() -> tuple[Decision, ...]:
    """Every choice made in this process so far, in the order made."""
    return _TUNER.decisions() if _TUNER is not None else ()


def format_decisions(ds: tuple[Decision, ...] | None = None) -> str:
    ds = decisions() if ds is None else ds
    mode = tuner().settings
    head = f"kernel choices ({ENV}={os.environ.get(ENV, '') or 'auto (unset)'}; mode {mode.mode})"
    return "\n".join([head, *(f"  {d.format()}" for d in ds)] if ds else [head + ": none made yet"])
