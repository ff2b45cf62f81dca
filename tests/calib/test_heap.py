"""Freed heap pages go back to the system during calibration (slimlm.calib.heap)."""

import ctypes
import ctypes.util
import platform

import pytest
import torch

from slimlm.calib import heap, runner, sequential
from slimlm.calib.runner import calibrate_linears
from slimlm.calib.stats import StatsSpec
from slimlm.models.adapters import block_linears, decoder_blocks, get_adapter
from slimlm.models.tiny import tiny_model

CALIB = torch.randint(3, 512, (6, 24), generator=torch.Generator().manual_seed(0))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_trim_returns_the_pages_of_freed_heap_chunks_that_a_live_chunk_pins():
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD 4 MiB: the 1 MiB chunks below on the heap
    try:
        chunks, pins = [], []
        for _ in range(200):  # 1 MiB freed, 64 KiB kept, in turn: holes free() cannot give back
            chunks.append(torch.ones(1 << 18))
            pins.append(torch.ones(1 << 14))
        del chunks
        before = _rss_kb()
        assert heap.trim_heap() is True
        freed = before - _rss_kb()
        assert freed > 150 * 1024, f"trim gave back {freed} KiB of 200 MiB freed"
        del pins
    finally:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 128 * 1024)


def test_no_malloc_trim_in_the_c_library_is_a_no_op(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    heap._malloc_trim.cache_clear()
    try:
        assert heap.trim_heap() is False
    finally:
        heap._malloc_trim.cache_clear()


@pytest.mark.parametrize("one_pass", [True, False])
def test_calibration_trims_after_every_rewritten_group_and_every_block(monkeypatch, one_pass):
    calls = []
    monkeypatch.setattr(sequential, "trim_heap", lambda: calls.append("group"))
    monkeypatch.setattr(runner, "trim_heap", lambda: calls.append("block"))
    model = tiny_model("llama")
    adapter, blocks = get_adapter(model), decoder_blocks(model)
    names = [f"{adapter.blocks}.{i}.{rel}" for i, b in enumerate(blocks) for rel in block_linears(b, adapter)]
    calibrate_linears(model, CALIB, names, lambda n, s: None, spec=StatsSpec(sq_sum=True), batch_size=4,
                      sequential=one_pass)  # fmt: skip
    groups = len(adapter.groups) if one_pass else 0
    assert calls == (["group"] * groups + ["block"]) * len(blocks)
