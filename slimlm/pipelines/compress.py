"""compress(): load -> calibrate -> apply a recipe -> save -> reload -> measure base and compressed.

    report = compress("smollm2-135m", "gptq-int4-g64", out="out/g", eval_data="notes.txt")
    print(report.summary())

The one pipeline behind ``slimlm compress``, Python users and sweeps. Every
refusal (unknown recipe or protocol, unreadable or too short text, an
existing output) comes before anything is written: the texts are read and
tokenized, and the calibration batch drawn, before the first evaluation.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimlm.api import apply_all, needs_calibration
from slimlm.errors import SlimlmError
from slimlm.data import bos_id
from slimlm.eval import (Protocol, Result, calibration_ids, calibration_record, eval_tokens, evaluate, for_tokenizer,
                         format_results, with_user_text)
from slimlm.eval.runner import eval_windows
from slimlm.io import load_compressed, save_compressed
from slimlm.methods import method_for
from slimlm.models import load_model
from slimlm.models.identity import model_dir, model_id
from slimlm.models.lazy import load_lazy
from slimlm.pipelines.lazy import check_lazy, compress_lazy
from slimlm.pipelines.training import prepare_training
from slimlm.recipe import Recipe, load_recipe
from slimlm.validate import check_pos_int

@dataclass(frozen=True)
class CompressReport:
    base: Result  # the model as loaded, as its own base
    compressed: Result  # the saved checkpoint, reloaded, against the base
    seconds: float  # time spent compressing (calibration statistics and the methods), not measuring
    out: Path  # the checkpoint directory
    recipe: str  # the recipe's name

    @property
    def results(self) -> list[Result]:
        return [self.base, self.compressed]

    def summary(self) -> str:
        """What ``slimlm compress`` prints: the comparison table and where the checkpoint went."""
        return (f"{format_results(self.results)}\n"
                f"recipe {self.recipe}: compressed in {self.seconds:.1f} s; saved to {self.out}")


def refuse_existing(path: str | os.PathLike | None, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked, before any slow work."""
    if path and Path(path).exists() and not overwrite:
        raise SlimlmError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")


def default_out(model: str, recipe_name: str) -> Path:
    """out/<model stem>-<recipe name>, for a model given as a name, directory or .gguf file."""
    stem = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    return Path("out") / f"{stem}-{recipe_name}"


def checked_stream(tokenizer: Any, protocol: Protocol, *, n_tokens: int | None, full: bool) -> torch.Tensor:
    """The protocol's evaluation text tokenized, refused now if it cannot fill the windows asked for."""
    stream = eval_tokens(tokenizer, protocol)  # (N,)
    eval_windows(stream, for_tokenizer(protocol, tokenizer), n_tokens=n_tokens, full=full)
    return stream


def calibration(steps: list[Any], tokenizer: Any, protocol: Protocol,
                n_samples: int | None) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """The calibration ids the steps need (or None) and their record for the manifest."""
    if not needs_calibration(steps):
        return None, None
    calib = calibration_ids(tokenizer, protocol, n_samples=n_samples)  # (n_samples, seq_len)
    return calib, calibration_record(protocol, calib, bos=bos_id(tokenizer) is not None)


def _refuse_adapter_steps(steps: list) -> list:
    """``steps``, unless one leaves a PEFT adapter beside the base (no checkpoint form): refused before any work."""
    for config in steps:
        if getattr(config, "leaves_adapter", False):
            name = method_for(config).name
            fix = "set merge: true, or " if hasattr(config, "merge") else ""
            raise SlimlmError(f"recipe step {name} keeps its adapter beside the base, which a compressed checkpoint "
                              f"cannot hold; {fix}train it from Python and save it with slimlm.peft.save_adapter")
    return steps


def compress(
    model: str,
    recipe: str | os.PathLike | Recipe = "default",
    *,
    out: str | os.PathLike | None = None,
    protocol: str | Protocol = "wiki-v1",
    calib_data: str | None = None,
    eval_data: str | None = None,
    calib_samples: int | None = None,
    tokens: int | None = None,
    full: bool = False,
    speed: bool = True,
    dtype: torch.dtype = torch.float32,
    lazy: bool = False,
    overwrite: bool = False,
    base_result: Result | None = None,
) -> CompressReport:
    """Compress ``model`` with ``recipe``, save it to ``out`` and measure it against the base.

    ``calib_data``/``eval_data`` are text sources (a .txt/.jsonl file,
    ``hf:...``) read instead of the protocol's own text; one source given to
    both is split by document, two are each used whole (``with_user_text``).
    ``lazy`` reads block weights from disk as needed and writes the checkpoint
    block by block, for models larger than memory (the measurements then load
    each model whole). ``base_result``: the base measured before (a sweep's), reused.
    """
    if tokens is not None:
        check_pos_int("--tokens", tokens, "evaluation tokens")
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(os.fspath(recipe))
    steps = _refuse_adapter_steps(list(rec.steps))
    out = Path(out) if out else default_out(model, rec.name)
    refuse_existing(out, overwrite)
    proto = with_user_text(protocol, calib_data=calib_data, eval_data=eval_data)  # reads and checks the texts
    if lazy:
        check_lazy(steps)  # refuse before any slow work
        seconds, stream = _compress_lazy(model, rec, proto, out, calib_samples=calib_samples, tokens=tokens,
                                         full=full, dtype=dtype, overwrite=overwrite)  # fmt: skip
        work, tokenizer = load_model(model, dtype=dtype)
    else:
        work, tokenizer = load_model(model, dtype=dtype)
        stream = checked_stream(tokenizer, proto, n_tokens=tokens, full=full)
        calib, record = calibration(steps, tokenizer, proto, calib_samples)
        training = prepare_training(steps, tokenizer, proto, out, model=model_id(model), recipe=rec.spec,
                                    calib_samples=calib_samples)  # fmt: skip  (refuses before any slow work)
    measure = dict(protocol=proto, n_tokens=tokens, full=full, speed=speed, stream=stream)
    base_id, base = model_id(model), _base(work, tokenizer, model, base_result, measure)
    if not lazy:
        t0 = time.perf_counter()
        apply_all(work, steps, calib, tokenizer=tokenizer, **training.apply_kwargs())
        seconds = time.perf_counter() - t0
        save_compressed(work, tokenizer, out, base_model=model, recipe=rec.spec, calibration=record,
                        overwrite=overwrite)  # fmt: skip
        training.finished()
    del work
    work, tokenizer = load_compressed(out)  # measure what was saved, not what is in memory
    compressed = evaluate(work, tokenizer, source=str(out), model_id=model_id(str(out)), base_source=model,
                          base_id=base_id, load_base=lambda: load_model(model, dtype=dtype)[0], model_dir=str(out),
                          recipe=rec.spec, **measure)  # fmt: skip
    compressed = compressed if lazy else dataclasses.replace(compressed, training=training.reports or None)
    return CompressReport(base=base, compressed=compressed, seconds=seconds, out=out, recipe=rec.name)


def _base(work: Any, tokenizer: Any, model: str, base_result: Result | None, measure: dict[str, Any]) -> Result:
    """The base's Result: measured now (its outputs cached on disk for the KL divergence), or the one given."""
    if base_result is None:
        return evaluate(work, tokenizer, source=model, model_id=model_id(model), model_dir=model_dir(model), **measure)
    if base_result.model != model:
        raise SlimlmError(f"base_result measures {base_result.model}, not {model}; pass the base of this model")
    return base_result


def _compress_lazy(model: str, rec: Recipe, proto: Protocol, out: Path, *, calib_samples: int | None,
                   tokens: int | None, full: bool, dtype: torch.dtype, overwrite: bool) -> tuple[float, torch.Tensor]:
    """Block weights read from disk as needed, compressed blocks streamed to ``out``; -> (seconds, stream)."""
    lazy_model, tokenizer = load_lazy(model, dtype=dtype)
    stream = checked_stream(tokenizer, proto, n_tokens=tokens, full=full)  # before anything is written
    calib, record = calibration(list(rec.steps), tokenizer, proto, calib_samples)
    t0 = time.perf_counter()
    compress_lazy(lazy_model, tokenizer, list(rec.steps), out, calib=calib, base_model=model, recipe=rec.spec,
                  calibration=record, overwrite=overwrite)  # fmt: skip
    return time.perf_counter() - t0, stream
