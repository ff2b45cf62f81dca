"""Sweep jobs: the grid applied to recipes, each job's identity, and the files that record a sweep.

A job is one recipe (grid values applied) on one model, measured on one
protocol with fixed settings. Its ``id`` is a hash of all of that and the
slimlm version, so a re-run finds the jobs it has finished (``job.json`` says
``done``) and skips them; a ``failed`` job is run again. The folder layout is
fixed (``runs/NAME/sweep.json``, ``base/``, ``jobs/<id>/``) because
``slimlm report`` reads it.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import slimlm
from slimlm.errors import SlimlmError
from slimlm.formats import scheme_to_dict
from slimlm.formats.scheme import SCHEME_TYPES
from slimlm.fsutil import atomic_write_text
from slimlm.methods import METHODS
from slimlm.recipe import Recipe, config_from_dict, recipe_from_dict

SWEEP_SCHEMA = "slimlm.sweep/1"
JOB_SCHEMA = "slimlm.job/1"
STATUSES = ("done", "failed")


@dataclass(frozen=True)
class Settings:
    """What every job of a sweep is measured with; part of each job's identity."""

    protocol: str = "wiki-v1"
    tokens: int | None = None
    full: bool = False
    calib_samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "tokens": self.tokens, "full": self.full,
                "calib_samples": self.calib_samples}  # fmt: skip


@dataclass(frozen=True)
class Job:
    id: str
    name: str  # the recipe's name with its grid values: gptq-int4-g64[bits=3,group_size=32]
    spec: dict[str, Any]  # the recipe spec, grid applied (its ``name`` is ``name``)

    def recipe(self) -> Recipe:
        return recipe_from_dict(self.spec, default_name=self.name)


# ---------------------------------------------------------------- the grid

def parse_value(text: str) -> Any:
    """One grid value from the command line: an int, a float, true/false, else the text ("2:4", "int4-g64")."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["bits=3,4", "group_size=32,64"]`` -> ``{"bits": [3, 4], "group_size": [32, 64]}`` (order kept)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(parts):
            raise SlimlmError(f"--grid {item!r} is not KEY=V1,V2,...; write e.g. --grid bits=3,4 group_size=32,64")
        if key in grid:
            raise SlimlmError(f"--grid names {key} twice; give all its values once: {key}=v1,v2")
        grid[key] = [parse_value(p) for p in parts]
    return grid


def _flat_step(step: Any) -> dict[str, Any]:
    """``{rtn: {bits: 4}}`` -> ``{method: rtn, bits: 4}``; other forms as written (copied)."""
    if isinstance(step, dict) and len(step) == 1 and "method" not in step:
        (method, body), = step.items()
        return {"method": method, **copy.deepcopy(body or {})}
    return copy.deepcopy(step)


def _set_in_step(step: dict[str, Any], key: str, value: Any) -> bool:
    """Set ``key`` in one (flat) step if its method has that field, directly or in its scheme; -> whether it did.

    A scheme field (bits, group_size, ...) is set in the step's scheme written out in full
    (``scheme_to_dict``), whatever form the recipe used (``int4-g64``, inline fields, the default).
    """
    entry = METHODS.get(step.get("method"))
    if entry is None:
        return False
    own = {f for f in entry.config.__dataclass_fields__ if f != "targets"} | {"include", "exclude", "lm_head"}
    if key in own and key != "scheme":
        step[key] = value
        return True
    scheme = getattr(config_from_dict(step), "scheme", None)
    if not isinstance(scheme, SCHEME_TYPES):
        return False
    written = scheme_to_dict(scheme)
    if key not in written:
        return False
    for inline in set(written) - own:  # inline scheme fields move into the scheme
        step.pop(inline, None)
    step["scheme"] = {**written, key: value}
    return True


def apply_grid(spec: dict[str, Any], point: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The recipe spec with each ``point`` value set in every step that has the field; -> (spec, keys set)."""
    out = copy.deepcopy(spec)
    if not point:  # the recipe as written: its id is the same as in a sweep without a grid
        return out, []
    out["steps"] = [_flat_step(s) for s in spec["steps"]]
    used = []
    for key, value in point.items():
        hits = [_set_in_step(step, key, value) for step in out["steps"] if isinstance(step, dict)]
        if any(hits):
            used.append(key)
    return out, used


def display_name(name: str, point: Mapping[str, Any]) -> str:
    return name + (f"[{','.join(f'{k}={v}' for k, v in point.items())}]" if point else "")


def expand(recipes: Sequence[Recipe], grid: Mapping[str, Sequence[Any]] | None, *, model_key: str,
           settings: Settings) -> list[Job]:
    """Every (recipe, grid point) job, each recipe crossed with the grid keys its steps have; refused
    before any work when a key fits no recipe or a value is invalid. Duplicates (same id) once."""
    grid = dict(grid or {})
    fits = {key: False for key in grid}
    jobs: dict[str, Job] = {}
    for rec in recipes:
        keys = [k for k in grid if apply_grid(rec.spec, {k: grid[k][0]})[1]]
        for k in keys:
            fits[k] = True
        for values in itertools.product(*(grid[k] for k in keys)):
            point = dict(zip(keys, values))
            spec, _ = apply_grid(rec.spec, point)
            spec["name"] = name = display_name(rec.name, point)
            try:
                recipe_from_dict(spec)  # the recipe's own checks, now
            except SlimlmError as e:
                raise SlimlmError(f"{name}: {e}") from None
            job = Job(id=job_id(model_key, spec, settings), name=name, spec=spec)
            jobs.setdefault(job.id, job)
    unfit = [k for k, ok in fits.items() if not ok]
    if unfit:
        raise SlimlmError(f"--grid key(s) {', '.join(unfit)} match no step of "
                          f"{', '.join(r.name for r in recipes)}; use a field of a step's method or its scheme "
                          "(bits, group_size, sparsity, ...)")  # fmt: skip
    return list(jobs.values())


# ---------------------------------------------------------------- identity

def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def job_id(model_key: str, spec: dict[str, Any], settings: Settings) -> str:
    """First 16 hex of sha256 over (model identity, recipe spec, protocol and eval settings, slimlm version)."""
    ident = {"model": model_key, "recipe": spec, **settings.to_dict(), "slimlm": slimlm.__version__}
    return hashlib.sha256(canonical(ident).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- files

def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path, schema: str, fix: str) -> dict[str, Any]:
    """A JSON document of ``schema``, or a one-line refusal naming the file and ``fix``."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SlimlmError(f"{path} is unreadable or corrupt ({str(e).splitlines()[0]}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise SlimlmError(f"{path} is not a {schema} file (schema {found!r}); {fix}")
    return doc


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")


def job_doc(job: Job, *, model: str, settings: Settings, status: str, error: str | None, seconds: float,
            wall_seconds: float) -> dict[str, Any]:
    if status not in STATUSES:
        raise ValueError(f"job status {status!r}; valid: {', '.join(STATUSES)}")
    return {"schema": JOB_SCHEMA, "id": job.id, "model": model, "recipe_name": job.name, "recipe": job.spec,
            "protocol": settings.protocol, "slimlm": slimlm.__version__, "status": status, "error": error,
            "seconds": seconds, "wall_seconds": wall_seconds, "finished": now()}  # fmt: skip


def read_job(job_dir: Path) -> dict[str, Any] | None:
    """A job's job.json (checked), or None when the job has not been run."""
    path = job_dir / "job.json"
    if not path.exists():
        return None
    fix = f"delete {job_dir} to run that job again"
    doc = read_json(path, JOB_SCHEMA, fix)
    if doc.get("id") != job_dir.name or doc.get("status") not in STATUSES:
        raise SlimlmError(f"{path} does not describe job {job_dir.name} (id {doc.get('id')!r}, status "
                          f"{doc.get('status')!r}); {fix}")  # fmt: skip
    if doc["status"] == "done" and not (job_dir / "result.json").is_file():
        raise SlimlmError(f"{path} says done but {job_dir / 'result.json'} is missing; {fix}")
    return doc


def sweep_doc(model: str, settings: Settings, jobs: Sequence[Job], *, created: str | None = None) -> dict[str, Any]:
    return {"schema": SWEEP_SCHEMA, "model": model, "protocol": settings.protocol, "created": created or now(),
            "jobs": [{"id": j.id, "recipe": j.name} for j in jobs]}  # fmt: skip


def check_folder(out: Path, model: str, settings: Settings) -> dict[str, Any] | None:
    """The sweep.json already in ``out`` (None for a new or empty folder), refused when it is foreign,
    corrupt, or a sweep of another model or protocol."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise SlimlmError(f"--out {out} is a file; give a folder for the sweep")
    path = out / "sweep.json"
    if not path.exists():
        if any(not p.name.startswith(".") for p in out.iterdir()):  # (.sweep.lock may be there)
            raise SlimlmError(f"{out} exists and is not a sweep folder (no sweep.json); choose another --out")
        return None
    doc = read_json(path, SWEEP_SCHEMA, "choose another --out (or delete that file)")
    if (doc.get("model"), doc.get("protocol")) != (model, settings.protocol) or not isinstance(doc.get("jobs"), list):
        raise SlimlmError(f"{out} is a sweep of {doc.get('model')} on {doc.get('protocol')}, not of {model} on "
                          f"{settings.protocol}; choose another --out")  # fmt: skip
    return doc


def writable(out: Path) -> None:
    """Refuse an --out that cannot be written, before any work (the folder is created)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SlimlmError(f"cannot write to --out {out} ({e.strerror or e}); choose a writable folder") from None
