"""OutlierLinear: LLM.int8() mixed-precision decomposition (Dettmers et al. 2022, arXiv:2208.07339).

``X W^T = X_O W_O^T + X_R W_R^T``: the few input feature columns ``O`` whose
activations exceed a threshold (6.0 in the paper) are multiplied in float;
every other column ``R`` goes through vector-wise int8 (per-row weight
scales, per-token activation scales, ``torch._int_mm`` where available) and
the two products are summed.

Which columns are outliers, decided here:

* **fixed** columns, found from calibration abs-max (``max |x_j| > threshold``):
  their weight columns are kept in float16 (``outlier_weight`` (out, n)) and
  zeroed before the int8 row scales are computed, so a large outlier weight
  does not coarsen its row's scale either. Cheap: only n columns are stored.
* **dynamic** columns, found per forward as in the paper and bitsandbytes
  (any ``|x_ij| > threshold`` in this call, outside the fixed set): their
  activations stay in float, their weights come from the int8 codes
  (dequantized, as bitsandbytes does) -- no extra storage, and outliers the
  calibration text never showed are still caught.

With ``threshold = inf`` both sets are empty and the module computes exactly
what :class:`W8A8Linear` computes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.formats import codec
from slimlm.formats.scheme import Scheme
from slimlm.kernels import WeightKernel, select_w8a8_kernel, weight_matmul
from slimlm.nn.packed import PackedLinear
from slimlm.nn.quant_linear import linear_weight, zero_packed
from slimlm.nn.w8a8_linear import W8A8_WEIGHT_SCHEME, _check_scheme

IDX, WEIGHT, THRESHOLD = "outlier_idx", "outlier_weight", "threshold"


def _extras(idx: Tensor, W_out: Tensor, threshold: float) -> dict[str, Tensor]:
    return {IDX: idx.to(torch.int32), WEIGHT: W_out.to(torch.float16),
            THRESHOLD: torch.tensor(float(threshold), device=idx.device)}  # fmt: skip


class OutlierLinear(PackedLinear):
    """``y = x[:, O] W_O^T (float) + int8(x[:, R]) int8(W_R)^T + b``."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__(in_features, out_features, W8A8_WEIGHT_SCHEME, bias=bias, dtype=dtype, device=device)

    def _select_kernel(self, device: torch.device) -> WeightKernel:
        return select_w8a8_kernel(self.scheme, self.shape, device)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, *, threshold: float = 6.0,
                    outlier_columns: Tensor | None = None) -> OutlierLinear:  # fmt: skip
        """Quantize ``linear``; ``outlier_columns`` (indices into in_features) keep float16 weights."""
        if not threshold > 0:
            raise SlimlmError(f"threshold must be > 0 (6.0 in LLM.int8(); inf turns outliers off), got {threshold}")
        W, bias = linear_weight(linear)  # (out, in)
        out_features, in_features = W.shape
        module = cls(in_features, out_features, bias=bias is not None, dtype=W.dtype, device=W.device)
        idx = torch.zeros(0, dtype=torch.long, device=W.device)
        if outlier_columns is not None:
            idx = torch.unique(outlier_columns.to(device=W.device, dtype=torch.long))  # sorted
            if idx.numel() and (idx[0] < 0 or idx[-1] >= in_features):
                raise SlimlmError(f"outlier_columns must index 0..{in_features - 1}, got {idx[0]}..{idx[-1]}")
        W_int = W.float().clone()
        W_int[:, idx] = 0.0  # outlier columns live in float16; keep them out of the int8 row scales
        if bias is not None:
            module.bias.copy_(bias.detach())
        module._extra = _extras(idx, W[:, idx], threshold)
        module._install(codec.pack(codec.quantize(W_int, W8A8_WEIGHT_SCHEME)))
        return module

    @classmethod
    def empty(cls, in_features: int, out_features: int, scheme: Scheme | None = None, *, bias: bool,
              dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> OutlierLinear:  # fmt: skip
        """A zero-weight shell; ``load_state_dict`` fills it, outlier columns and threshold included."""
        _check_scheme(scheme)
        module = cls(in_features, out_features, bias=bias, dtype=dtype, device=device)
        idx = torch.zeros(0, dtype=torch.long, device=device)
        module._extra = _extras(idx, torch.zeros(out_features, 0, device=device), math.inf)
        reference = select_w8a8_kernel(module.scheme, module.shape, torch.device("cpu"), fast=False)
        module._install(zero_packed(module.scheme, module.shape, device), kernel=reference)
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 -- torch's signature
        # The number of outlier columns differs per layer and is not in the manifest: size the slots
        # from the state dict (dtype and the other dimension are still checked by the base class).
        idx = state_dict.get(prefix + IDX)
        if idx is not None and idx.dim() == 1:
            n, dev = idx.shape[0], self.weight_device
            self._extra = {IDX: torch.zeros(n, dtype=torch.int32, device=dev),
                           WEIGHT: torch.zeros(self.out_features, n, dtype=torch.float16, device=dev),
                           THRESHOLD: self._extra[THRESHOLD]}  # fmt: skip
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def threshold(self) -> float:
        return float(self._extra[THRESHOLD])

    @property
    def outlier_columns(self) -> Tensor:
        return self._extra[IDX].long()

    def dequantized_weight(self) -> Tensor:
        W = super().dequantized_weight().clone()  # (out, in) float32
        W[:, self.outlier_columns] = self._extra[WEIGHT].float()
        return W

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        X = x.reshape(-1, self.in_features)  # (M, in)
        fixed = self.outlier_columns  # (n,)
        dyn = torch.zeros(0, dtype=torch.long, device=x.device)
        if math.isfinite(self.threshold):
            big = (X.abs() > self.threshold).any(0)  # (in,): a column with any outlier in this call
            big[fixed] = False
            dyn = big.nonzero().squeeze(1)  # (d,)
        X_R = X
        if fixed.numel() or dyn.numel():
            X_R = X.clone()
            X_R[:, fixed] = 0.0
            X_R[:, dyn] = 0.0
        Y = weight_matmul(self.kernel, X_R, self._weight, self.scheme, self.shape)  # (M, out), int8 part
        if fixed.numel():
            Y = Y + (X[:, fixed].float() @ self._extra[WEIGHT].float().t()).to(Y.dtype)  # (M, n) @ (n, out)
        if dyn.numel():
            # W8A8 kernels keep int8 ``qweight`` (out, in) and float16 ``scale`` (out, 1)
            W_dyn = self._weight["qweight"][:, dyn].float() * self._weight["scale"].float()  # (out, d)
            Y = Y + (X[:, dyn].float() @ W_dyn.t()).to(Y.dtype)
        if self.bias is not None:
            Y = Y + self.bias.to(Y.dtype)
        return Y.reshape(*lead, self.out_features)
