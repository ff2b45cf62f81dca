"""The 12-job sweep of the built-in model (RTN/GPTQ/AWQ at 3/4/8 bits, pruning, structured), locally and on Ray.

    .venv/bin/python benchmarks/sweep.py --out runs/builtin-12 [--calib-samples 32] [--tokens 4096]
    .venv/bin/python benchmarks/sweep.py --out runs/builtin-12 --ray-check runs/builtin-12-ray \
        [--ray-recipes rtn-int4-g64,gptq-int4-g64,wanda-50]

Runs ``slimlm.sweep.sweep`` (Ctrl-C it and run the same command again: finished jobs are skipped) and
prints the comparison table. With ``--ray-check DIR`` it then runs the same jobs (or those of
``--ray-recipes``, with the same grid) as Ray tasks on a local runtime into DIR, without the speed
measurement (the check compares quality), and checks that every job's quality numbers equal the local
ones. The same jobs from the command line:

    slimlm sweep --recipes rtn-int4-g64,gptq-int4-g64,awq-int4-g64,wanda-50,sparsegpt-2of4,structured-width-25 \
        --grid bits=3,4,8 --calib-samples 32 --out runs/builtin-12
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from slimlm.sweep import sweep

QUANT = ["rtn-int4-g64", "gptq-int4-g64", "awq-int4-g64"]  # x bits 3, 4, 8
OTHER = ["wanda-50", "sparsegpt-2of4", "structured-width-25"]


def run(args: argparse.Namespace, out: str, *, ray: bool) -> None:
    kw = dict(protocol=args.protocol, tokens=args.tokens, calib_samples=args.calib_samples,
              speed=not (args.no_speed or ray), ray=ray, jobs=args.jobs,
              on_job=lambda outcome, n: print(outcome.line(), flush=True))
    recipes = args.ray_recipes.split(",") if ray and args.ray_recipes else QUANT + OTHER
    report = sweep(args.model, recipes, grid={"bits": [3, 4, 8]}, out=out, **kw)  # bits: where a step has it
    print(report.table())
    if report.failed:
        sys.exit(1)


def quality(out: str) -> dict[str, dict]:
    doc = json.loads((Path(out) / "sweep.json").read_text())
    return {j["recipe"]: json.loads((Path(out) / "jobs" / j["id"] / "result.json").read_text())["quality"]
            for j in doc["jobs"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--ray-check", default=None, metavar="DIR", help="rerun the jobs on Ray into DIR and compare")
    p.add_argument("--ray-recipes", default=None, help="comma list: the recipes of the Ray check (default: all)")
    p.add_argument("--protocol", default="wiki-v1")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--no-speed", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run(args, args.out, ray=False)
    if args.ray_check:
        run(args, args.ray_check, ray=True)
        local, on_ray = quality(args.out), quality(args.ray_check)
        differ = [name for name in local if local[name] != on_ray.get(name)]
        print(f"Ray vs local: {len(local) - len(differ)} of {len(local)} jobs identical" +
              (f"; differ: {', '.join(differ)}" if differ else ""))
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
