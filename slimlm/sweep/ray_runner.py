"""Run sweep tasks on Ray: a runtime started here (``--ray``) or an existing cluster (``--ray-address``).

Each task is one Ray task running the same :func:`slimlm.sweep.worker.run_task`
as the local path, with a CPU, GPU and memory request, in Ray's worker
processes (reused between tasks as Ray does: a fresh process per job would
pay slimlm's import, ~9 s here, each time); it writes to the sweep folder, which on a
cluster must be a path every node sees (a shared filesystem). Ray schedules;
slimlm only submits and collects. A Ray runtime the caller already started
in this process (``ray.init`` from Python) is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from slimlm.errors import SlimlmError
from slimlm.sweep.local import OnDone
from slimlm.sweep.worker import run_task

log = logging.getLogger("slimlm.sweep")

CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RayRequest:
    """What each task asks Ray for; ``memory_gb`` None asks nothing (Ray's default)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float | None = None

    def __post_init__(self):
        if self.cpus <= 0 or self.gpus < 0 or (self.memory_gb is not None and self.memory_gb <= 0):
            raise SlimlmError(f"Ray requests must be positive (cpus {self.cpus}, gpus {self.gpus}, memory "
                              f"{self.memory_gb} GB); fix the per-job request")  # fmt: skip

    def options(self) -> dict[str, Any]:
        memory = {} if self.memory_gb is None else {"memory": int(self.memory_gb * 2**30)}
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, **memory}


def check_address(address: str) -> None:
    """Refuse, in one line and within seconds, a ``host:port`` (or ``ray://host:port``) that does not answer:
    ``ray.init`` itself retries such an address for minutes."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SlimlmError(f"--ray-address {address!r} is not host:port (or ray://host:port, auto); "
                          "give the head node's address, e.g. 10.0.0.5:6379")  # fmt: skip
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise SlimlmError(f"Ray address {address} does not answer ({e.strerror or e}); start the cluster "
                          "(`ray start --head`) or fix --ray-address") from None


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SlimlmError("--ray/--ray-address need Ray: pip install 'slimlm[sweep]' (ray>=2.40)") from None
    return ray


def _forwarded_env() -> dict[str, str]:
    """slimlm's own settings (SLIMLM_CACHE, ...) travel with each task; the rest of the environment is the
    node's. No per-job progress bars: the sweep's own bar is the progress."""
    return {**{k: v for k, v in os.environ.items() if k.startswith("SLIMLM_")}, "TQDM_DISABLE": "1"}


@contextlib.contextmanager
def ray_session(*, address: str | None, num_cpus: float) -> Iterator[Any]:
    """Start a runtime of ``num_cpus`` here (``address`` None) or join ``address``, and leave it at the end;
    a runtime already running in this process is used as it is and left running. Yields the ray module."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise SlimlmError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}; "
                              "fix --ray-address") from None  # fmt: skip
    try:
        yield ray
    finally:
        ray.shutdown()


def run_ray(ray: Any, tasks: Sequence[dict[str, Any]], *, request: RayRequest, on_done: OnDone) -> None:
    """Submit every task to the connected runtime and call ``on_done(task, outcome)`` as each finishes."""
    remote = ray.remote(**request.options())(run_task)
    env = _forwarded_env()
    refs = {remote.remote({**task, "env": env}): task for task in tasks}
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1)
        for ref in done:
            task = refs.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as e:  # the worker died (out of memory, killed)
                outcome = {"status": "failed", "error": f"the Ray task died ({type(e).__name__}); rerun the "
                                                        "sweep to retry it"}  # fmt: skip
            on_done(task, outcome)
