"""The loader the task YAMLs name (``custom_dataset: !function local_data.local_jsonl``).

lm-eval resolves ``!function`` next to the YAML file, whereas ``data_files`` given to
``datasets.load_dataset("json", ...)`` resolve against the working directory; so the
YAMLs keep the file name in ``dataset_kwargs`` and this function reads it from here.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def local_jsonl(data_files: str, **_metadata):
    """{"test": the records of ``data_files``, a JSONL file beside this module}. lm-eval also passes
    the task's metadata (version, ...) as keywords: ignored."""
    import datasets

    lines = (HERE / data_files).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(x) for x in lines if x.strip()])})
