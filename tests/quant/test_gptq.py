import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, NF4Scheme, PerChannel, PerGroup, PerTensor, TernaryScheme, affine_params, codec
from slimlm.models.tiny import tiny_model
from slimlm.nn import QuantLinear
from slimlm.quant import GPTQ, RTN, apply_gptq, apply_rtn, gptq_quantize
from slimlm.targets import Targets


def _layer(n_in=96, n_out=32, rows=1024, seed=0):
    """Random correlated inputs with a few loud channels (as in LLM activations), and a weight."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, n_in, generator=g) @ (torch.randn(n_in, n_in, generator=g) / n_in**0.5)
    X = X + 0.3 * torch.randn(rows, n_in, generator=g)
    X[:, :6] *= 4
    W = torch.randn(n_out, n_in, generator=g)
    return W, X, 2 * X.t() @ X / rows


def _out_err(W, X, qw):
    return ((W - codec.dequantize(qw)) @ X.t()).pow(2).sum().item()


SCHEMES = [
    IntScheme(4, granularity=PerGroup(16)),
    IntScheme(3, granularity=PerChannel()),
    IntScheme(2, granularity=PerGroup(32)),
    IntScheme(3, symmetric=True, granularity=PerGroup(24)),
    IntScheme(4, granularity=PerTensor()),
    TernaryScheme(),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: repr(s)[:40])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_beats_rtn(scheme, act_order):
    W, X, H = _layer()
    rtn = _out_err(W, X, codec.quantize(W, scheme))
    for static in (True, False):
        qw, stats = gptq_quantize(W, H, scheme, act_order=act_order, static_groups=static, blocksize=32)
        assert _out_err(W, X, qw) < 0.9 * rtn
        assert stats["loss"] > 0 and stats["dead"] == 0


@pytest.mark.parametrize("scheme", [IntScheme(4, granularity=PerGroup(16)), IntScheme(3, True, PerChannel())])
def test_diagonal_hessian_gives_rtn_codes(scheme):
    W, _, _ = _layer()
    H = torch.diag(torch.rand(W.shape[1], generator=torch.Generator().manual_seed(3)) + 0.1)
    rtn = codec.quantize(W, scheme)
    for act_order in (False, True):
        qw, _ = gptq_quantize(W, H, scheme, act_order=act_order)
        assert torch.equal(qw.codes, rtn.codes) and torch.equal(qw.scale, rtn.scale)


def test_act_order_static_groups_keep_rtn_params_and_contiguous_groups():
    W, X, H = _layer()
    scheme = IntScheme(4, granularity=PerGroup(16))
    qw, _ = gptq_quantize(W, H, scheme, act_order=True, static_groups=True)
    scale, zero = affine_params(W, bits=4, symmetric=False, granularity=PerGroup(16))
    assert torch.equal(qw.scale, scale) and torch.equal(qw.zero, zero)
    assert qw.scale.shape == (32, 6)  # one parameter column per contiguous group of 16
    back = codec.unpack(codec.pack(qw), scheme, qw.shape)  # the stored layout is the plain group layout
    assert torch.equal(codec.dequantize(back), codec.dequantize(qw))


def test_dynamic_groups_use_updated_weights():
    W, X, H = _layer()
    scheme = IntScheme(3, granularity=PerGroup(16))
    static, _ = gptq_quantize(W, H, scheme, act_order=True, static_groups=True)
    dynamic, _ = gptq_quantize(W, H, scheme, act_order=True, static_groups=False)
    assert not torch.equal(dynamic.scale, static.scale)  # groups touched after an update see new weights
    first = torch.argsort(H.diagonal(), descending=True)[0] // 16  # the group solved first: W untouched yet
    s0, z0 = affine_params(W[:, first * 16 : first * 16 + 16], bits=3, symmetric=False, granularity=PerChannel())
    assert torch.equal(dynamic.scale[:, first], s0[:, 0]) and torch.equal(dynamic.zero[:, first], z0[:, 0])
    back = codec.unpack(codec.pack(dynamic), scheme, dynamic.shape)  # fp16-exact scales, packable
    assert torch.equal(back.codes, dynamic.codes)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: repr(s)[:40])
def test_shapes_and_code_ranges(scheme):
    W, _, H = _layer()
    qw, _ = gptq_quantize(W, H, scheme, act_order=True)
    assert qw.shape == tuple(W.shape) and qw.codes.shape == W.shape and qw.scheme == scheme
    codes = qw.codes.to(torch.int16)
    if isinstance(scheme, TernaryScheme):
        assert set(codes.unique().tolist()) <= {-1, 0, 1} and qw.scale.shape == (W.shape[0], 1)
    elif scheme.symmetric:
        lim = 2 ** (scheme.bits - 1) - 1
        assert qw.codes.dtype == torch.int8 and codes.abs().max() <= lim and qw.zero is None
    else:
        assert qw.codes.dtype == torch.uint8 and codes.max() <= 2**scheme.bits - 1
    assert torch.isfinite(codec.dequantize(qw)).all()


def test_dead_inputs_are_zeroed_and_harmless():
    W, X, _ = _layer()
    X[:, [3, 40, 41]] = 0.0
    H = 2 * X.t() @ X / X.shape[0]
    qw, stats = gptq_quantize(W, H, IntScheme(4, granularity=PerGroup(16)), act_order=True)
    assert stats["dead"] == 3
    Wq = codec.dequantize(qw)
    assert torch.isfinite(Wq).all() and (Wq[:, [3, 40, 41]] == 0).all()
    assert _out_err(W, X, qw) < _out_err(W, X, codec.quantize(W, IntScheme(4, granularity=PerGroup(16))))


def test_refusals():
    W, _, H = _layer()
    with pytest.raises(SlimlmError, match="IntScheme .* or TernaryScheme"):
        gptq_quantize(W, H, NF4Scheme())
    with pytest.raises(SlimlmError, match="does not divide in_features 96; valid: .*32"):
        gptq_quantize(W, H, IntScheme(4, granularity=PerGroup(64)))
    with pytest.raises(SlimlmError, match="percdamp"):
        GPTQ(percdamp=-0.1)
    with pytest.raises(SlimlmError, match="blocksize"):
        GPTQ(blocksize=0)
    with pytest.raises(SlimlmError, match="TernaryScheme"):
        GPTQ(scheme="nf4")
    assert GPTQ(scheme="int3-g64").scheme == IntScheme(3, granularity=PerGroup(64))


CALIB = torch.randint(3, 512, (8, 48), generator=torch.Generator().manual_seed(0))


def _kl_to(base, model):
    with torch.no_grad():
        p = base(CALIB).logits.log_softmax(-1)
        q = model(CALIB).logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_handler_beats_rtn_on_a_tiny_model(family):
    base = tiny_model(family)
    rtn = apply_rtn(tiny_model(family), RTN(scheme="int3-channel"))
    gptq = apply_gptq(tiny_model(family), GPTQ(scheme="int3-channel", batch_size=4), CALIB)
    n_linears = sum(isinstance(m, QuantLinear) for m in rtn.modules())
    assert sum(isinstance(m, QuantLinear) for m in gptq.modules()) == n_linears > 0
    assert not isinstance(gptq.lm_head, QuantLinear)
    assert _kl_to(base, gptq) < 0.8 * _kl_to(base, rtn)


def test_handler_overrides_lm_head_and_bad_calib():
    model = tiny_model("llama")
    config = GPTQ(scheme="int4-g16", overrides=(("*.down_proj", "int8-channel-sym"),), targets=Targets(lm_head=True))
    apply_gptq(model, config, CALIB[:2])
    assert model.model.layers[0].mlp.down_proj.scheme.bits == 8
    assert model.model.layers[1].self_attn.q_proj.scheme.bits == 4
    assert isinstance(model.lm_head, QuantLinear)
    fresh = tiny_model("llama")
    with pytest.raises(SlimlmError, match="needs calibration"):
        apply_gptq(fresh, GPTQ(), None)
    with pytest.raises(SlimlmError, match="does not divide in_features 64"):
        apply_gptq(fresh, GPTQ(scheme="int4-g48"), CALIB)
    assert not any(isinstance(m, QuantLinear) for m in fresh.modules())
