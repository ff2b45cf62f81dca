"""``python -m slimlm.eval.lm_eval_cli ARGS``: lm-eval's own command line, with ``--model slimlm`` known.

    python -m slimlm.eval.lm_eval_cli --model slimlm --model_args model=out/gptq-int4-g64 \\
        --tasks slimlm_wiki_lastword,slimlm_pydoc_choice --device cpu --batch_size 8

lm-eval 0.4 finds model classes only in its own table (it reads no entry points), so
this module imports the adapter (which registers ``slimlm``) and then runs lm-eval's
CLI on the same arguments. Without ``--include_path`` it adds slimlm's local task
directory, so the ``slimlm_*`` tasks resolve. ``model_args`` takes ``model=`` (any
source ``slimlm.models.load_model`` reads) and ``dtype=`` (float32, bfloat16, float16);
lm-eval's ``--device`` defaults to cuda:0, so pass ``--device cpu`` on a CPU machine.
"""

from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

import slimlm.eval.lm_eval_adapter  # noqa: F401  (registers --model slimlm)
from slimlm.eval.tasks import TASKS_DIR


def with_local_tasks(argv: list[str]) -> list[str]:
    """``argv`` plus ``--include_path <slimlm's tasks>`` unless it names an include path already."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    if argv and argv[0] in ("ls", "validate", "run"):  # subcommands taking --include_path
        return [*argv, "--include_path", str(TASKS_DIR)]
    return ["run", *argv, "--include_path", str(TASKS_DIR)] if argv else argv


def main() -> None:
    sys.argv[1:] = with_local_tasks(sys.argv[1:])
    cli_evaluate()


if __name__ == "__main__":
    main()
