"""mean_nll: the batched calibration loss agrees with the protocol's per-window NLL."""

import math

import pytest
import torch

from slimlm.eval.quality import mean_nll, score_windows
from slimlm.models.tiny import tiny_model

V = 512
IDS = torch.randint(3, V, (5, 24), generator=torch.Generator().manual_seed(0))


def test_mean_nll_is_the_token_mean_whatever_the_batch_size():
    model = tiny_model("llama")
    q, _ = score_windows(model, IDS)
    for batch_size in (1, 2, 5, 8):  # 2 leaves a short last batch
        assert mean_nll(model, IDS, batch_size) == pytest.approx(q.nll, rel=1e-5)


def test_uniform_model_scores_log_v():
    model = tiny_model("mistral", vocab_size=V)  # untied head: zeroing it leaves the body alone
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0 everywhere -> uniform over V
    assert mean_nll(model, IDS, batch_size=3) == pytest.approx(math.log(V), rel=1e-6)
