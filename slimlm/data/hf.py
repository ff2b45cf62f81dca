"""Documents from a Hugging Face dataset: the hub (``load_dataset``) or a local
directory written by ``save_to_disk`` (``load_from_disk``).

Spec (after the ``hf:`` prefix), fields separated by ``:``, empty = default::

    <path>                         only split of a saved Dataset / single-split dataset
    <path>:<split>
    <path>:<config>:<split>
    <path>:<config>:<split>:<column>   column defaults to "text"

so a column without a config reads ``hf:<path>::<split>:<column>``. A ``:``
inside brackets belongs to the split (``train[:1000]``). A local directory
has no config.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError

__all__ = ["HFSpec", "parse_hf_spec", "load_hf_documents"]

logger = logging.getLogger(__name__)

_FIELD_SEP = re.compile(r":(?![^\[]*\])")  # a ":" not inside [...]
_HELP = "expected hf:<path>[:<config>]:<split>[:<column>], e.g. hf:wikitext:wikitext-2-raw-v1:test"


@dataclass(frozen=True)
class HFSpec:
    path: str
    config: str | None = None
    split: str | None = None
    column: str = "text"


def parse_hf_spec(spec: str) -> HFSpec:
    """Parse the part after ``hf:`` (see the module docstring)."""
    fields = _FIELD_SEP.split(spec)
    if not fields[0] or len(fields) > 4:
        raise SlimlmError(f"cannot read the dataset source 'hf:{spec}': {_HELP}")
    path, rest = fields[0], fields[1:]
    if len(rest) == 1:  # <path>:<split>
        rest = ["", rest[0]]
    config, split, column = (rest + ["", "", ""])[:3]
    return HFSpec(path=path, config=config or None, split=split or None, column=column or "text")


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise SlimlmError(
            "reading an hf: dataset needs the `datasets` package: run `pip install datasets`") from e
    return datasets


def _pick_split(data: Any, spec: HFSpec) -> Any:
    """A Dataset from what load_* returned (a Dataset or a DatasetDict)."""
    if not hasattr(data, "keys"):  # a Dataset
        return data
    splits = list(data.keys())
    if spec.split is None:
        if len(splits) == 1:
            return data[splits[0]]
        raise SlimlmError(f"dataset {spec.path} has splits {', '.join(splits)}; name one, "
                          f"e.g. hf:{spec.path}:{splits[0]}")
    if spec.split not in data:
        raise SlimlmError(f"dataset {spec.path} has no split {spec.split!r}; valid: {', '.join(splits)}")
    return data[spec.split]


def _load(datasets: Any, spec: HFSpec) -> Any:
    if Path(spec.path).is_dir():
        if spec.config is not None:
            raise SlimlmError(f"{spec.path} is a local dataset directory, which has no config; "
                              f"use hf:{spec.path}:<split>[:<column>] or hf:{spec.path}::<split>:<column>")
        try:
            return _pick_split(datasets.load_from_disk(spec.path), spec)
        except FileNotFoundError as e:
            raise SlimlmError(f"{spec.path} is not a dataset saved with save_to_disk: {e}") from e
    try:
        data = datasets.load_dataset(spec.path, spec.config, split=spec.split)
    except (ConnectionError, OSError, ValueError) as e:  # DatasetNotFoundError is an OSError
        raise SlimlmError(
            f"cannot load dataset {spec.path!r} (config {spec.config}, split {spec.split}): {e}. "
            "The hub needs network access: check the network, or if it is cached locally set "
            "HF_DATASETS_OFFLINE=1; a directory written by save_to_disk also works") from e
    return _pick_split(data, spec)


def load_hf_documents(spec_text: str) -> list[str]:
    """The ``column`` strings of one split, in dataset order (empty rows dropped)."""
    spec = parse_hf_spec(spec_text)
    datasets = _import_datasets()
    data = _load(datasets, spec)
    if spec.column not in data.column_names:
        raise SlimlmError(f"dataset {spec.path} has no column {spec.column!r}; columns: "
                          f"{', '.join(data.column_names)} (pick one with hf:<path>:<config>:<split>:<column>)")
    docs = []
    for i, value in enumerate(data[spec.column]):
        if value is None:
            continue
        if not isinstance(value, str):
            raise SlimlmError(f"dataset {spec.path} column {spec.column!r} row {i} is "
                              f"{type(value).__name__}, not text; pick a text column")
        if value.strip():
            docs.append(value)
    logger.info("read %d documents from hf:%s", len(docs), spec_text)
    return docs
