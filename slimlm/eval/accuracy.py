"""Task accuracy through lm-evaluation-harness, beside perplexity and KLD.

    scores = task_accuracy(model, tokenizer, ["slimlm_wiki_lastword", "slimlm_pydoc_choice"], limit=100)
    # {"slimlm_wiki_lastword": {"acc": 0.12, "acc_stderr": 0.019, "samples": 100, "version": 1.0}, ...}

Task names are slimlm's local tasks (``slimlm.eval.tasks``: built from the protocol
texts, no dataset hub needed) or any task lm-eval knows, whose data lm-eval fetches
from the hub as usual. Names are checked before any model work: a name starting with
``slimlm_`` against the local tasks at once, others against lm-eval's index (building
it reads lm-eval's ~15,000 task configs, seconds; once per process).

lm-eval is optional (``pip install 'slimlm[tasks]'``); it is imported here only inside
functions, and the model class (``slimlm.eval.lm_eval_adapter.SlimlmLM``) is reached
through lm-eval's registry under the name ``slimlm``, the same way ``lm_eval --model
slimlm`` reaches it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from slimlm.errors import SlimlmError
from slimlm.eval.tasks import LOCAL_PREFIX, LOCAL_TASKS, TASKS_DIR
from slimlm.validate import check_pos_int

log = logging.getLogger("slimlm.eval")

INSTALL = "pip install 'slimlm[tasks]' (or pip install 'lm-eval>=0.4')"
MODEL_NAME = "slimlm"
MODEL_CLASS = "slimlm.eval.lm_eval_adapter:SlimlmLM"
BOOTSTRAP_ITERS = 1000  # lm-eval's standard errors: closed form for means, this many resamples for the rest


def parse_tasks(spec: str) -> tuple[str, ...]:
    """``"a,b"`` (the CLI's --tasks) -> ("a", "b"), blanks dropped."""
    return tuple(name.strip() for name in spec.split(",") if name.strip())


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise SlimlmError(f"task accuracy runs lm-evaluation-harness, which is not installed: {INSTALL}") from e


@functools.lru_cache(maxsize=2)
def task_manager(*, hub_tasks: bool):
    """lm-eval's TaskManager over slimlm's local tasks, plus lm-eval's own when ``hub_tasks``."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=hub_tasks)


def _needs_hub(names: Sequence[str]) -> bool:
    return any(name not in LOCAL_TASKS for name in names)


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """The task names, refused in one line when empty, repeated or unknown to lm-eval."""
    if isinstance(tasks, str):
        tasks = parse_tasks(tasks)
    names = tuple(tasks)
    local = ", ".join(LOCAL_TASKS)
    if not names:
        raise SlimlmError(f"no task given; slimlm's local tasks: {local}")
    if len(set(names)) != len(names):
        raise SlimlmError(f"a task is listed twice in {', '.join(names)}; name each once")
    bad = [n for n in names if n.startswith(LOCAL_PREFIX) and n not in LOCAL_TASKS]
    if bad:
        raise SlimlmError(f"unknown slimlm task {bad[0]!r}; slimlm's local tasks: {local}")
    _require_lm_eval()
    if _needs_hub(names):
        known = set(task_manager(hub_tasks=True).all_tasks)
        if bad := [n for n in names if n not in known]:
            raise SlimlmError(f"unknown task {bad[0]!r}: neither slimlm's ({local}) nor lm-eval's "
                              "(`lm_eval ls tasks` lists those)")  # fmt: skip
    return names


def slimlm_lm(model: nn.Module, tokenizer: Any, *, batch_size: int = 8, max_length: int | None = None):
    """lm-eval's model object for a loaded model (``SlimlmLM``, looked up by its registered name)."""
    from lm_eval.api.registry import get_model, model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_CLASS)  # imported on first get
    return get_model(MODEL_NAME)(model=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _number(value: Any) -> float | int | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def task_scores(output: dict[str, Any]) -> dict[str, dict[str, float | int]]:
    """lm-eval's ``simple_evaluate`` output -> {task: {metric: value, metric_stderr: value, samples, version}}.

    Metric keys lose lm-eval's ",none" filter suffix (other filters keep theirs); values
    lm-eval could not compute ("N/A", NaN) are left out.
    """
    scores = {}
    for task, metrics in output["results"].items():
        row: dict[str, float | int] = {}
        for key, value in metrics.items():
            if "," in key and (number := _number(value)) is not None:
                row[key.removesuffix(",none")] = number
        if (n := output.get("n-samples", {}).get(task)) is not None:
            row["samples"] = n["effective"]
        if (version := _number(output.get("versions", {}).get(task))) is not None:
            row["version"] = version
        scores[task] = row
    return scores


def task_accuracy(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, dict[str, float | int]]:
    """Zero-shot scores of ``model`` on ``tasks`` (see ``task_scores`` for the shape).

    ``limit`` scores only the first ``limit`` examples of each task (lm-eval's --limit);
    ``max_length`` caps the tokens per forward (default: the model's context).
    The caller's tokenizer is copied (lm-eval may set its pad token); the global RNGs
    are left alone (lm-eval's seeding is switched off: these tasks draw nothing at random).
    """
    names = check_tasks(tasks)
    if limit is not None:
        check_pos_int("limit", limit, "examples per task")
    check_pos_int("batch_size", batch_size, "sequences per forward")
    from lm_eval import simple_evaluate

    lm = slimlm_lm(model, tokenizer, batch_size=batch_size, max_length=max_length)
    try:
        output = simple_evaluate(model=lm, tasks=list(names), task_manager=task_manager(hub_tasks=_needs_hub(names)),
                                 limit=limit, log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS, random_seed=None,
                                 numpy_random_seed=None, torch_random_seed=None)  # fmt: skip
    except OSError as e:  # a hub task's data could not be fetched (datasets raises ConnectionError, an OSError)
        raise SlimlmError(f"lm-eval could not read the data of {', '.join(names)} ({e}); hub tasks need the "
                          f"dataset hub, slimlm's local tasks do not: {', '.join(LOCAL_TASKS)}") from None
    return task_scores(output)
