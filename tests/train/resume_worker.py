"""A training run that tests/train/test_resume.py kills and resumes: run as a script, one run per process.

    python tests/train/resume_worker.py --state-dir DIR --out FILE [--kill-at STEP] [--steps 12]

A tiny seeded language model built from code (pure torch: importing
transformers costs this machine ~10 s per process) trains ``--steps`` steps
with ``checkpoint_every=3``, touching everything a resumed run must restore:
AdamW state, the window generator, dropout (torch's global RNG), a buffer
that ``on_step`` changes with Python's ``random``, and a projection outside
the model among the trained params. ``--kill-at k`` sends SIGKILL to itself
from ``on_step(k)``. The final weights (model and projection) go to
``--out``, the report's ``to_json()`` to ``--out`` + ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal

import torch
from torch import Tensor, nn

from slimlm.train import TrainConfig, next_token_loss, train

VOCAB, HIDDEN = 64, 32


class TinyLM(nn.Module):
    """Embedding, two residual MLP blocks with dropout, a linear head; ``drift`` is a buffer on_step moves."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * HIDDEN, HIDDEN))
            for _ in range(2)
        )
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.register_buffer("drift", torch.zeros(()))

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)  # (B, T, H)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h) + self.drift  # (B, T, V)


def build() -> tuple[TinyLM, nn.Linear, Tensor]:
    """The seeded model, a projection outside it, and (16, 24) calibration ids."""
    torch.manual_seed(0)
    model, proj = TinyLM(), nn.Linear(HIDDEN, HIDDEN)
    calib = torch.randint(0, VOCAB, (16, 24), generator=torch.Generator().manual_seed(1))
    return model, proj, calib


def run(state_dir: str, steps: int, kill_at: int | None) -> tuple[dict, dict]:
    """Train (resuming from ``state_dir`` if it holds a state); the final tensors and the report's JSON."""
    model, proj, calib = build()
    random.seed(2)

    def objective(m: nn.Module, ids: Tensor) -> Tensor:
        aux = proj(m.embed(ids)).square().mean()  # trains the projection outside the model
        return next_token_loss(m(ids), ids) + 1e-2 * aux

    def on_step(step: int) -> None:
        model.drift += 1e-3 * random.random()
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    config = TrainConfig(steps=steps, lr=3e-3, seq_len=16, batch_size=2, grad_accum=2, warmup=2,
                         precision="fp32", checkpoint_every=3, seed=3)  # fmt: skip
    params = list(model.parameters()) + list(proj.parameters())
    report = train(model, params, objective, calib, config, on_step=on_step, state_dir=state_dir,
                   fingerprint={"worker": "resume", "steps": steps})  # fmt: skip
    tensors = {**model.state_dict(), **{f"proj.{k}": v for k, v in proj.state_dict().items()}}
    return tensors, report.to_json()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    tensors, report = run(args.state_dir, args.steps, args.kill_at)
    torch.save(tensors, args.out)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
