"""Sweeps: many recipes on one model, each job in its own process or Ray task, resumable.

    report = sweep("smollm2-135m", ["rtn-int4-g64", "gptq-int4-g64"], grid={"bits": [3, 4]}, out="runs/a")

``jobs`` (grid, identity, the folder's files), ``worker`` (one task: the base
or a job), ``local`` / ``ray_runner`` (where tasks run), ``samples`` (greedy
samples for side-by-side reading), ``run`` (``sweep()``); ``report`` (with
``folder``, ``table``, ``plots``, ``pareto``) reads the folder into one HTML page.
"""

from slimlm.sweep.jobs import Job, Settings, expand, job_id, parse_grid
from slimlm.sweep.run import JobOutcome, SweepReport, sweep
from slimlm.sweep.samples import PROMPTS

__all__ = ["Job", "JobOutcome", "PROMPTS", "Settings", "SweepReport", "expand", "job_id", "parse_grid", "sweep"]
