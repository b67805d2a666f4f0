"""Codecs with a scale stored once per matrix (NVFP4's fp32 tensor scale, FP8 `granularity: tensor`).

Such a scale comes from the whole matrix's largest magnitude (amax), which a codec's `fit` on one
column group cannot see. So the codec is bound to an amax first (`Codec.for_matrix`): `encode`, GPTQ
and the fake quantizers hand it the matrix they quantize and get back a copy holding that matrix's
amax (`tensor_amax`); every `fit` of that copy uses it, and `pack` stores the scale made from it.

A codec already bound keeps its amax, which is how a scale is shared or fixed from elsewhere:

    fused   the weights step binds q/k/v (and gate/up) of a layer to their joint amax
            (quant/fused.py), so one tensor scale serves the matrix vLLM fuses them into;
    static  the activation step binds each Linear's activation codec to the amax of its input over
            the calibration set (quant/act.py, `act: {static: true}`).

`tensor_amax` is a 0-d tensor, or [rows] for a codec that scales each row on its own (NVFP4
`tensor_scale: per_row`: a token's activations, a head's K/V row).
"""
from __future__ import annotations

import copy

from quantatlas._lazy import torch


class TensorScaled:
    """Mixin of a Codec with a per-matrix (or per-row) amax; subclasses set `has_tensor_scale`."""

    #: the amax this codec's scale comes from; None until bound (`for_matrix`, `with_amax`)
    tensor_amax = None
    #: one amax per row instead of one per matrix
    per_row_amax: bool = False

    @property
    def has_tensor_scale(self) -> bool:
        return True

    def with_amax(self, amax) -> "TensorScaled":
        """A copy of this codec bound to `amax` (a number, a 0-d tensor or one value per row)."""
        bound = copy.copy(self)
        bound.tensor_amax = torch.as_tensor(amax).detach().float()
        return bound

    def matrix_amax(self, w: torch.Tensor) -> torch.Tensor:
        a = w.detach().abs()
        return (a.amax(-1) if self.per_row_amax else a.amax()).float()

    def for_matrix(self, w: torch.Tensor):
        if not self.has_tensor_scale or self.tensor_amax is not None:
            return self
        return self.with_amax(self.matrix_amax(w))

    def bound_amax(self, rows: int, device) -> torch.Tensor:
        """The bound amax as one value per row [rows] (float32, on `device`)."""
        if self.tensor_amax is None:
            raise ValueError(f"{self.name}: its tensor scale comes from the whole matrix; quantize through "
                             "encode / fake_quantize or bind it first (for_matrix)")
        a = self.tensor_amax.to(device)
        return a.expand(rows) if a.dim() == 0 else a
