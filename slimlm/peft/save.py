"""Saving and loading adapters: HF peft's format where peft has the method, with a slimlm record beside it.

A directory holds ``adapter_config.json`` + ``adapter_model.safetensors``
(peft's files: LoRA, DoRA, IA3 and prompt tuning load with
``peft.PeftModel.from_pretrained(stock_base, dir)``) and
``slimlm_adapter.json``: the method, and the base it was trained on (every
base tensor's shape and one sha256 over them, adapter tensors left out and
peft's ``.base_layer`` taken out of names). :func:`load_adapter` refuses,
before it changes anything, a missing or damaged file, a base whose shapes
or digest differ, and adapter tensors missing, extra or of another shape
than injecting the saved config onto this model makes. Houlsby
adapters (no peft tuner) keep their tensors under their module names and
no ``adapter_config.json``. BitFit trains the base's own biases and norms:
the model itself is the result (``slimlm.io.save_compressed``).

Adapters on a *compressed* base are saved the same way; the base they load
onto is the compressed checkpoint, which peft cannot rebuild, so only
:func:`load_adapter` loads those.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from peft import (IA3Config, LoraConfig, PeftConfig, PromptTuningConfig, get_peft_model_state_dict,
                  set_peft_model_state_dict)  # fmt: skip
from peft.tuners.ia3 import IA3Model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.fsutil import atomic_dir
from slimlm.models.adapters import text_config
from slimlm.nn import RuntimeModule
from slimlm.peft.houlsby import ACTIVATIONS, Bottleneck, HoulsbyLinear, add_adapters, output_linears
from slimlm.peft.inject import ADAPTER_NAME, RuntimeLoraLinear, SlimLoraModel
from slimlm.peft.merge import adapter_layers
from slimlm.peft.prompt import SOFT_PROMPT, add_soft_prompt
from slimlm.targets import Targets

ADAPTER_CONFIG, ADAPTER_WEIGHTS, RECORD = "adapter_config.json", "adapter_model.safetensors", "slimlm_adapter.json"
FORMAT = "slimlm.adapter/1"
PEFT_PREFIX = "base_model.model."
_ADAPTER_PARTS = ("lora_", "ia3_", f"{SOFT_PROMPT}.", ".adapter.")
KINDS = ("peft", "prompt_tuning", "adapters")

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "FORMAT", "PEFT_PREFIX", "RECORD", "base_fingerprint", "load_adapter",
           "save_adapter"]  # fmt: skip


def base_fingerprint(model: nn.Module) -> tuple[str, dict[str, list[int]]]:
    """(sha256 over the base's tensors, name -> shape), adapters left out, ``.base_layer`` taken out of names."""
    digest, shapes = hashlib.sha256(), {}
    state = model.state_dict()
    for key in sorted(state):
        if any(part in key for part in _ADAPTER_PARTS):
            continue
        t = state[key].detach().to("cpu").contiguous()
        name = key.replace(".base_layer.", ".")
        shapes[name] = list(t.shape)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest(), shapes


def _kind(model: nn.Module) -> str:
    if adapter_layers(model):
        return "peft"
    if hasattr(model, SOFT_PROMPT):
        return "prompt_tuning"
    if any(isinstance(m, HoulsbyLinear) for m in model.modules()):
        return "adapters"
    raise SlimlmError("the model carries no adapter to save (LoRA, DoRA, IA3, adapters or a soft prompt); BitFit "
                      "trains the model's own biases and norms: save the model with slimlm.io.save_compressed")


def _prompt_config(model: nn.Module) -> PromptTuningConfig:
    cfg = text_config(model.config)
    prompt = getattr(model, SOFT_PROMPT)
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.n_tokens,
                              token_dim=prompt.embedding.shape[1], num_transformer_submodules=1,
                              num_attention_heads=cfg.num_attention_heads,
                              num_layers=cfg.num_hidden_layers)  # fmt: skip


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the model's adapter to ``out_dir`` atomically (see the module docstring for the files)."""
    kind = _kind(model)
    digest, shapes = base_fingerprint(model)
    record: dict[str, Any] = {"format": FORMAT, "kind": kind, "base_sha256": digest, "base_shapes": shapes}
    if kind == "peft":
        config: PeftConfig | None = model.peft_config[ADAPTER_NAME]
        # keys as a PeftModel names them: the tuned model sits at base_model.model
        tensors = {PEFT_PREFIX + k: v for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}
        record["compressed_base"] = any(isinstance(m.get_base_layer(), RuntimeModule)
                                        for m in adapter_layers(model).values())  # fmt: skip
    elif kind == "prompt_tuning":
        config, tensors = _prompt_config(model), {"prompt_embeddings": getattr(model, SOFT_PROMPT).embedding}
    else:
        config = None
        tensors = {k: v for k, v in model.state_dict().items() if ".adapter." in k}
        wrapped = [n for n, m in model.named_modules() if isinstance(m, HoulsbyLinear)]
        first = model.get_submodule(wrapped[0]).adapter
        record["adapters"] = {"linears": wrapped, "size": first.down.out_features,
                              "nonlinearity": type(first.act).__name__.lower()}  # fmt: skip
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if config is not None:
            config.save_pretrained(str(tmp))
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS))
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return Path(out_dir)


def _check_base(model: nn.Module, record: dict[str, Any], path: Path) -> None:
    digest, shapes = base_fingerprint(model)
    want = record.get("base_shapes", {})
    for name in sorted(set(want) | set(shapes)):
        if want.get(name) != shapes.get(name):
            raise SlimlmError(f"adapter {path} was trained on another base: {name} is {shapes.get(name)} here, "
                              f"{want.get(name)} in the adapter's base; load it onto the model it was trained on")
    if digest != record.get("base_sha256"):
        raise SlimlmError(f"adapter {path} was trained on another base (weights sha256 {digest[:12]} here, "
                          f"{str(record.get('base_sha256'))[:12]} recorded); load it onto the model it was trained on")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor], PeftConfig | None]:
    """The adapter's record, tensors and peft config, each refused in one line if missing or damaged."""
    if not (path / RECORD).is_file():
        raise SlimlmError(f"{path} has no {RECORD}: not an adapter saved by slimlm (peft adapters without it load "
                          f"with peft.PeftModel.from_pretrained)")  # fmt: skip
    try:
        record = json.loads((path / RECORD).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimlmError(f"{path / RECORD} is damaged ({e}); save the adapter again") from None
    fmt = record.get("format") if isinstance(record, dict) else None
    if fmt != FORMAT:
        raise SlimlmError(f"{path / RECORD} has format {fmt!r}; this slimlm reads {FORMAT}")
    if record.get("kind") not in KINDS:
        raise SlimlmError(f"{path / RECORD} names kind {record.get('kind')!r}; known: {', '.join(KINDS)}")
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise SlimlmError(f"{path / ADAPTER_WEIGHTS} is missing or damaged ({e}); save the adapter again") from None
    config = None
    if record["kind"] in ("peft", "prompt_tuning"):
        try:
            config = PeftConfig.from_pretrained(str(path))
        except (ValueError, OSError, TypeError, json.JSONDecodeError) as e:
            raise SlimlmError(f"{path / ADAPTER_CONFIG} is missing or damaged ({e}); save the adapter again") from None
    return record, tensors, config


def _shape_of(model: nn.Module, name: str) -> tuple[int, int]:
    """(in, out) of target linear ``name``, refused if the model has no such linear."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise SlimlmError(f"the adapter targets {name}, which this model lacks; load it onto the model it was "
                          "trained on") from None  # fmt: skip
    if hasattr(m, "in_features"):
        return m.in_features, m.out_features
    return tuple(m.weight.shape)  # transformers Conv1D: (in, out)


def _expected(model: nn.Module, record: dict[str, Any], config: PeftConfig | None) -> dict[str, tuple[int, ...]]:
    """Adapter tensor name -> shape, as injecting ``config`` onto ``model`` would make them."""
    want: dict[str, tuple[int, ...]] = {}
    kind = record["kind"]
    if kind == "peft" and isinstance(config, LoraConfig):
        for t in sorted(config.target_modules):
            n_in, n_out = _shape_of(model, t)
            key = f"{PEFT_PREFIX}{t}"
            want |= {f"{key}.lora_A.weight": (config.r, n_in), f"{key}.lora_B.weight": (n_out, config.r)}
            if config.use_dora:
                want[f"{PEFT_PREFIX}{t}.lora_magnitude_vector"] = (n_out,)
    elif kind == "peft" and isinstance(config, IA3Config):
        for t in sorted(config.target_modules):
            n_in, n_out = _shape_of(model, t)
            want[f"{PEFT_PREFIX}{t}.ia3_l"] = (1, n_in) if t in config.feedforward_modules else (n_out, 1)
    elif kind == "prompt_tuning" and isinstance(config, PromptTuningConfig):
        if hasattr(model, SOFT_PROMPT):
            raise SlimlmError("the model already carries a soft prompt; load a prompt-tuning adapter onto a model "
                              "without one")  # fmt: skip
        want["prompt_embeddings"] = (config.num_virtual_tokens, model.get_input_embeddings().weight.shape[1])
    elif kind == "adapters":
        spec = record.get("adapters") or {}
        size, act = spec.get("size"), spec.get("nonlinearity")
        if not isinstance(size, int) or size < 1 or act not in ACTIVATIONS or not spec.get("linears"):
            raise SlimlmError(f"{RECORD} describes no valid bottleneck adapters (size {size!r}, nonlinearity "
                              f"{act!r}); save the adapter again")  # fmt: skip
        shell = Bottleneck(model.config.get_text_config().hidden_size, size, act, device="meta")
        outputs = set(output_linears(model))
        for linear in spec["linears"]:
            if linear not in outputs:
                raise SlimlmError(f"the adapter wraps {linear}, not an attention/MLP output linear of this model; "
                                  "load it onto the model it was trained on")  # fmt: skip
            want |= {f"{linear}.adapter.{k}": tuple(v.shape) for k, v in shell.state_dict().items()}
    else:
        raise SlimlmError(f"{RECORD} says {kind} but {ADAPTER_CONFIG} holds a {type(config).__name__}, which slimlm "
                          "does not load as one; save the adapter again, or use peft.PeftModel.from_pretrained")
    return want


def _check_tensors(tensors: dict[str, Tensor], want: dict[str, tuple[int, ...]], path: Path) -> None:
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise SlimlmError(f"adapter {path} lacks {len(missing)} adapter tensor(s), e.g. {missing[0]}; it is "
                          f"incomplete or was saved for other targets")  # fmt: skip
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise SlimlmError(f"adapter {path} holds {len(extra)} tensor(s) its config does not describe, e.g. "
                          f"{extra[0]}; save the adapter again")  # fmt: skip
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise SlimlmError(f"adapter tensor {name} in {path} has shape {tuple(tensors[name].shape)}, this model "
                              f"needs {shape}; load it onto the model it was trained on")  # fmt: skip


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapter saved in ``path`` on ``model`` (in place).

    Everything is checked before the model changes: the record, the files
    (present and readable), the base (shapes and digest) and every adapter
    tensor's name and shape against what injecting the config makes; a
    refusal leaves ``model`` as it was.
    """
    path = Path(path)
    record, tensors, config = _read(path)
    _check_base(model, record, path)
    _check_tensors(tensors, _expected(model, record, config), path)
    if record["kind"] == "peft":
        if isinstance(config, LoraConfig):
            config._register_custom_module({RuntimeModule: RuntimeLoraLinear})
            SlimLoraModel(model, config, ADAPTER_NAME)
        else:
            IA3Model(model, config, ADAPTER_NAME)
        set_peft_model_state_dict(model, {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()},
                                  adapter_name=ADAPTER_NAME)  # fmt: skip
    elif record["kind"] == "prompt_tuning":
        prompt = tensors["prompt_embeddings"]
        add_soft_prompt(model, n_tokens=prompt.shape[0], init="random")
        _copy(getattr(model, SOFT_PROMPT).embedding, prompt)
    else:
        spec = record["adapters"]
        add_adapters(model, Targets(include=tuple(spec["linears"])), size=spec["size"],
                     nonlinearity=spec["nonlinearity"])  # fmt: skip
        params = dict(model.named_parameters())
        for key, t in tensors.items():
            _copy(params[key], t)
    return model


@torch.no_grad()
def _copy(dst: Tensor, src: Tensor) -> None:
    dst.copy_(src.to(dst.device, dst.dtype))
