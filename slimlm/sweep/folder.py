"""Reading a sweep folder (the layout `slimlm sweep` writes, runs/NAME/) without changing it.

Every file is checked as it is read: a missing, corrupt or foreign JSON is one SlimlmError that
names the file. A job listed in sweep.json without a job.json has not run yet (``pending``: an
interrupted sweep); a job folder that sweep.json does not list is ignored.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.eval.result import Result, check_comparable

log = logging.getLogger(__name__)

SWEEP_SCHEMA = "slimlm.sweep/1"
JOB_SCHEMA = "slimlm.job/1"
SAMPLES_SCHEMA = "slimlm.samples/1"
RESULT_SCHEMA = "slimlm.result/1"
STATUSES = ("done", "failed")
_RERUN = "rerun `slimlm sweep` with the same --out to rewrite it"


@dataclass(frozen=True)
class Sample:
    prompt: str
    text: str


@dataclass(frozen=True)
class JobRecord:
    id: str
    recipe: str  # the display name sweep.json gives, grid values appended: gptq-int4-g64[bits=3]
    status: str  # "done" | "failed" | "pending" (listed, not run yet)
    error: str | None = None  # a failed job's one-line error
    seconds: float | None = None  # compress time
    wall_seconds: float | None = None
    result: Result | None = None  # only when done
    samples: tuple[Sample, ...] | None = None  # None: no samples.json


@dataclass(frozen=True)
class SweepRun:
    path: Path
    model: str
    protocol: str
    created: str
    base: Result
    base_samples: tuple[Sample, ...] | None
    jobs: tuple[JobRecord, ...]

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def with_status(self, status: str) -> list[JobRecord]:
        return [j for j in self.jobs if j.status == status]


def _read_json(path: Path, schema: str, *, missing: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SlimlmError(f"{path} is missing; {missing}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SlimlmError(f"cannot read {path}: {e}; check its permissions or {_RERUN}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise SlimlmError(f"{path} is corrupt JSON ({e.msg} at line {e.lineno}); delete it and {_RERUN}") from None
    found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
    if found != schema:
        raise SlimlmError(f"{path} is not a {schema} file (schema {found!r}); a foreign file in a sweep folder: "
                          f"move it away or {_RERUN}")
    return doc


def _field(doc: dict, key: str, kind: type | tuple[type, ...], path: Path, *, optional: bool = False) -> Any:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SlimlmError(f"{path}: field {key!r} should be a {want}, found {value!r}; delete it and {_RERUN}")
    return value


def _result(path: Path, *, missing: str) -> Result:
    doc = _read_json(path, RESULT_SCHEMA, missing=missing)
    try:
        return Result.from_dict(doc)
    except (SlimlmError, TypeError, KeyError, AttributeError) as e:
        raise SlimlmError(f"{path} is not a readable slimlm result ({e}); delete it and {_RERUN}") from None


def _samples(path: Path) -> tuple[Sample, ...] | None:
    if not path.exists():
        return None
    doc = _read_json(path, SAMPLES_SCHEMA, missing="")
    items = _field(doc, "samples", list, path)
    out = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("prompt"), str) and isinstance(item.get("text"), str)):
            raise SlimlmError(f"{path}: each sample needs a string prompt and text, found {item!r}; delete it and {_RERUN}")
        out.append(Sample(item["prompt"], item["text"]))
    return tuple(out)


def _job(folder: Path, job_id: str, recipe: str) -> JobRecord:
    jdir = folder / "jobs" / job_id
    path = jdir / "job.json"
    if not path.exists():
        return JobRecord(job_id, recipe, "pending")
    doc = _read_json(path, JOB_SCHEMA, missing="")
    if _field(doc, "id", str, path) != job_id:
        raise SlimlmError(f"{path} holds job {doc['id']!r}, not {job_id!r}; a job folder was renamed: {_RERUN}")
    status = _field(doc, "status", str, path)
    if status not in STATUSES:
        raise SlimlmError(f"{path}: status {status!r} is not one of {', '.join(STATUSES)}; delete it and {_RERUN}")
    result = _result(jdir / "result.json", missing=f"job {job_id} says done without one: {_RERUN}") \
        if status == "done" else None  # fmt: skip
    return JobRecord(
        job_id, recipe, status, error=_field(doc, "error", str, path, optional=True),
        seconds=_field(doc, "seconds", (int, float), path, optional=True),
        wall_seconds=_field(doc, "wall_seconds", (int, float), path, optional=True),
        result=result, samples=_samples(jdir / "samples.json"),
    )  # fmt: skip


def read_sweep(folder: str | os.PathLike) -> SweepRun:
    """Everything a sweep folder holds; refuses (one line, naming the file) what it cannot trust."""
    folder = Path(folder)
    if not (folder / "sweep.json").is_file():
        raise SlimlmError(f"{folder} is not a sweep folder (no sweep.json); pass the --out folder of `slimlm sweep`")
    path = folder / "sweep.json"
    doc = _read_json(path, SWEEP_SCHEMA, missing="")
    listed = _field(doc, "jobs", list, path)
    jobs = []
    for entry in listed:
        if not (isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("recipe"), str)
                and entry["id"] and "/" not in entry["id"] and not entry["id"].startswith(".")):
            raise SlimlmError(f"{path}: each job needs a string id and recipe, found {entry!r}; {_RERUN}")
        jobs.append(_job(folder, entry["id"], entry["recipe"]))
    base = _result(folder / "base" / "result.json", missing=f"the base model was not measured yet: {_RERUN}")
    check_comparable([base, *(j.result for j in jobs if j.result is not None)])
    return SweepRun(
        folder, model=_field(doc, "model", str, path), protocol=_field(doc, "protocol", str, path),
        created=_field(doc, "created", str, path, optional=True) or "", base=base,
        base_samples=_samples(folder / "base" / "samples.json"), jobs=tuple(jobs),
    )  # fmt: skip
