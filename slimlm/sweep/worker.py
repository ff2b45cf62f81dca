"""One sweep task in its own process: the base measurement, or one job (compress, measure, sample).

    python -m slimlm.sweep.worker TASK.json     # one task by hand (what the runners call as a function)

A task is a JSON-able dict built by :func:`slimlm.sweep.run.sweep`; the same
:func:`run_task` runs in a local worker process and in a Ray task. A job
folder is written whole into a temporary folder and renamed into place, so
``jobs/<id>/`` is either complete (``job.json`` done or failed) or absent.
A SlimlmError becomes ``status: failed`` with its one line; so does any
other exception (logged with its traceback), so one bad job never stops
the sweep.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from slimlm.errors import SlimlmError
from slimlm.eval import evaluate, get_protocol, load_result
from slimlm.fsutil import atomic_dir
from slimlm.io import load_compressed
from slimlm.models import load_model
from slimlm.models.identity import model_dir, model_id
from slimlm.pipelines.compress import checked_stream, compress
from slimlm.sweep.jobs import Job, Settings, job_doc, write_json
from slimlm.sweep.samples import generate_samples, write_samples

log = logging.getLogger("slimlm.sweep")


def _settings(task: dict[str, Any]) -> Settings:
    return Settings(**task["settings"])


def run_base(task: dict[str, Any]) -> dict[str, Any]:
    """Measure the base model as its own reference (its outputs go to the disk cache for every job's KL
    divergence) and sample it; writes ``base/result.json`` and ``base/samples.json``."""
    s, model = _settings(task), task["model"]
    work, tokenizer = load_model(model)
    stream = checked_stream(tokenizer, get_protocol(s.protocol), n_tokens=s.tokens, full=s.full)
    result = evaluate(work, tokenizer, source=model, model_id=model_id(model), model_dir=model_dir(model),
                      protocol=s.protocol, n_tokens=s.tokens, full=s.full, speed=task["speed"],
                      stream=stream)  # fmt: skip
    samples = generate_samples(work, tokenizer)
    with atomic_dir(task["dir"], overwrite=True) as tmp:
        result.save(tmp / "result.json")
        write_samples(tmp / "samples.json", samples)
    return {"status": "done", "error": None}


def _compress_job(task: dict[str, Any], job: Job, tmp: Path) -> float:
    """Compress and measure one job into ``tmp`` (result.json, samples.json, model/); -> compress seconds."""
    s = _settings(task)
    base = load_result(task["base_result"])
    report = compress(task["model"], job.recipe(), out=tmp / "model", protocol=s.protocol, tokens=s.tokens,
                      full=s.full, calib_samples=s.calib_samples, speed=task["speed"], base_result=base)  # fmt: skip
    # The checkpoint's temporary path means nothing after the rename: the result is named by its recipe.
    dataclasses.replace(report.compressed, model=job.name).save(tmp / "result.json")
    model, tokenizer = load_compressed(tmp / "model")
    write_samples(tmp / "samples.json", generate_samples(model, tokenizer))
    del model
    if not task["keep_model"]:
        shutil.rmtree(tmp / "model")
    return report.seconds


def run_job(task: dict[str, Any]) -> dict[str, Any]:
    """One job into ``jobs/<id>/``, done or failed; -> its job.json."""
    job, t0 = Job(**task["job"]), time.perf_counter()
    with atomic_dir(task["dir"], overwrite=True) as tmp:
        try:
            seconds, status, error = _compress_job(task, job, tmp), "done", None
        except SlimlmError as e:
            seconds, status, error = 0.0, "failed", str(e)
        except Exception as e:  # a bug in one job must not stop the sweep: recorded, traceback logged
            log.exception("job %s (%s) failed", job.id, job.name)
            seconds, status, error = 0.0, "failed", f"unexpected {type(e).__name__}: {e}"
        if status == "failed":
            for leftover in tmp.iterdir():
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        doc = job_doc(job, model=task["model"], settings=_settings(task), status=status, error=error,
                      seconds=seconds, wall_seconds=time.perf_counter() - t0)  # fmt: skip
        write_json(tmp / "job.json", doc)
    return doc


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task (``kind`` base or job) with its environment (``env``: variables to set) and thread count;
    never raises a SlimlmError (-> failed)."""
    os.environ.update(task.get("env", {}))
    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    if task["kind"] == "job":
        return run_job(task)
    try:
        return run_base(task)
    except SlimlmError as e:
        return {"status": "failed", "error": str(e)}


def run_in_child(task: dict[str, Any], conn: Any) -> None:
    """A local worker process's entry: the parent's environment and folder, then the task; the outcome goes
    back through ``conn`` (a forkserver child starts with the server's environment, not the parent's)."""
    os.environ.clear()  # run_task sets the parent's
    os.chdir(task.pop("cwd", os.getcwd()))
    conn.send(run_task(task))
    conn.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m slimlm.sweep.worker TASK.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    outcome = run_task(json.loads(Path(args[0]).read_text()))
    print(json.dumps({k: outcome.get(k) for k in ("status", "error")}))
    return 0 if outcome["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
