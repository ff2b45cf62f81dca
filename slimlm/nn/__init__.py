"""Runtime modules that replace ``nn.Linear`` by module swap.

:data:`RUNTIME_MODULES` maps the class names a checkpoint manifest records
to the classes whose ``empty(...)`` shells ``load_state_dict`` fills.
"""

from slimlm.nn.packed import PackedLinear
from slimlm.nn.quant_linear import QuantLinear, linear_weight
from slimlm.nn.w8a8_linear import W8A8_WEIGHT_SCHEME, W8A8Linear

RUNTIME_MODULES: dict[str, type[PackedLinear]] = {
    "QuantLinear": QuantLinear,
    "W8A8Linear": W8A8Linear,
}

__all__ = ["RUNTIME_MODULES", "W8A8_WEIGHT_SCHEME", "PackedLinear", "QuantLinear", "W8A8Linear", "linear_weight"]
