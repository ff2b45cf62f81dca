"""Saving and loading adapters: HF peft's format where peft has the method, with a slimlm record beside it.

A directory holds ``adapter_config.json`` + ``adapter_model.safetensors``
(peft's files: LoRA, DoRA, IA3 and prompt tuning load with
``peft.PeftModel.from_pretrained(stock_base, dir)``) and
``slimlm_adapter.json``: the method, and the base it was trained on (every
base tensor's shape and one sha256 over them, adapter tensors left out and
peft's ``.base_layer`` taken out of names). :func:`load_adapter` refuses a
base whose shapes or digest differ before it changes anything. Houlsby
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
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.fsutil import atomic_dir
from slimlm.models.adapters import text_config
from slimlm.nn import RuntimeModule
from slimlm.peft.houlsby import HoulsbyLinear, add_adapters
from slimlm.peft.inject import ADAPTER_NAME, RuntimeLoraLinear, SlimLoraModel
from slimlm.peft.merge import adapter_layers
from slimlm.peft.prompt import SOFT_PROMPT, add_soft_prompt
from slimlm.targets import Targets

ADAPTER_CONFIG, ADAPTER_WEIGHTS, RECORD = "adapter_config.json", "adapter_model.safetensors", "slimlm_adapter.json"
FORMAT = "slimlm.adapter/1"
PEFT_PREFIX = "base_model.model."
_ADAPTER_PARTS = ("lora_", "ia3_", f"{SOFT_PROMPT}.", ".adapter.")

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


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapter saved in ``path`` on ``model`` (in place) after checking it is the base it was trained on."""
    path = Path(path)
    if not (path / RECORD).is_file():
        raise SlimlmError(f"{path} has no {RECORD}: not an adapter saved by slimlm (peft adapters without it load "
                          f"with peft.PeftModel.from_pretrained)")  # fmt: skip
    record = json.loads((path / RECORD).read_text())
    if record.get("format") != FORMAT:
        raise SlimlmError(f"{path / RECORD} has format {record.get('format')!r}; this slimlm reads {FORMAT}")
    _check_base(model, record, path)
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    if record["kind"] == "peft":
        config = PeftConfig.from_pretrained(str(path))
        if isinstance(config, LoraConfig):
            config._register_custom_module({RuntimeModule: RuntimeLoraLinear})
            SlimLoraModel(model, config, ADAPTER_NAME)
        elif isinstance(config, IA3Config):
            IA3Model(model, config, ADAPTER_NAME)
        ours = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
        missing = set_peft_model_state_dict(model, ours, adapter_name=ADAPTER_NAME).missing_keys
        if missing := [k for k in missing if any(part in k for part in _ADAPTER_PARTS)]:
            raise SlimlmError(f"adapter {path} lacks {len(missing)} adapter tensors, e.g. {missing[0]}; it is "
                              f"incomplete or was saved for other targets")  # fmt: skip
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
