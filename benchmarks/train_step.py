"""Seconds per training step at fp32 and under bf16 autocast: is mixed precision worth it on this machine?

    .venv/bin/python benchmarks/train_step.py [--model smollm2-135m] [--steps 3] [--warmup 1] [--batch 4]
        [--seq-len 256] [--threads N] [--kd] [--precisions fp32,bf16] [--device cpu]

One step is what :func:`slimlm.train.train` does per optimizer step: the
forward and loss (next-token cross-entropy, or with ``--kd`` forward KL to a
frozen copy of the model, whose forward runs under no_grad in the same
precision) under the precision's autocast, backward, gradient-norm clip,
AdamW on every parameter. The ids are random tokens of the model's
vocabulary (the time does not depend on them). Rows: seconds per step (mean
of ``--steps`` after ``--warmup``), tokens per second, the ratio to the
first precision, threads. ``precision: auto`` in a training config makes
the same comparison on one linear layer (:mod:`slimlm.train.precision`);
this measures the whole step it predicts.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from slimlm.distill import frozen_copy, teacher_objective
from slimlm.models import load_model
from slimlm.train import next_token_objective
from slimlm.train.precision import PRECISIONS, autocast


def time_steps(model, objective, ids: torch.Tensor, precision: str, *, steps: int, warmup: int) -> float:
    """Mean wall seconds of ``steps`` training steps after ``warmup`` untimed ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(ids.device, precision):
            loss = objective(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss.item()  # waits for the device
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    model.eval()
    return sum(times) / len(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="built-in name, local HF directory or hub id")
    p.add_argument("--steps", type=int, default=3, help="timed steps per precision")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--kd", action="store_true", help="add a frozen teacher's forward (distillation) to each step")
    p.add_argument("--precisions", default="fp32,bf16", help=f"comma list of {', '.join(PRECISIONS[:2])}")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    precisions = [x for x in args.precisions.split(",") if x]
    if not precisions or any(x not in PRECISIONS[:2] for x in precisions):
        p.error(f"--precisions takes a comma list of {', '.join(PRECISIONS[:2])}, got {args.precisions!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    model, _ = load_model(args.model, device=args.device)
    objective = teacher_objective(frozen_copy(model)) if args.kd else next_token_objective
    for q in model.parameters():
        q.requires_grad_(True)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)  # (B, T)
    with torch.enable_grad():
        seconds = {x: time_steps(model, objective, ids, x, steps=args.steps, warmup=args.warmup) for x in precisions}
    tokens = args.batch * args.seq_len
    print(f"\n{args.model} on {args.device}, {'KD (teacher forward) + ' if args.kd else ''}forward+backward+AdamW, "
          f"batch {args.batch} x {args.seq_len} tokens, {args.steps} timed step(s) after {args.warmup}\n")  # fmt: skip
    print("precision | s/step | tokens/s | ratio | threads")
    print("--- | --- | --- | --- | ---")
    first = seconds[precisions[0]]
    for x, s in seconds.items():
        print(f"{x} | {s:.3f} | {tokens / s:,.0f} | {s / first:.2f} | {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
