"""Quantize the built-in model with llm-compressor and export it as a plain float HF directory.

Runs in a SEPARATE virtual environment (never slimlm's .venv), created as:

    python3.11 -m venv /work/ext-venv
    /work/ext-venv/bin/pip install torch==2.13.0          # first and pinned: the local CPU wheel
    /work/ext-venv/bin/pip install llmcompressor==0.14.0.1 # pulls transformers 5.17, compressed-tensors 0.19

then (normally through benchmarks/external.py, which also evaluates):

    /work/ext-venv/bin/python benchmarks/external_llmcompressor.py --method gptq-actorder \\
        --model ~/.cache/slimlm/models/smollm2-135m --calib /tmp/slimlm_calib_32.pt --out /tmp/llmc-gptq

``--calib`` is a ``(N, L)`` int64 tensor of token ids saved with torch.save
(slimlm's protocol calibration batch); exactly those ids are fed to
``oneshot``, unshuffled. Every decoder-block linear is quantized, lm_head is
not (slimlm's default targets). The output holds the fake-quantized weights
(dequantized to float32) under the base checkpoint's tensor names, plus the
base directory's config and tokenizer files, so slimlm's evaluator scores it
like any HF directory. This file imports nothing from slimlm. It prints one
JSON line: method, seconds spent in ``oneshot`` and the versions used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

# benchmarks/ holds gptq.py, awq.py: as sys.path[0] they would shadow packages that
# transformers imports (e.g. the hub's `kernels`), so drop this script's folder from the path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

METHODS = ("rtn", "gptq", "gptq-actorder", "awq", "awq-duo")


def weight_scheme(bits: int, group: int, actorder: str | None = None) -> dict:
    """One config group: asymmetric int weights in groups of ``group`` input columns, on every Linear."""
    weights = dict(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group, actorder=actorder)
    return {"group_0": dict(targets=["Linear"], weights=weights)}


def recipe(method: str, bits: int, group: int, damp: float) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    ignore = ["lm_head"]
    if method == "rtn":
        return [QuantizationModifier(config_groups=weight_scheme(bits, group), ignore=ignore)]
    if method.startswith("gptq"):
        order = "static" if method == "gptq-actorder" else None  # "static" is an alias of "weight"
        # actorder must be given to the modifier too: its default (static) overrides a None in the scheme
        return [GPTQModifier(config_groups=weight_scheme(bits, group), ignore=ignore, dampening_frac=damp,
                             block_size=128, actorder=order)]  # fmt: skip
    # AWQ: duo_scaling=False is the paper's s = s_x ** alpha (slimlm's); True (the default) divides by |W|^(1-alpha)
    return [AWQModifier(duo_scaling=(method == "awq-duo"), n_grid=20),
            QuantizationModifier(config_groups=weight_scheme(bits, group), ignore=ignore)]  # fmt: skip


def calibration_dataset(ids: torch.Tensor):
    from datasets import Dataset

    rows = ids.tolist()  # (N, L) token ids
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


@torch.no_grad()
def fake_quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as float32; quantized linears' weights rounded to their grid and dequantized."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    n = 0
    for name, module in model.named_modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        state[f"{name}.weight"] = forward_quantize(module, module.weight, "weight", args).float().clone()
        n += 1
    if n == 0:
        raise SystemExit("error: no quantized module found after oneshot")
    return state


def export(model: torch.nn.Module, base: Path, out: Path) -> None:
    """Write ``out``: the base's non-weight files and model.safetensors with the base's tensor names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    state = fake_quantized_state(model)
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    missing = [k for k in names if k not in state]
    bad = [k for k in names if k in state and tuple(state[k].shape) != shapes[k]]
    if missing or bad:
        raise SystemExit(f"error: exported state does not match the base: missing {missing[:3]}, shapes {bad[:3]}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in base.iterdir():
        if p.is_file() and p.name != "model.safetensors":
            shutil.copy2(p, tmp / p.name)
    save_file({k: state[k].contiguous() for k in names}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--model", type=Path, required=True, help="HF directory of the base model")
    p.add_argument("--calib", type=Path, required=True, help="torch.save'd (N, L) token ids")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward (slimlm's default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"error: {args.out} exists; pass --overwrite to replace it")
    torch.set_num_threads(args.threads)

    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations for faster host-to-device copies; pin_memory()
        # raises on a CPU-only torch. Pinning only speeds up transfers, so skip it where there is no device.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    ids = torch.load(args.calib)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, tokenizer=tok, recipe=recipe(args.method, args.bits, args.group, args.damp),
            dataset=calibration_dataset(ids), num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False, batch_size=args.batch_size)  # fmt: skip
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if args.out.exists():
        shutil.rmtree(args.out)
    export(model, args.model, args.out)
    versions = {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__, "compressed-tensors": compressed_tensors.__version__}
    print(json.dumps({"method": args.method, "seconds": seconds, "cpu_seconds": cpu_seconds, "threads": args.threads,
                      "calib": list(ids.shape), "versions": versions}))  # fmt: skip


if __name__ == "__main__":
    main()
