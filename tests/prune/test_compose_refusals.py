"""Methods that need float linears refuse an already pruned model in one line, changing nothing."""

import pytest
import torch

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.models.tiny import tiny_model
from slimlm.prune import Magnitude
from slimlm.quant.awq_handler import AWQ
from slimlm.quant.llm_int8 import LLMInt8
from slimlm.quant.mixed_handler import MixedPrecision
from slimlm.quant.w8a8 import W8A8, SmoothQuant

CALIB = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("config", [AWQ(), W8A8(), SmoothQuant(), LLMInt8(), MixedPrecision(candidates=("int4-g32",))],
                         ids=lambda c: type(c).__name__)
def test_float_only_methods_refuse_a_pruned_model(config):
    model = tiny_model("llama")
    apply(model, Magnitude(sparsity=0.5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimlmError, match=r"SparseLinear \(already compressed\): put this step before"):
        apply(model, config, CALIB)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
