"""evaluate_sources(): measure models (or read saved results) on one protocol, against one base.

    results = evaluate_sources(["smollm2-135m", "out/g"], eval_data="notes.txt")
    print(format_results(results))

The pipeline behind ``slimlm eval``. A compressed checkpoint is measured
against the model it was made from (its manifest says which); several
sources are measured against the first. Saved result files join the table
only when they were measured on the same protocol and text.
"""

from __future__ import annotations

import dataclasses

import gc
from collections.abc import Sequence
from pathlib import Path

import torch

from slimlm.errors import SlimlmError
from slimlm.eval import Protocol, Result, check_comparable, evaluate, load_results, with_user_text
from slimlm.eval.accuracy import check_tasks, task_accuracy
from slimlm.eval.protocol import BOS_SUFFIX
from slimlm.eval.result import measured_on
from slimlm.io import is_compressed_dir, read_manifest
from slimlm.models import load_model
from slimlm.models.identity import local_path, model_dir, model_id
from slimlm.validate import check_pos_int


def default_base(source: str) -> str | None:
    """A compressed checkpoint is compared with the model it was made from; others with themselves."""
    path = local_path(source)
    if path and is_compressed_dir(path):
        return read_manifest(path).get("base_model")
    return None


def is_result_file(source: str) -> bool:
    return source.endswith(".json") and Path(source).is_file()


def _saved_results(sources: list[str], proto: Protocol) -> dict[str, list[Result]]:
    """Result files among ``sources`` (one result each, or a comparison's), refused now if they cannot
    sit beside what is measured."""
    saved = {s: load_results(s) for s in sources if is_result_file(s)}
    if len(saved) == len(sources):  # nothing to measure: format_results compares the files among themselves
        return saved
    text = proto.eval_text
    here = measured_on(proto.name, text.source if text else None, text.sha256 if text else None)
    for path, r in ((path, r) for path, rs in saved.items() for r in rs):
        # "+bos" depends on the tokenizer of the models still to load: check_comparable sees it at the end
        if (r.protocol.removesuffix(BOS_SUFFIX), r.text_sha256) != (proto.name, text.sha256 if text else None):
            there = measured_on(r.protocol, r.text_source, r.text_sha256)
            raise SlimlmError(f"cannot set {path} (measured on {there}) beside results on {here}; "
                              "measure them all with the same --protocol and --eval-data")
    return saved


def _undated(r: Result) -> Result:
    return dataclasses.replace(r, created="")


def _checked(*, tokens: int | None, tasks: Sequence[str] | None, task_limit: int | None, speed: bool,
             compile_speed: bool) -> tuple[str, ...] | None:
    """evaluate_sources' settings refused before any model loads; -> the checked task names."""
    if tokens is not None:
        check_pos_int("--tokens", tokens, "evaluation tokens")
    if tasks is not None:
        tasks = check_tasks(tasks)  # an unknown task or missing lm-eval
    if task_limit is not None:
        check_pos_int("--task-limit", task_limit, "examples per task")
    if compile_speed and not speed:
        raise SlimlmError("--compile times decode with a compiled step; drop --no-speed (or --compile)")
    return tasks


def evaluate_sources(
    sources: list[str],
    *,
    protocol: str | Protocol = "wiki-v1",
    eval_data: str | None = None,
    base: str | None = None,
    tokens: int | None = None,
    full: bool = False,
    speed: bool = True,
    compile_speed: bool = False,
    dtype: torch.dtype = torch.float32,
    tasks: Sequence[str] | None = None,
    task_limit: int | None = None,
) -> list[Result]:
    """The Results of ``sources`` in order: one per model, those a saved .json holds (a comparison
    written by ``slimlm compress --json`` gives base and compressed; a result already listed, such
    as the base two such files share, is listed once).

    KL divergence is measured against ``base``; by default the first source
    when there are several, else a checkpoint's own base model, else the
    model itself. ``eval_data`` scores a user's text (an ad-hoc protocol).
    ``tasks`` adds lm-eval task accuracy (``slimlm.eval.accuracy``) to each measured
    model's Result, on the first ``task_limit`` examples of each task when given; ``compile_speed``:
    decode timed compiled.
    """
    proto = with_user_text(protocol, eval_data=eval_data)  # refuse an unknown protocol or bad text first
    tasks = _checked(tokens=tokens, tasks=tasks, task_limit=task_limit, speed=speed, compile_speed=compile_speed)
    if not sources:
        raise SlimlmError("no model to evaluate; give a built-in name, HF directory, hub id, .gguf or result .json")
    saved = _saved_results(sources, proto)
    if base is None and len(sources) > 1:  # the first column; a saved result stands for the model it measured
        base = saved[sources[0]][0].model if sources[0] in saved else sources[0]
    elif base is None and sources[0] not in saved:
        base = default_base(sources[0])
    results: list[Result] = []
    for source in sources:
        if source in saved:
            # two compress runs share their base: the same result, written at another time
            listed = [_undated(r) for r in results]
            results += [r for r in saved[source] if _undated(r) not in listed]
            continue
        model, tokenizer = load_model(source, dtype=dtype)
        other_base = base is not None and base != source
        results.append(evaluate(
            model, tokenizer, source=source, protocol=proto, n_tokens=tokens, full=full, model_id=model_id(source),
            base_source=base if other_base else None, base_id=model_id(base) if other_base else None,
            load_base=(lambda: load_model(base, dtype=dtype)[0]) if other_base else None, speed=speed,
            compile_speed=compile_speed, model_dir=model_dir(source),
        ))  # fmt: skip
        if tasks:
            scores = task_accuracy(model, tokenizer, tasks, limit=task_limit)
            results[-1] = dataclasses.replace(results[-1], tasks=scores)
        del model
        gc.collect()
    check_comparable(results)  # a saved result with(out) BOS beside models measured without (with) it
    return results
