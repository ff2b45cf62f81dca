"""GGUF export, read back with gguf-py: matching grids are written code for code."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from slimlm.export import export
from slimlm.export.gguf_blocks import block_params, pack_blocks, permute_heads
from slimlm.formats import IntScheme, PerGroup, codec
from slimlm.io import load_compressed
from tests.export.gguf_util import LINEARS, checkpoint, decode_blocks, unpermute

# scheme -> GGUF type; groups of 64 and whole rows are blocks of 32 repeating the scale
EXACT = {"int4-g32-sym": QT.Q4_0, "int4-g32": QT.Q4_1, "int8-g32-sym": QT.Q8_0, "int5-g32-sym": QT.Q5_0,
         "int5-g32": QT.Q5_1, "int4-g64-sym": QT.Q4_0, "int8-channel-sym": QT.Q8_0, "int4-g64": QT.Q4_1}  # fmt: skip
OFFSET = {QT.Q8_0: 0, QT.Q4_0: 8, QT.Q5_0: 16, QT.Q4_1: 0, QT.Q5_1: 0}


def _pairs(path, ckpt):
    """(GGUF tensor, slimlm QuantLinear, heads) for every block linear, the slimlm side in HF row order."""
    model, _ = load_compressed(ckpt)
    heads = {"q": model.config.num_attention_heads, "kv": model.config.num_key_value_heads}
    for t in gguf.GGUFReader(path).tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[2] in LINEARS:
            hf, perm = LINEARS[parts[2]]
            yield t, model.get_submodule(f"model.layers.{parts[1]}.{hf}"), heads.get(perm)


def _hf_order(x, heads):
    return x if heads is None else unpermute(x, heads)


@pytest.mark.parametrize("scheme", EXACT)
def test_codes_and_scales_are_slimlm_s(tmp_path, scheme):
    ckpt = checkpoint(tmp_path, scheme)
    path = export(ckpt, tmp_path / "m.gguf", format="gguf")
    n = 0
    for t, module, heads in _pairs(path, ckpt):
        assert t.tensor_type == EXACT[scheme]
        qw = codec.unpack(module.portable_tensors(), module.scheme, module.shape)
        q, d, m = decode_blocks(t.data, t.tensor_type, module.out_features)
        q, d = _hf_order(torch.from_numpy(q), heads), _hf_order(torch.from_numpy(d.astype(np.float32)), heads)
        codes = qw.codes.to(torch.int32)
        assert torch.equal(q - OFFSET[t.tensor_type], codes)  # the stored codes, code for code
        per_block = qw.scale.repeat_interleave(d.shape[1] // qw.scale.shape[1], dim=1)  # (out, nb)
        assert torch.equal(d, per_block)  # the fp16 scales, bit for bit
        if m is not None:
            z = qw.zero.repeat_interleave(d.shape[1] // qw.zero.shape[1], dim=1)
            m = _hf_order(torch.from_numpy(m.astype(np.float32)), heads)
            assert torch.equal(m, (-(per_block * z)).half().float())  # m = fp16(-d*z)
            # the stated bound: half a float16 ulp, <= 2^-11 of |d*z|, < 0.75% (int4) / 1.6% (int5) of a step
            assert ((m + per_block * z).abs() <= 2.0**-11 * per_block * z + 2.0**-25).all()
            assert ((m + per_block * z).abs() <= (2**module.scheme.bits - 1) * 2.0**-11 * per_block + 2.0**-25).all()
        n += 1
    assert n == 14


@pytest.mark.parametrize("scheme", EXACT)
def test_gguf_dequantize_equals_slimlm_dequantized_weight(tmp_path, scheme):
    ckpt = checkpoint(tmp_path, scheme)
    path = export(ckpt, tmp_path / "m.gguf", format="gguf")
    for t, module, heads in _pairs(path, ckpt):
        theirs = _hf_order(torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)), heads)
        ours = module.dequantized_weight()
        if module.scheme.symmetric:
            assert torch.equal(theirs, ours)  # bit-exact
            continue
        qw = codec.unpack(module.portable_tensors(), module.scheme, module.shape)
        s, z = (x.repeat_interleave(ours.shape[1] // x.shape[1], dim=1) for x in (qw.scale, qw.zero))
        # m's float16 rounding (2^-11 of s*z, 2^-25 below float16's normal range) + float32's d*q + m
        bound = 2.0**-11 * s * z + 2.0**-25 + 2.0**-23 * ours.abs()
        assert ((theirs - ours).abs() <= bound).all()
        assert not torch.equal(theirs, ours) or torch.all(z == 0)  # the rounding is real, and the test sees it


def test_q_and_k_rows_are_permuted_and_v_is_not(tmp_path):
    ckpt = checkpoint(tmp_path, "int8-g32-sym")
    path = export(ckpt, tmp_path / "m.gguf", format="gguf")
    for t, module, heads in _pairs(path, ckpt):
        raw = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
        if heads is not None:  # stored in llama.cpp's order, which differs from HF's
            assert not torch.equal(raw, module.dequantized_weight())
        assert torch.equal(_hf_order(raw, heads), module.dequantized_weight())


def test_block_packer_agrees_with_gguf_py_encoder_on_its_own_grid():
    # gguf-py's Q8_0 encoder rounds to absmax/127 per block, the same grid as slimlm int8-g32-sym,
    # so both must produce the same bytes from the same weights.
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    qw = codec.quantize(W, IntScheme(8, symmetric=True, granularity=PerGroup(32)))
    qtype, q, d, m = block_params(qw)
    ours = pack_blocks(qtype, q, d, m)
    theirs = gguf.quants.quantize(codec.dequantize(qw).numpy(), QT.Q8_0)
    assert np.array_equal(ours, theirs)


def test_permutation_moves_whole_rows():
    x = torch.arange(8 * 3).reshape(8, 3)
    y = permute_heads(x, 2)  # 2 heads of 4 rows: [0, 2, 1, 3] within each head
    assert y[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    assert torch.equal(unpermute(y, 2), x)
