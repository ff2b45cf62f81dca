"""sweep(): many recipes on one model, each job in its own process (or Ray task), resumable.

    report = sweep("smollm2-135m", ["rtn-int4-g64", "gptq-int4-g64"], grid={"bits": [3, 4]}, out="runs/a")
    print(report.table())

Everything the sweep could refuse (an unknown recipe, a grid key no step
has, an unwritable or foreign ``out``, a corrupt job file, a Ray address
that does not answer) is refused before the first job starts. The base is
measured once per folder; each job compresses, measures against it and
samples, and is recorded in ``jobs/<id>/`` whether it worked or not. A
re-run skips finished jobs and retries failed ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from slimlm.errors import SlimlmError
from slimlm.eval import Result, format_results, get_protocol, load_result
from slimlm.models.identity import model_id
from slimlm.recipe import Recipe, load_recipe
from slimlm.sweep.jobs import (Job, Settings, check_folder, expand, job_doc, read_job, sweep_doc, writable,
                               write_json)
from slimlm.sweep.local import run_local
from slimlm.sweep.ray_runner import RayRequest, check_address, import_ray, ray_session, run_ray
from slimlm.validate import check_pos_int

log = logging.getLogger("slimlm.sweep")


@dataclass(frozen=True)
class JobOutcome:
    id: str
    name: str
    status: str  # done | failed
    error: str | None
    result: Result | None  # measured against the base (done only)
    seconds: float  # compress time
    wall_seconds: float
    skipped: bool = False  # finished by an earlier run of the sweep

    def line(self) -> str:
        """The progress line: recipe, perplexity, KLD, size, bits per weight, time."""
        if self.status != "done":
            return f"{self.name}: FAILED: {self.error}"
        q, size = self.result.quality, self.result.size
        bpw = "-" if size.bits_per_weight is None else f"{size.bits_per_weight:.2f}"
        when = "done before, skipped" if self.skipped else f"{self.wall_seconds:.1f} s"
        return (f"{self.name}: ppl {q.perplexity:.3f}  KLD {q.kld:.4f}  {size.model_bytes / 1e6:.1f} MB  "
                f"{bpw} bits/w  compress {self.seconds:.1f} s  ({when})")  # fmt: skip


@dataclass(frozen=True)
class SweepReport:
    out: Path
    base: Result
    jobs: tuple[JobOutcome, ...]

    @property
    def failed(self) -> list[JobOutcome]:
        return [j for j in self.jobs if j.status != "done"]

    def table(self) -> str:
        """The comparison table of ``slimlm eval --compare``: the base, then each finished job by recipe."""
        done = [dataclasses.replace(j.result, model=j.name) for j in self.jobs if j.status == "done"]
        failed = [f"failed: {j.name}: {j.error}" for j in self.failed]
        return "\n".join([format_results([self.base, *done]), *failed])


@dataclass(frozen=True)
class _Plan:
    model: str
    settings: Settings
    jobs: list[Job]
    out: Path


def _plan(model: str, recipes: Sequence[str | Recipe], grid: dict[str, Sequence[Any]] | None, out: Path,
          settings: Settings) -> _Plan:
    """Every job, and the refusals that need no model loaded."""
    if not recipes:
        raise SlimlmError("no recipes given; pass --recipes a,b,c (`slimlm recipes` lists the shipped ones)")
    local = Path(model).expanduser()
    model = str(local.resolve()) if local.exists() else model  # workers may run elsewhere (Ray)
    key = model_id(model)  # refuses a missing path
    get_protocol(settings.protocol)  # refuses an unknown protocol
    loaded = [r if isinstance(r, Recipe) else load_recipe(os.fspath(r)) for r in recipes]
    return _Plan(model, settings, expand(loaded, grid, model_key=key, settings=settings), out)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One sweep per folder at a time (an advisory lock; none where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(out / ".sweep.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SlimlmError(f"{out} is being swept by another process; wait for it or choose another --out") from None
        yield


def _prepare(plan: _Plan, old: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Check what the folder already holds (``old``: its sweep.json) and write sweep.json; -> the job.json of
    each finished job."""
    out, settings = plan.out, plan.settings
    if old is not None and old.get("settings", settings.to_dict()) != settings.to_dict():
        raise SlimlmError(f"{out} was swept with {old['settings']}, not {settings.to_dict()}; rerun with the same "
                          "--tokens/--calib-samples or choose another --out")  # fmt: skip
    if (out / "base" / "result.json").exists():
        try:
            load_result(out / "base" / "result.json")
        except SlimlmError:
            raise SlimlmError(f"{out / 'base' / 'result.json'} is corrupt or not a slimlm result; delete "
                              f"{out / 'base'} to measure the base again") from None
    done = {}
    for job in plan.jobs:
        doc = read_job(out / "jobs" / job.id)
        if doc is not None and doc["status"] == "done":
            done[job.id] = doc
    listed = [Job(id=j["id"], name=j["recipe"], spec={}) for j in (old or {}).get("jobs", [])]
    union = listed + [j for j in plan.jobs if j.id not in {x.id for x in listed}]
    doc = sweep_doc(plan.model, settings, union, created=(old or {}).get("created"))
    write_json(out / "sweep.json", {**doc, "settings": settings.to_dict()})
    for stale in [*(out / "jobs").glob(".*.tmp-*"), *out.glob(".base.tmp-*")]:  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    return done


def _outcome(job: Job, doc: dict[str, Any], out: Path, *, skipped: bool = False) -> JobOutcome:
    result = load_result(out / "jobs" / job.id / "result.json") if doc.get("status") == "done" else None
    return JobOutcome(id=job.id, name=job.name, status=doc.get("status", "failed"), error=doc.get("error"),
                      result=result, seconds=doc.get("seconds", 0.0), wall_seconds=doc.get("wall_seconds", 0.0),
                      skipped=skipped)  # fmt: skip


def _task(kind: str, plan: _Plan, dest: Path, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "dir": str(dest.resolve()), "model": plan.model, "settings": plan.settings.to_dict(),
            **extra}  # fmt: skip


def _runner(plan: _Plan, *, jobs: int, ray: bool, ray_address: str | None,
            request: RayRequest) -> contextlib.AbstractContextManager:
    """A context yielding ``run(tasks, on_done)``: local worker processes, or Ray tasks."""
    if not (ray or ray_address):
        return contextlib.nullcontext(lambda tasks, on_done: run_local(tasks, jobs=jobs, on_done=on_done))

    @contextlib.contextmanager
    def on_ray():
        with ray_session(address=ray_address, num_cpus=jobs * request.cpus) as rt:
            yield lambda tasks, on_done: run_ray(rt, tasks, request=request, on_done=on_done)

    return on_ray()


def _base(plan: _Plan, run: Callable, *, speed: bool, threads: int) -> Result:
    """The base's Result: measured once per folder (in a worker, like the jobs), then read back."""
    dest = plan.out / "base"
    if not (dest / "result.json").exists():
        outcome: dict[str, Any] = {}
        run([_task("base", plan, dest, speed=speed, threads=threads)], lambda task, o: outcome.update(o))
        if outcome.get("status") != "done":
            raise SlimlmError(outcome.get("error") or "the base measurement failed")
    base = load_result(dest / "result.json")
    log.info("base %s: ppl %.3f (%s)", plan.model, base.quality.perplexity, dest)
    return base


def _record(job: Job, plan: _Plan, outcome: dict[str, Any]) -> dict[str, Any]:
    """A worker that died without writing its job.json: record the failure for it."""
    if outcome.get("schema") is None:
        outcome = job_doc(job, model=plan.model, settings=plan.settings, status="failed", error=outcome["error"],
                          seconds=0.0, wall_seconds=0.0)  # fmt: skip
        write_json(plan.out / "jobs" / job.id / "job.json", outcome)
    return outcome


def _job_tasks(plan: _Plan, todo: Sequence[Job], **common: Any) -> list[dict[str, Any]]:
    base = str((plan.out / "base" / "result.json").resolve())
    return [_task("job", plan, plan.out / "jobs" / j.id, job=dataclasses.asdict(j), base_result=base, **common)
            for j in todo]  # fmt: skip


def _check_counts(**counts: int | None) -> None:
    for name, value in counts.items():
        if value is not None:
            check_pos_int(f"--{name.replace('_', '-')}", value, "a count")


def sweep(model: str, recipes: Sequence[str | Recipe], *, grid: dict[str, Sequence[Any]] | None = None,
          out: str | os.PathLike, protocol: str = "wiki-v1", tokens: int | None = None, full: bool = False,
          calib_samples: int | None = None, jobs: int = 1, ray: bool = False, ray_address: str | None = None,
          keep_models: bool = False, speed: bool = True, threads: int | None = None, gpus_per_job: float = 0.0,
          memory_per_job_gb: float | None = None,
          on_job: Callable[[JobOutcome, int], None] | None = None) -> SweepReport:
    """Compress ``model`` with every recipe (crossed with ``grid``) into ``out`` and measure each job.

    ``jobs`` run at a time (local processes, or the size of a Ray runtime
    started here with ``ray``; ``ray_address`` joins a cluster instead), each
    with ``threads`` torch threads (the CPUs a Ray task asks for; default the
    threads here divided by ``jobs``). ``on_job(outcome, n_jobs)`` is called
    for each job as it finishes (first for those finished by an earlier run).
    """
    _check_counts(jobs=jobs, tokens=tokens, calib_samples=calib_samples, threads=threads)
    if ray and ray_address:
        raise SlimlmError("--ray starts a Ray runtime here and --ray-address joins a cluster; give one of them")
    threads = threads or max(1, torch.get_num_threads() // jobs)
    request = RayRequest(cpus=threads, gpus=gpus_per_job, memory_gb=memory_per_job_gb)
    plan = _plan(model, recipes, grid, Path(out), Settings(protocol, tokens, full, calib_samples))
    if ray or ray_address:
        import_ray()  # refuses a missing Ray now
    if ray_address:
        check_address(ray_address)
    if jobs > 1 and speed:
        log.warning("%d jobs at a time share this machine: their speed numbers disturb each other", jobs)
    old = check_folder(plan.out, plan.model, plan.settings)
    writable(plan.out)
    report = on_job or (lambda outcome, n: None)
    with _locked(plan.out):
        done = _prepare(plan, old)
        outcomes = {j.id: _outcome(j, done[j.id], plan.out, skipped=True) for j in plan.jobs if j.id in done}
        for o in outcomes.values():
            report(o, len(plan.jobs))
        by_id = {j.id: j for j in plan.jobs}

        def finished(task: dict[str, Any], outcome: dict[str, Any]) -> None:
            job = by_id[task["job"]["id"]]
            outcomes[job.id] = _outcome(job, _record(job, plan, outcome), plan.out)
            report(outcomes[job.id], len(plan.jobs))

        with _runner(plan, jobs=jobs, ray=ray, ray_address=ray_address, request=request) as run:
            base = _base(plan, run, speed=speed, threads=threads)
            todo = [j for j in plan.jobs if j.id not in done]
            run(_job_tasks(plan, todo, speed=speed, keep_model=keep_models, threads=threads), finished)
    return SweepReport(out=plan.out, base=base, jobs=tuple(outcomes[j.id] for j in plan.jobs))
