"""``slimlm compress`` in a process that SIGKILLs itself right after its training state at step K is written.

    python tests/pipelines/compress_kill_worker.py K -- <slimlm compress arguments>

K = 0 runs the command unchanged (no kill). Used by tests/pipelines/test_compress_resume.py to
interrupt a real CLI run at a known step, without timing races.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import slimlm.train.loop as loop
from slimlm.cli import main

kill_at = int(sys.argv[1])
save_state = loop.save_state


def save_then_die(state_dir, state):
    path = save_state(state_dir, state)
    if state["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


loop.save_state = save_then_die
torch.set_num_threads(1)
sys.exit(main(sys.argv[3:]))
