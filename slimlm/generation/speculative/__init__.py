"""Speculative decoding: a cheap draft proposes tokens, the target verifies them in one forward.

- ``verify``: greedy and rejection-sampling verification, with the argument that the output is
  the target's own.
- ``adaptive``: how many tokens to draft per round (``Costs``, ``AdaptiveK``).
- ``loop``: ``speculative_generate(target, draft, prompt, ...)``, ``SpecConfig``, ``SpecStats``.
- ``drafts``: ``ModelDraft`` and the model-free ``PromptLookupDraft``; ``shallow``: the target's
  first blocks as a self-speculative draft; ``runner``: ``DecoderRunner`` (a model and its cache).
- ``run``: ``run_speculative`` with a ready draft (cost measurement, plain baseline, report).

Drafts named by a shorthand, compressed copies of the target among them, are built in
:mod:`slimlm.pipelines.drafts`, above both generation and compression.
"""

from slimlm.generation.speculative.adaptive import AdaptiveK, Costs, best_k, expected_tokens
from slimlm.generation.speculative.drafts import DraftProposal, ModelDraft, PromptLookupDraft, fit_vocab
from slimlm.generation.speculative.loop import Draft, Runner, SpecConfig, SpecStats, speculative_generate
from slimlm.generation.speculative.run import SpecReport, measure_costs, run_speculative, text_writer
from slimlm.generation.speculative.runner import DecoderRunner
from slimlm.generation.speculative.shallow import shallow_view
from slimlm.generation.speculative.verify import one_hot_probs, verify_greedy, verify_sampled, warped_probs

__all__ = ["AdaptiveK", "Costs", "DecoderRunner", "Draft", "DraftProposal", "ModelDraft", "PromptLookupDraft",
           "Runner", "SpecConfig", "SpecReport", "SpecStats", "best_k", "expected_tokens", "fit_vocab",
           "measure_costs", "one_hot_probs", "run_speculative", "shallow_view", "speculative_generate",
           "text_writer", "verify_greedy", "verify_sampled", "warped_probs"]
