"""``SlimlmLM``: lm-evaluation-harness's model class for anything slimlm loads.

    lm_eval --model slimlm --model_args model=out/gptq-int4-g64 ...   (through python -m slimlm.eval.lm_eval_cli)
    SlimlmLM(model=loaded_module, tokenizer=tok)                      (from Python: task_accuracy does this)

slimlm's models are transformers modules whose linears may be runtime modules
(QuantLinear, SparseLinear, LowRankLinear, ...) that keep ``forward``'s contract,
so lm-eval's own HF wrapper (``HFLM``) runs them when handed the module object:
its batching, caching, truncation, multiple-choice and generation code are reused
as they are. What this class adds:

- loading: ``model=`` is any source ``slimlm.models.load_model`` reads (built-in
  name, HF directory, hub id, .gguf, slimlm compressed checkpoint), or a loaded module;
- ``loglikelihood_rolling`` scores a text the way slimlm's perplexity scores a window
  (``slimlm.eval.quality``): the prefix token (BOS, else EOS) and then every text token,
  each one a target. HFLM encodes the text *with* the tokenizer's BOS and puts the prefix
  before it too, so for BOS-adding tokenizers (Llama, Mistral, Gemma) it also scores
  BOS after BOS; here the text is encoded without special tokens.

Importing this module imports lm_eval and registers the name ``slimlm``; slimlm's own
code reaches it through lm-eval's registry (``slimlm.eval.accuracy``), so lm-eval
stays an optional dependency (``pip install 'slimlm[tasks]'``).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models import load_model

log = logging.getLogger("slimlm.eval")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise SlimlmError(f"dtype {name!r} is not one slimlm loads in; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


@register_model("slimlm")
class SlimlmLM(HFLM):
    """lm-eval's HFLM over a model slimlm loaded (compressed modules included)."""

    def __init__(
        self,
        model: str | nn.Module = "smollm2-135m",
        tokenizer: Any = None,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(model, nn.Module):
            if tokenizer is None:
                raise SlimlmError("SlimlmLM(model=<module>) needs its tokenizer; pass tokenizer=")
            self.source = type(model).__name__
            tokenizer = copy.deepcopy(tokenizer)  # HFLM may give it a pad token: the caller's stays as it was
        else:
            if tokenizer is not None:
                raise SlimlmError(f"model={model} brings its own tokenizer; drop tokenizer=")
            self.source = str(model)
            model, tokenizer = load_model(self.source, dtype=_dtype(dtype), device=device or "cpu")
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                         **kwargs)  # fmt: skip

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Sum of log p(token | earlier tokens) over every token of each text, after the prefix token.

        A text longer than ``max_length`` is cut into lm-eval's disjoint rolling windows
        (each token scored once, with up to ``max_length - 1`` tokens of context).
        """
        windows, owner = [], []  # every window of every text; the request each came from
        for i, (text,) in enumerate(req.args for req in requests):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for w in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)  # [(logprob, is_greedy)]
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals
