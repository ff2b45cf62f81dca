"""Run sweep tasks on this machine, each in its own process, at most ``jobs`` at a time.

Worker processes come from a multiprocessing *forkserver* that has already
imported slimlm: importing torch, transformers and every method takes about
9 s per process on a loaded 2-core machine (measured), which a fresh
``python -m slimlm.sweep.worker`` or a spawned process would pay per job.
Each job still gets a process of its own (its memory goes back when it
ends), with the parent's environment and working folder (``run_in_child``).
Where forkserver does not exist (Windows) processes are spawned.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from multiprocessing import forkserver
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

from slimlm.sweep.worker import run_in_child

log = logging.getLogger("slimlm.sweep")

OnDone = Callable[[dict[str, Any], dict[str, Any]], None]  # (task, outcome)


def _context() -> Any:
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["slimlm.sweep.worker"])
    # No per-job progress bars under the sweep's own: tqdm reads TQDM_DISABLE when it is imported, which in
    # the workers is when the server preloads slimlm, so the server (not each job) must start with it set.
    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = saved
    return ctx


def _crashed(proc: Any) -> dict[str, Any]:
    """The outcome of a worker that died without answering (killed, out of memory, a crash in native code)."""
    code = proc.exitcode
    how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
    return {"status": "failed", "error": f"the worker process died ({how}) before recording the job; "
                                        "rerun the sweep to retry it (check memory if it repeats)"}  # fmt: skip


def run_local(tasks: Sequence[dict[str, Any]], *, jobs: int, on_done: OnDone) -> None:
    """Run ``tasks`` in worker processes, ``jobs`` at a time; ``on_done(task, outcome)`` as each finishes."""
    ctx = _context()
    pending = list(tasks)
    running: dict[Any, tuple[Any, Any, dict[str, Any]]] = {}  # reader -> (process, reader, task)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                task = pending.pop(0)
                reader, writer = ctx.Pipe(duplex=False)
                child = {**task, "env": dict(os.environ), "cwd": os.getcwd()}  # the parent's
                proc = ctx.Process(target=run_in_child, args=(child, writer))
                proc.start()
                writer.close()  # the child holds the write end; EOF here once it exits
                running[reader] = (proc, reader, task)
            for reader in wait(list(running)):
                proc, _, task = running.pop(reader)
                try:
                    outcome = reader.recv()
                except EOFError:
                    outcome = None
                proc.join()
                reader.close()
                on_done(task, outcome if outcome is not None else _crashed(proc))
    finally:
        for proc, _, _ in running.values():  # interrupted: stop what is still running
            proc.terminate()
            proc.join()
