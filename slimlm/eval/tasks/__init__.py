"""slimlm's local lm-eval tasks: YAML configs over JSONL files shipped beside them.

``slimlm_wiki_lastword`` and ``slimlm_pydoc_choice`` are built from the protocol texts
by ``build.py`` (its docstring says exactly how); pass ``TASKS_DIR`` to lm-eval as
``include_path`` (``TaskManager(include_path=TASKS_DIR)``, ``lm_eval --include_path``).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
LOCAL_TASKS = ("slimlm_wiki_lastword", "slimlm_pydoc_choice")
LOCAL_PREFIX = "slimlm_"  # a task name in this namespace is one of LOCAL_TASKS or unknown

__all__ = ["TASKS_DIR", "LOCAL_TASKS", "LOCAL_PREFIX"]
