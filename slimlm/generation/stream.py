"""Stream generated text piece by piece: slimlm's decode loop (default) or HF ``generate``."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import torch
from transformers import TextIteratorStreamer

from slimlm.data import prompt_ids
from slimlm.errors import SlimlmError
from slimlm.generation.compiled import compile_step
from slimlm.generation.decoder import make_decoder
from slimlm.generation.loop import GenerationConfig, stream_text
from slimlm.generation.sampling import Sampling

ENGINES = ("slimlm", "hf")


def sampling_kwargs(*, temperature: float, top_k: int | None, top_p: float | None) -> dict[str, Any]:
    """HF generate arguments for greedy (temperature 0) or sampled decoding (checked as ``Sampling``)."""
    Sampling(temperature, top_k, top_p)  # refuses bad values
    if temperature == 0:
        return {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    return {"do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0}


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> tuple[int, ...]:
    """End-of-sequence ids from the generation config and the tokenizer (what HF generate stops at)."""
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    chat: bool = False,
    engine: str = "slimlm",
    decoder: torch.nn.Module | None = None,
    compile: bool = False,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces while it is generated.

    ``engine="slimlm"`` runs :mod:`slimlm.generation.loop` (``decoder``: a
    prebuilt one from ``make_decoder``, else built here); ``"hf"`` runs HF
    ``generate`` for comparison. ``compile``: slimlm's one-token steps under
    ``torch.compile`` (:mod:`slimlm.generation.compiled`).
    """
    if max_new_tokens < 1:
        raise SlimlmError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if engine not in ENGINES:
        raise SlimlmError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if compile and engine != "slimlm":
        raise SlimlmError("compile=True compiles slimlm's decode step; use engine='slimlm'")
    kwargs = sampling_kwargs(temperature=temperature, top_k=top_k, top_p=top_p)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SlimlmError("this tokenizer has no chat template; pass chat=False")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    if engine == "slimlm":
        yield from _slimlm_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, decoder=decoder, compile=compile)
        return
    yield from _hf_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, seed=seed, **kwargs)


def _slimlm_text(model, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, seed: int, decoder, compile: bool) -> Iterator[str]:
    ids = prompt_ids(tokenizer, prompt)  # BOS first when the tokenizer adds it, never twice
    if not ids:
        raise SlimlmError("the prompt is empty after tokenization; give some text")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, sampling=Sampling(temperature, top_k, top_p, seed),
                           stop_tokens=stop_token_ids(model, tokenizer))
    decoder = decoder or make_decoder(model)
    kw = {"step": compile_step(decoder)} if compile else {}
    yield from stream_text(decoder, tokenizer, ids, cfg, **kw)


def _hf_text(model, tokenizer, prompt: str, *, max_new_tokens: int, seed: int, **kwargs) -> Iterator[str]:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)  # (1, P)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    errors: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           streamer=streamer, pad_token_id=pad, **kwargs)
        except BaseException as e:  # handed to the caller's thread below
            errors.append(e)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    yield from streamer
    worker.join()
    if errors:
        raise errors[0]
