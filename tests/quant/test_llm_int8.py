"""LLM.int8(): exact without outliers, far better than plain int8 with them, storage, round trips."""

import math

import pytest
import torch
from torch import nn

from slimlm.api import needs_calibration
from slimlm.errors import SlimlmError
from slimlm.io import load_compressed, save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import OutlierLinear, W8A8Linear
from slimlm.quant.llm_int8 import LLMInt8, apply_llm_int8, outlier_columns
from slimlm.quant.w8a8 import W8A8, apply_w8a8
from tests.quant.outliers import CALIB, logits, outlier_llama, rel_err

OUTLIERS = torch.tensor([5, 77, 300])


def _linear(bias=True):
    torch.manual_seed(0)
    return nn.Linear(576, 256, bias=bias)


def _x(rows=24):
    torch.manual_seed(1)
    x = torch.randn(2, rows, 576)
    x[..., OUTLIERS] *= 40.0  # a few feature dimensions at magnitude ~40, as in large LLMs
    return x


def test_threshold_infinity_is_plain_vector_wise_int8():
    lin, x = _linear(), _x()
    plain = W8A8Linear.from_linear(lin)
    for cols in (None, torch.tensor([], dtype=torch.long)):
        mixed = OutlierLinear.from_linear(lin, threshold=math.inf, outlier_columns=cols)
        assert torch.equal(mixed(x), plain(x))
        assert torch.equal(mixed.dequantized_weight(), plain.dequantized_weight())


@pytest.mark.parametrize("fixed", [True, False], ids=["calibrated", "dynamic"])
def test_outlier_columns_in_float_beat_plain_int8(fixed):
    lin, x = _linear(), _x()
    ref = lin(x)
    plain = W8A8Linear.from_linear(lin)
    cols = outlier_columns(x.reshape(-1, 576).abs().amax(0), 6.0) if fixed else None
    mixed = OutlierLinear.from_linear(lin, threshold=6.0, outlier_columns=cols)
    if fixed:
        assert torch.equal(cols, OUTLIERS)
    assert rel_err(mixed(x), ref) < rel_err(plain(x), ref) / 5


def test_outliers_unseen_in_calibration_are_caught_at_run_time():
    lin, x = _linear(), _x()
    seen = OUTLIERS[:1]  # calibration showed one of the three outlier columns
    caught = OutlierLinear.from_linear(lin, threshold=6.0, outlier_columns=seen)
    missed = OutlierLinear.from_linear(lin, threshold=math.inf, outlier_columns=seen)  # no run-time detection
    assert rel_err(caught(x), lin(x)) < rel_err(missed(x), lin(x)) / 5


def test_fixed_columns_keep_float16_weights_and_storage_counts_them():
    lin = _linear()
    m = OutlierLinear.from_linear(lin, outlier_columns=OUTLIERS)
    W = m.dequantized_weight()
    assert torch.equal(W[:, OUTLIERS], lin.weight[:, OUTLIERS].half().float())
    n, nbytes = m.weight_storage()
    assert n == 576 * 256
    # int8 codes, fp16 row scales, int32 column indices, fp16 outlier columns, fp32 threshold
    assert nbytes == 576 * 256 + 256 * 2 + 3 * 4 + 256 * 3 * 2 + 4


@pytest.mark.parametrize("n_cols", [0, 3])
def test_state_dict_round_trip_is_bit_identical(n_cols):
    q = OutlierLinear.from_linear(_linear(), threshold=5.0, outlier_columns=OUTLIERS[:n_cols])
    shell = OutlierLinear.empty(576, 256, bias=True)
    result = shell.load_state_dict(q.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert shell.threshold == 5.0 and torch.equal(shell.outlier_columns, q.outlier_columns)
    x = _x(5)
    assert torch.equal(shell(x), q(x))
    assert shell.weight_storage() == q.weight_storage()


def test_handler_beats_plain_int8_on_a_model_with_outlier_channels(tmp_path):
    base = logits(tiny_model("llama"))
    plain = outlier_llama()
    apply_w8a8(plain, W8A8("token"), CALIB)
    model = outlier_llama()
    apply_llm_int8(model, LLMInt8(threshold=6.0), CALIB)
    assert sum(isinstance(m, OutlierLinear) for m in model.modules()) == 14
    assert model.model.layers[0].self_attn.q_proj.outlier_columns.numel() == 3
    assert rel_err(logits(model), base) < rel_err(logits(plain), base) / 2
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "int8")
    loaded, _ = load_compressed(out)
    assert torch.equal(logits(loaded), logits(model))


def test_config_checks_and_calibration():
    with pytest.raises(SlimlmError, match="threshold"):
        LLMInt8(threshold=0)
    with pytest.raises(SlimlmError, match="calibration"):
        apply_llm_int8(tiny_model("llama"), LLMInt8(), None)
    assert needs_calibration([LLMInt8()]) and not needs_calibration([LLMInt8(calibrated=False)])
    model = apply_llm_int8(tiny_model("llama"), LLMInt8(calibrated=False), None)
    assert model.model.layers[0].mlp.up_proj.outlier_columns.numel() == 0


def test_smoothing_first_with_infinite_threshold_is_smoothquant():
    from slimlm.quant.w8a8 import SmoothQuant, apply_smoothquant

    ours = apply_llm_int8(outlier_llama(), LLMInt8(threshold=math.inf, smooth_alpha=0.5), CALIB)
    sq = apply_smoothquant(outlier_llama(), SmoothQuant(alpha=0.5), CALIB)
    torch.testing.assert_close(logits(ours), logits(sq), rtol=1e-4, atol=1e-4)


def test_smoothing_first_helps_on_a_model_with_outlier_channels():
    base = logits(outlier_llama())
    plain = apply_llm_int8(outlier_llama(), LLMInt8(threshold=math.inf), CALIB)
    smooth = apply_llm_int8(outlier_llama(), LLMInt8(threshold=math.inf, smooth_alpha=0.5), CALIB)
    assert rel_err(logits(smooth), base) < rel_err(logits(plain), base)


def test_smooth_alpha_checks():
    with pytest.raises(SlimlmError, match="smooth_alpha"):
        LLMInt8(smooth_alpha=1.5)
    assert needs_calibration([LLMInt8(calibrated=False, smooth_alpha=0.5)])
    with pytest.raises(SlimlmError, match="smooth_alpha"):
        apply_llm_int8(tiny_model("llama"), LLMInt8(calibrated=False, smooth_alpha=0.5), None)
