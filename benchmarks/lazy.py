"""Eager vs lazy GPTQ (or RTN) of the built-in model: time and peak memory, each mode in its own process.

    .venv/bin/python benchmarks/lazy.py [--method gptq|rtn] [--samples 32] [--scheme int4-g64] [--threads 1]

Per mode a child process (``--mode eager|lazy``, under ``/usr/bin/time -v``
when present) draws the wiki-v1 calibration batch, loads the model (whole, or
with its blocks left on disk), runs GPTQ (or RTN: the lazy path's own
overhead, without GPTQ's solve time to hide it) and saves the checkpoint
(``save_compressed``, or one shard per block as blocks finish), then prints
its timings and peak RSS (getrusage) as JSON. The parent prints one table and
checks that the two checkpoints give identical logits.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m"


def child(mode: str, out: str, method: str, samples: int, scheme: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import slimlm.quant.gptq_handler as gptq_handler
    from slimlm.api import apply
    from slimlm.calib.runner import peak_rss_mb
    from slimlm.eval import calibration_ids
    from slimlm.pipelines.lazy import compress_lazy
    from slimlm.io import save_compressed
    from slimlm.models import builtin_dir, load_lazy, load_model
    from slimlm.quant import GPTQ, RTN
    from transformers import AutoTokenizer

    reports = []  # the GPTQ handler drops its CalibReport; keep it for the peak-tracked column
    run = gptq_handler.calibrate_linears
    gptq_handler.calibrate_linears = lambda *a, **kw: reports.append(run(*a, **kw)) or reports[-1]
    # The calibration batch first: reading and tokenizing the wiki text takes ~300 MB of its own.
    calib = calibration_ids(AutoTokenizer.from_pretrained(builtin_dir(MODEL)), "wiki-v1", n_samples=samples)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    model, tok = (load_lazy if mode == "lazy" else load_model)(MODEL)
    t_load = time.perf_counter() - t0
    config = GPTQ(scheme=scheme) if method == "gptq" else RTN(scheme=scheme)
    t0 = time.perf_counter()
    if mode == "lazy":
        compress_lazy(model, tok, [config], out, calib=calib, base_model=MODEL)
    else:
        apply(model, config, calib)
        save_compressed(model, tok, out, base_model=MODEL)
    seconds = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "load_s": t_load, "compress_s": seconds, "rss_before_mb": rss_before,
                      "peak_rss_mb": peak_rss_mb(),
                      "peak_tracked_mb": reports[0].peak_tracked_mb if reports else None}))  # fmt: skip


def spawn(mode: str, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--mode", mode, "--out", str(out), "--method", args.method,
           "--samples", str(args.samples), "--scheme", args.scheme, "--threads", str(args.threads)]  # fmt: skip
    timer = shutil.which("time") and Path("/usr/bin/time").is_file()
    proc = subprocess.run((["/usr/bin/time", "-v"] if timer else []) + cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    result["time_v_mb"] = int(found.group(1)) * 1024 / 1e6 if found else None
    return result


def same_logits(a: Path, b: Path) -> bool:
    import torch

    from slimlm.io import load_compressed

    ids = torch.arange(100, 356).reshape(2, 128)
    with torch.no_grad():
        return torch.equal(load_compressed(a)[0](ids).logits, load_compressed(b)[0](ids).logits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--scheme", default="int4-g64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", choices=("eager", "lazy"), help=argparse.SUPPRESS)  # child process
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return child(args.mode, args.out, args.method, args.samples, args.scheme, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {mode: spawn(mode, Path(tmp) / mode, args) for mode in ("eager", "lazy")}
        identical = same_logits(Path(tmp) / "eager", Path(tmp) / "lazy")
    print(f"{args.method} {args.scheme}, {MODEL}, {args.samples} x 512 wiki-v1 calibration tokens, "
          f"{args.threads} thread(s)")
    print(f"| mode | load s | {args.method} + save s | RSS before the model MB | peak RSS MB (getrusage / time -v) "
          "| peak - before MB | peak tracked MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        time_v = f"{r['time_v_mb']:.0f}" if r["time_v_mb"] else "-"
        tracked = f"{r['peak_tracked_mb']:.0f}" if r["peak_tracked_mb"] is not None else "-"  # RTN: no runner
        print(f"| {mode} | {r['load_s']:.1f} | {r['compress_s']:.0f} | {r['rss_before_mb']:.0f} | "
              f"{r['peak_rss_mb']:.0f} / {time_v} | {r['peak_rss_mb'] - r['rss_before_mb']:.0f} | "
              f"{tracked} |")
    print(f"checkpoints give identical logits: {identical}")


if __name__ == "__main__":
    main()
