"""Runtime modules that replace ``nn.Linear`` by module swap.

:data:`RUNTIME_MODULES` is the one table of them: it maps the class names a
checkpoint manifest records to the classes whose ``from_manifest`` shells
``load_state_dict`` fills (see :mod:`slimlm.nn.runtime`). A new runtime
module subclasses :class:`RuntimeModule` and adds one line here.
"""

from slimlm.nn.compensated_linear import SIDE_DTYPES, CompensatedLinear
from slimlm.nn.compose import check_schemes, gptq_pruned, rtn_pruned
from slimlm.nn.lowrank_linear import LowRankLinear, break_even_rank
from slimlm.nn.outlier_linear import OutlierLinear
from slimlm.nn.packed import PackedLinear
from slimlm.nn.quant_embedding import (SharedQuantEmbedding, float_embeddings, share_embedding,
                                       tied_input_embedding)  # fmt: skip
from slimlm.nn.quant_linear import QuantLinear, in_features_of, linear_weight
from slimlm.nn.runtime import RuntimeModule
from slimlm.nn.sparse_linear import SparseLinear, SparseQuantLinear
from slimlm.nn.w8a8_linear import W8A8_CLASSES, W8A8_WEIGHT_SCHEME, W8A8Linear, W8A8PerTensorLinear

RUNTIME_MODULES: dict[str, type[RuntimeModule]] = {
    "QuantLinear": QuantLinear,
    "W8A8Linear": W8A8Linear,
    "W8A8PerTensorLinear": W8A8PerTensorLinear,
    "OutlierLinear": OutlierLinear,
    "SparseLinear": SparseLinear,
    "SparseQuantLinear": SparseQuantLinear,
    "CompensatedLinear": CompensatedLinear,
    "LowRankLinear": LowRankLinear,
    "SharedQuantEmbedding": SharedQuantEmbedding,
}

__all__ = ["RUNTIME_MODULES", "SIDE_DTYPES", "W8A8_CLASSES", "W8A8_WEIGHT_SCHEME", "CompensatedLinear", "LowRankLinear",
           "OutlierLinear", "PackedLinear", "QuantLinear", "RuntimeModule", "SharedQuantEmbedding", "SparseLinear",
           "SparseQuantLinear", "W8A8Linear", "W8A8PerTensorLinear", "break_even_rank", "check_schemes",
           "float_embeddings", "gptq_pruned", "in_features_of", "linear_weight", "rtn_pruned", "share_embedding",
           "tied_input_embedding"]
