import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, NF4Scheme, PerGroup, codec
from slimlm.kernels.sparse import select_sparse_kernel
from slimlm.nn import SparseLinear, SparseQuantLinear
from slimlm.nn.sparse_format import decode_positions, encode_positions, uses_index
from slimlm.prune import magnitude_mask, nm_keep
from slimlm.prune.patterns import NM, Unstructured


def _linear(n_in=64, n_out=48, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias, dtype=dtype)


@pytest.mark.parametrize("nm", [None, (2, 4), (1, 4), (4, 8), (3, 16)])
def test_positions_round_trip_in_the_smaller_layout(nm):
    S = torch.randn(48, 64)
    keep = nm_keep(S, *nm) if nm else magnitude_mask(S, 0.37, Unstructured())
    t = encode_positions(keep, nm)
    assert torch.equal(decode_positions(t, keep.shape), keep)
    assert ("index" in t) == uses_index(nm) == (nm in [(2, 4), (1, 4), (3, 16)])
    bits = sum(v.numel() * 8 for k, v in t.items() if k != "pattern") / keep.numel()
    assert bits == {None: 1, (2, 4): 1, (1, 4): 0.5, (4, 8): 1, (3, 16): 0.75}[nm]


def test_encoding_refuses_a_mask_that_breaks_its_pattern():
    keep = nm_keep(torch.randn(4, 8), 2, 4)
    keep[0, 0] = ~keep[0, 0]
    with pytest.raises(SlimlmError, match="does not keep exactly 2 of every 4"):
        encode_positions(keep, (2, 4))


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_is_the_masked_linear_and_stores_less(nm, dtype):
    lin = _linear(dtype=dtype)
    keep = nm_keep(lin.weight, *nm) if nm else magnitude_mask(lin.weight, 0.5, Unstructured())
    sp = SparseLinear.from_linear(lin, keep, nm=nm)
    x = torch.randn(3, 5, 64, dtype=dtype)
    assert torch.equal(sp(x), F.linear(x, lin.weight * keep, lin.bias))
    assert torch.equal(sp.dequantized_weight(), (lin.weight * keep).float()) and torch.equal(sp.keep_mask(), keep)
    n, nbytes = sp.weight_storage()
    assert n == 64 * 48 and sp.kept == int(keep.sum())
    bpw = 8 * nbytes / n
    # half the values, 1-bit positions, and the 4-byte pattern
    assert bpw == pytest.approx(0.5 * 8 * lin.weight.element_size() + 1, abs=0.02)
    assert set(sp.state_dict()) == {"bias", "values", "pattern", "index" if nm == (2, 4) else "mask"}


def test_state_dict_round_trip_into_an_empty_shell_with_another_kept_count():
    lin = _linear()
    sp = SparseLinear.from_linear(lin, magnitude_mask(lin.weight, 0.3, Unstructured()))
    shell = SparseLinear.empty(64, 48, bias=True)
    assert shell.kept == 0
    shell.load_state_dict(sp.state_dict())
    x = torch.randn(7, 64)
    assert torch.equal(shell(x), sp(x)) and shell.kept == sp.kept


def test_damaged_state_dicts_are_refused():
    lin = _linear()
    sd = SparseLinear.from_linear(lin, magnitude_mask(lin.weight, 0.5, Unstructured())).state_dict()
    short = dict(sd, values=sd["values"][:-1])
    with pytest.raises(SlimlmError, match="the checkpoint is damaged"):
        SparseLinear.empty(64, 48, bias=True).load_state_dict(short)
    with pytest.raises(RuntimeError, match="Missing key"):
        SparseLinear.empty(64, 48, bias=True).load_state_dict({k: v for k, v in sd.items() if k != "values"})


@pytest.mark.parametrize("scheme", [IntScheme(4, granularity=PerGroup(32)), IntScheme(8, True, PerGroup(64))],
                         ids=["int4-g32", "int8-g64-sym"])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparse_quant_linear_stores_kept_codes_only(scheme, nm):
    lin = _linear()
    keep = nm_keep(lin.weight, *nm) if nm else magnitude_mask(lin.weight, 0.5, Unstructured())
    qw = codec.quantize(lin.weight.detach() * keep, scheme)  # zeros quantize to exactly zero
    sq = SparseQuantLinear.from_quantized(lin, qw, keep, nm=nm)
    assert torch.equal(sq.dequantized_weight(), codec.dequantize(qw)) and sq.kept == int(keep.sum())
    n, nbytes = sq.weight_storage()
    dense_bits = codec.bits_per_weight(scheme, (48, 64))
    assert 8 * nbytes / n == pytest.approx(dense_bits - scheme.bits / 2 + 1, abs=0.02)  # half the codes + positions
    shell = SparseQuantLinear.empty(64, 48, scheme, bias=True)
    shell.load_state_dict(sq.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(shell(x), sq(x))


def test_sparse_quant_linear_refuses_nonzero_pruned_codes_and_non_int_schemes():
    lin = _linear()
    keep = magnitude_mask(lin.weight, 0.5, Unstructured())
    with pytest.raises(SlimlmError, match="must quantize to exactly 0"):
        SparseQuantLinear.from_quantized(lin, codec.quantize(lin.weight.detach(), IntScheme(4)), keep)
    with pytest.raises(SlimlmError, match="needs an int scheme"):
        SparseQuantLinear.empty(64, 48, NF4Scheme(), bias=False)


def test_cpu_picks_the_dense_cache_and_csr_agrees():
    assert select_sparse_kernel((2, 4), (64, 64), torch.device("cpu"), torch.float16).name == "sparse-dense"
    lin = _linear(bias=False)
    keep = magnitude_mask(lin.weight, 0.5, Unstructured())
    dense, csr = SparseLinear.from_linear(lin, keep), SparseLinear.from_linear(lin, keep, kernel="sparse-csr")
    x = torch.randn(5, 64)
    for _ in range(2):  # the first call runs the kernel's first-use check, later ones the kernel itself
        torch.testing.assert_close(csr(x), dense(x), rtol=1e-5, atol=1e-5)
    assert csr.kernel.name == "sparse-csr"
    with pytest.raises(SlimlmError, match="unknown sparse kernel"):
        select_sparse_kernel(None, (4, 4), torch.device("cpu"), torch.float32, name="magic")
    with pytest.raises(SlimlmError, match="does not run"):
        select_sparse_kernel(None, (4, 4), torch.device("cpu"), torch.float32, name="sparse-2:4-cuda")


CUDA_SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not CUDA_SM80, reason="needs an NVIDIA GPU with sparse tensor cores (sm80+); run by scripts/gpu-check.sh")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_24_runs_on_sparse_tensor_cores_and_is_the_masked_linear(dtype):
    lin = _linear(n_in=256, n_out=128, dtype=dtype).cuda()
    keep = nm_keep(lin.weight, 2, 4)
    assert SparseLinear.from_linear(lin, keep, nm=(2, 4)).kernel.name == "sparse-dense"  # measured slower: by name only
    sp = SparseLinear.from_linear(lin, keep, nm=(2, 4), kernel="sparse-2:4-cuda")
    assert sp.kernel.name == "sparse-2:4-cuda"
    for rows in (1, 8, 64):
        x = torch.randn(rows, 256, dtype=dtype, device="cuda")
        torch.testing.assert_close(sp(x), F.linear(x, lin.weight * keep, lin.bias), rtol=1e-2, atol=1e-2)
    assert torch.equal(sp.dequantized_weight().to(dtype), lin.weight * keep)
    cpu = sp.to("cpu")  # leaving the GPU: the dense layout again, same weights
    assert cpu.kernel.name == "sparse-dense" and torch.equal(cpu.keep_mask(), keep.cpu())
