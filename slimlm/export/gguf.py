"""Export a slimlm checkpoint as a GGUF file that llama.cpp loads, keeping what was compressed compressed.

    export_gguf("ckpt/", "model.gguf")                          # exact grids code for code, floats as F16
    export_gguf("ckpt/", "model.gguf", requantize="q4_0")       # re-round what no GGUF type holds

What goes where (llama architecture; names as llama.cpp's ``convert_hf_to_gguf.py`` maps them):

* ``QuantLinear`` on an int grid that a GGUF legacy type holds (int4/int5 symmetric or asymmetric,
  int8 symmetric; scales shared by a multiple of 32 input columns) -> Q4_0/Q4_1/Q5_0/Q5_1/Q8_0
  written from its stored codes and scales (:mod:`slimlm.export.gguf_blocks` states the layouts
  and the one rounding, of Q4_1/Q5_1's minimum).
* Any other compressed linear (NF4, k-means, ternary, binary, int3, 16-column groups, sparse,
  W8A8, outlier) is refused in one line naming the nearest recipe that exports exactly, unless
  ``requantize`` names a GGUF type: then its dequantized weight is re-rounded by gguf-py (the
  reference rounding of ggml) and a warning lists what was re-rounded.
* Float matrices (embeddings, a float lm_head, float linears) as ``float_type`` (default F16,
  as the converter's ``--outtype f16``; ``q8_0`` falls back to F16 for rows not a multiple of
  32); norms always F32, as the converter writes them.
* q/k projections get llama.cpp's row permutation (:func:`gguf_blocks.permute_heads`); a tied
  lm_head is not written (llama.cpp reuses ``token_embd``). An embedding reading the quantized
  head's table (``embedding: shared``) goes out as one ``token_embd`` in the head's exact type and
  no ``output.weight``; where no type holds the head exactly, ``token_embd`` is the table in float
  and ``output.weight`` the head (refused or re-rounded as above).

The file is written beside ``out`` under a temporary name and renamed into place; nothing is
left behind on a refusal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as QT
from gguf import quants as gguf_quants
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.export.gguf_arch import LlamaShape, gguf_tensors, llama_shape
from slimlm.export.gguf_blocks import BLOCK, block_params, exact_type, pack_blocks, permute_heads
from slimlm.export.gguf_vocab import add_vocab, vocab_from_tokenizer
from slimlm.formats import codec
from slimlm.io import load_compressed, read_manifest
from slimlm.nn import LowRankLinear, QuantLinear

log = logging.getLogger("slimlm.export")

FLOAT_TYPES: dict[str, QT] = {"f16": QT.F16, "f32": QT.F32, "bf16": QT.BF16, "q8_0": QT.Q8_0}
REQUANTIZE_TYPES: dict[str, QT] = {"q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q5_0": QT.Q5_0, "q5_1": QT.Q5_1,
                                   "q8_0": QT.Q8_0}  # fmt: skip
FILE_TYPES: dict[QT, LlamaFileType] = {
    QT.F32: LlamaFileType.ALL_F32, QT.F16: LlamaFileType.MOSTLY_F16, QT.BF16: LlamaFileType.MOSTLY_BF16,
    QT.Q8_0: LlamaFileType.MOSTLY_Q8_0, QT.Q4_0: LlamaFileType.MOSTLY_Q4_0, QT.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    QT.Q5_0: LlamaFileType.MOSTLY_Q5_0, QT.Q5_1: LlamaFileType.MOSTLY_Q5_1,
}  # fmt: skip
# The shipped recipe that exports code for code to each type (named in refusals).
RECIPE_FOR: dict[QT, str] = {QT.Q4_0: "gptq-q4_0", QT.Q4_1: "gptq-q4_1", QT.Q8_0: "rtn-q8_0"}


@dataclass(frozen=True)
class GGUFOptions:
    """How the parts without an exact GGUF type are written."""

    float_type: str = "f16"
    requantize: str | None = None

    def __post_init__(self) -> None:
        if self.float_type not in FLOAT_TYPES:
            raise SlimlmError(f"float_type {self.float_type!r} is not one of {', '.join(FLOAT_TYPES)}")
        if self.requantize is not None and self.requantize not in REQUANTIZE_TYPES:
            raise SlimlmError(f"requantize {self.requantize!r} is not one of {', '.join(REQUANTIZE_TYPES)} "
                              "(gguf-py encodes only these; K-quants it can only read)")  # fmt: skip


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of the file: its GGUF name, where it came from, its type and how it was made."""

    name: str  # e.g. "blk.0.attn_q.weight"
    source: str  # slimlm module or parameter name, e.g. "model.layers.0.self_attn.q_proj"
    type: str  # GGUF type name, e.g. "Q4_0"
    how: str  # "codes": slimlm's codes and scales; "requantized": re-rounded by gguf-py; "float"
    n_elements: int


@dataclass(frozen=True)
class GGUFReport:
    """What :func:`write_gguf` wrote: the lead's KLD printout reads ``requantized``."""

    path: Path
    file_type: str
    tensors: tuple[TensorRecord, ...]

    @property
    def requantized(self) -> tuple[str, ...]:
        return tuple(t.source for t in self.tensors if t.how == "requantized")


def export_gguf(checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                float_type: str = "f16", requantize: str | None = None) -> Path:  # fmt: skip
    """Write the slimlm checkpoint directory ``checkpoint`` as the GGUF file ``out``."""
    options = GGUFOptions(float_type, requantize)
    out = check_output(out, overwrite=overwrite)
    model, tokenizer = load_compressed(checkpoint)
    name = read_manifest(checkpoint).get("base_model") or Path(checkpoint).resolve().name
    return write_gguf(model, tokenizer, out, overwrite=overwrite, options=options, name=str(name)).path


def write_gguf(model: nn.Module, tokenizer: Any, out: str | os.PathLike, *, overwrite: bool = False,
               options: GGUFOptions = GGUFOptions(), name: str = "slimlm export") -> GGUFReport:  # fmt: skip
    """Write a loaded (compressed) model and its tokenizer as the GGUF file ``out``."""
    out = check_output(out, overwrite=overwrite)
    shape = llama_shape(model.config)
    vocab = vocab_from_tokenizer(tokenizer, shape.vocab_size)
    encoded = [_encode(gname, source, obj, heads, options) for gname, source, obj, heads in gguf_tensors(model, shape)]
    records = tuple(rec for rec, _, _ in encoded)
    file_type = _file_type(records, options)
    _warn_requantized(records, options)
    with _atomic_file(out) as tmp:
        writer = GGUFWriter(tmp, "llama")
        _add_metadata(writer, shape, name=name, file_type=file_type)
        add_vocab(writer, vocab)
        for rec, array, qtype in encoded:
            writer.add_tensor(rec.name, array, raw_dtype=qtype if array.dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.info("wrote %s (%s, %d tensors)", out, file_type.name, len(records))
    return GGUFReport(out, file_type.name, records)


def check_output(out: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse an output path that is not a ``.gguf`` file name or that exists without ``overwrite``."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise SlimlmError(f"the GGUF output {out} must be a file name ending in .gguf")
    if out.is_dir():
        raise SlimlmError(f"{out} is a directory; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} already exists; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def _atomic_file(dest: Path) -> Iterator[Path]:
    """A temporary file beside ``dest``, renamed onto it on success and removed on any failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the export is an ordinary file
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- one tensor ------------------------------------------------------------


def _encode(gname: str, source: str, obj: nn.Module | Tensor, heads: int | None,
            options: GGUFOptions) -> tuple[TensorRecord, np.ndarray, QT]:  # fmt: skip
    """The GGUF bytes of one tensor. -> (record, array: float or uint8 blocks, type)."""
    if isinstance(obj, Tensor):  # embeddings and norms
        qtype, array = _float_array(obj, options, source)
        how = "float"
    elif isinstance(obj, nn.Linear):
        qtype, array = _float_array(_permuted(obj.weight.detach().float(), heads), options, source)
        how = "float"
    else:
        qtype, array, how = _encode_compressed(source, obj, heads, options)
    n = int(np.prod(obj.shape if isinstance(obj, Tensor) else (obj.out_features, obj.in_features)))
    return TensorRecord(gname, source, qtype.name, how, n), array, qtype


def _permuted(x: Tensor, heads: int | None) -> Tensor:
    return x if heads is None else permute_heads(x, heads)


def _float_array(W: Tensor, options: GGUFOptions, source: str) -> tuple[QT, np.ndarray]:
    a = W.detach().float().cpu().numpy()
    qtype = FLOAT_TYPES[options.float_type]
    if a.ndim == 1 or qtype == QT.F32:
        return QT.F32, a
    if qtype == QT.Q8_0 and a.shape[-1] % BLOCK:
        qtype = QT.F16  # the converter's fallback for rows that are not whole blocks
    if qtype == QT.F16:
        a16 = a.astype(np.float16)
        if not np.isfinite(a16).all() and np.isfinite(a).all():
            raise SlimlmError(f"{source} has values beyond float16's range; pass float_type='bf16' or 'f32'")
        return QT.F16, a16
    return qtype, gguf_quants.quantize(a, qtype)


def _encode_compressed(source: str, module: nn.Module, heads: int | None,
                       options: GGUFOptions) -> tuple[QT, np.ndarray, str]:  # fmt: skip
    if isinstance(module, LowRankLinear):  # requantize would silently multiply it out: refuse either way
        raise SlimlmError(f"{source} (LowRankLinear, rank {module.rank}) is a low-rank factorization, which llama's "
                          "GGUF layout (one matrix per projection) cannot hold; export --format hf writes it "
                          "multiplied out (dense)")  # fmt: skip
    if getattr(module, "bias", None) is not None:
        raise SlimlmError(f"{source} has a bias, which llama's GGUF layout has no place for; export supports "
                          "bias-free llama linears")  # fmt: skip
    why = f"{type(module).__name__} is not a plain weight-only quantized linear"
    if type(module) is QuantLinear:
        packed = module.portable_tensors()
        qtype, why = exact_type(module.scheme, module.shape)
        if qtype is not None and set(packed) <= {"codes", "scale", "zero"}:
            _, q, d, m = block_params(codec.unpack(packed, module.scheme, module.shape))
            q, d = _permuted(q, heads), _permuted(d, heads)
            m = None if m is None else _permuted(m, heads)
            return qtype, pack_blocks(qtype, q, d, m), "codes"
    if options.requantize is None:
        raise SlimlmError(_refusal(source, module, why))
    qtype = REQUANTIZE_TYPES[options.requantize]
    if module.in_features % BLOCK:
        raise SlimlmError(f"{source} has {module.in_features} input columns, not a multiple of {BLOCK}: no GGUF "
                          f"block type holds it; requantize cannot help")  # fmt: skip
    W = _permuted(module.dequantized_weight().float(), heads)  # (out, in)
    return qtype, gguf_quants.quantize(W.cpu().numpy(), qtype), "requantized"


def _refusal(source: str, module: nn.Module, why: str) -> str:
    if hasattr(module, "side_weight"):  # CompensatedLinear: what is exact is the base alone
        return (f"{source} ({type(module).__name__}) holds a float low-rank side path beside its quantized base, "
                f"which GGUF has no place for; compress with the same recipe without its eora step, or pass "
                f"requantize='q4_0' to re-round base + side path (costs accuracy)")  # fmt: skip
    scheme = getattr(module, "scheme", None)
    target = QT.Q4_0
    if type(module).__name__ in ("W8A8Linear", "W8A8PerTensorLinear", "OutlierLinear") or \
            getattr(scheme, "bits", 0) >= 6:  # fmt: skip
        target = QT.Q8_0
    elif getattr(scheme, "symmetric", True) is False:
        target = QT.Q4_1
    return (f"{source} ({type(module).__name__}, {scheme!r}) has no GGUF type that holds it code for code ({why}); "
            f"compress with recipe {RECIPE_FOR[target]} (exports code for code to {target.name}) or pass "
            f"requantize='{target.name.lower()}' to re-round it (costs accuracy)")  # fmt: skip


def _file_type(records: tuple[TensorRecord, ...], options: GGUFOptions) -> LlamaFileType:
    """The type holding most block-linear weights (llama.cpp's 'mostly X'), else the float type's."""
    counts: dict[str, int] = {}
    for r in records:
        if r.name.startswith("blk.") and not r.name.endswith("_norm.weight"):
            counts[r.type] = counts.get(r.type, 0) + r.n_elements
    if not counts:
        return FILE_TYPES[FLOAT_TYPES[options.float_type]]
    return FILE_TYPES[QT[max(counts, key=counts.get)]]


def _warn_requantized(records: tuple[TensorRecord, ...], options: GGUFOptions) -> None:
    sources = [r.source for r in records if r.how == "requantized"]
    if sources:
        log.warning("re-rounded %d linears to %s with gguf-py's rounding (the GGUF is NOT the checkpoint's "
                    "weights; measure the cost, e.g. KLD against the checkpoint): %s", len(sources),
                    options.requantize.upper(), ", ".join(sources))  # fmt: skip


def _add_metadata(writer: GGUFWriter, shape: LlamaShape, *, name: str, file_type: LlamaFileType) -> None:
    """``general.*`` and ``llama.*`` keys, as llama.cpp's converter writes them for LlamaForCausalLM."""
    writer.add_type("model")
    writer.add_name(name)
    writer.add_quantized_by("slimlm")
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.ff)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.vocab_size)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)
