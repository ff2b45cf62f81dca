"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

``n`` trained input embeddings P (n, d) are put in front of every sequence;
the whole model stays frozen. Here the HF model is kept as it is and two
hooks on its forward do the work:

* before: ``input_ids (B, T)`` become ``inputs_embeds = [P; E[ids]] (B, n+T, d)``,
  an attention mask gains ``n`` ones, and ``labels`` gain ``n`` ignored
  positions *and* their first real position is ignored too, so the targets
  are exactly those of the plain model (the first token, BOS, is never a
  target, as in ``slimlm.eval``);
* after: ``logits`` drop the ``n`` prompt positions, so ``(B, T, V)`` lines up
  with ``input_ids`` for every caller (evaluation windows, KL to a base).

A forward with a non-empty KV cache (decoding after a prefill that already
carried the prompt) is passed through. slimlm's fast decoder does not call
the model's forward, so ``slimlm generate`` does not see the prompt; the
saved adapter is peft's PROMPT_TUNING format, which ``PeftModel`` runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SOFT_PROMPT", "SoftPrompt", "add_soft_prompt"]

SOFT_PROMPT = "soft_prompt"  # the attribute of the top model holding the SoftPrompt


class SoftPrompt(nn.Module):
    """The trained prompt embeddings ``(n, d)`` and the two forward hooks that use them."""

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.embedding = nn.Parameter(init.clone())  # (n, d)
        self._prepended = False

    @property
    def n_tokens(self) -> int:
        return self.embedding.shape[0]

    def before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        ids = kwargs.pop("input_ids", None) if not args else args[0]
        args = args[1:] if args else args
        cache = kwargs.get("past_key_values")
        self._prepended = ids is not None and (cache is None or cache.get_seq_length() == 0)
        if not self._prepended:
            if ids is not None:
                kwargs["input_ids"] = ids
            return args, kwargs
        B, n = ids.shape[0], self.n_tokens
        embeds = model.get_input_embeddings()(ids)  # (B, T, d)
        prompt = self.embedding.to(embeds.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, n, d)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n+T, d)
        if (mask := kwargs.get("attention_mask")) is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(B, n), mask], dim=1)
        if (labels := kwargs.get("labels")) is not None:
            ignored = labels.new_full((B, n + 1), -100)  # the prompt, and the first real token (never a target)
            kwargs["labels"] = torch.cat([ignored, labels[:, 1:]], dim=1)  # (B, n+T)
        return args, kwargs

    def after(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if self._prepended and getattr(output, "logits", None) is not None:
            output.logits = output.logits[:, self.n_tokens :]  # (B, T, V)
        return output


@torch.no_grad()
def add_soft_prompt(model: nn.Module, *, n_tokens: int, init: str, seed: int = 0) -> list[nn.Parameter]:
    """Attach a :class:`SoftPrompt` to ``model`` and hook it in; -> its one parameter.

    ``init``: ``vocab`` copies ``n_tokens`` random rows of the input embedding
    (the paper's best initialisation short of class labels), ``random`` draws
    them from a normal of the embedding's standard deviation.
    """
    E = model.get_input_embeddings().weight  # (V, d)
    gen = torch.Generator().manual_seed(seed)
    if init == "vocab":
        rows = torch.randint(E.shape[0], (n_tokens,), generator=gen)
        start = E.detach()[rows.to(E.device)]
    else:
        start = (torch.randn(n_tokens, E.shape[1], generator=gen) * E.detach().float().std()).to(E)
    prompt = SoftPrompt(start)
    setattr(model, SOFT_PROMPT, prompt)
    model.register_forward_pre_hook(prompt.before, with_kwargs=True)
    model.register_forward_hook(prompt.after, with_kwargs=True)
    return [prompt.embedding]
