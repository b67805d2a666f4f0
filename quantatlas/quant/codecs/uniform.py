"""Round-to-nearest uniform integer grid with fp16 scales (and fp16 zero points when asymmetric).

symmetric:  w_hat = s * q,        q in [-2^(b-1), 2^(b-1) - 1],  s = clip * max|w| / (2^(b-1) - 1)
asymmetric: w_hat = s * (q - z),  q in [0, 2^b - 1],            s = clip * (max - min) / (2^b - 1),
            z = round(-clip * min / s)

`clip` is 1 for `clip: minmax`; `mse` and `hessian` search a grid of shrink factors per row
of each group, minimising sum_j imp_j (w_j - w_hat_j)^2 with imp = 1 (mse) or imp = diag(H)
(hessian, passed in as `importance`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.config import CodecConfig

#: shrink factors 1.0, 0.98, ..., 0.5 searched by clip: mse / hessian
CLIP_STEPS = 26


class UniformConfig(CodecConfig):
    name = "uniform"
    bits: int = Field(ge=2, le=8)
    group: int | None = Field(128, gt=0)   # null: one group per row
    symmetric: bool = True
    clip: Literal["minmax", "mse", "hessian"] = "minmax"

    def build(self):
        return Uniform(self)


@dataclass
class UniformParams:
    scale: torch.Tensor  # [rows], already rounded to fp16
    zero: torch.Tensor | None  # [rows] integer-valued, asymmetric only


class Uniform(Codec):
    name = "uniform"

    def __init__(self, cfg: UniformConfig):
        super().__init__(cfg)
        self.bits, self.group_size, self.symmetric, self.clip = cfg.bits, cfg.group, cfg.symmetric, cfg.clip

    # -- grid -----------------------------------------------------------------------------
    def _levels(self) -> tuple[int, int]:
        if self.symmetric:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def _params(self, w: torch.Tensor, shrink: torch.Tensor) -> UniformParams:
        """Parameters for each row of w [rows, g] at shrink factors [rows] (or [k, rows])."""
        lo, hi = self._levels()
        if self.symmetric:
            amax = w.abs().amax(-1) * shrink
            scale = (amax / hi).half().float()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            return UniformParams(scale, None)
        wmin = torch.minimum(w.amin(-1), torch.zeros_like(w[..., 0])) * shrink
        wmax = torch.maximum(w.amax(-1), torch.zeros_like(w[..., 0])) * shrink
        scale = ((wmax - wmin) / hi).half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-wmin / scale).clamp(lo, hi)
        return UniformParams(scale, zero)

    def _codes(self, w: torch.Tensor, p: UniformParams) -> torch.Tensor:
        """Grid indices q in [lo, hi] (q - z is the multiple of the scale), as float."""
        lo, hi = self._levels()
        q = torch.round(w / p.scale.unsqueeze(-1))
        if p.zero is not None:
            q = q + p.zero.unsqueeze(-1)
        return torch.clamp(q, lo, hi)

    def _values(self, q: torch.Tensor, p: UniformParams) -> torch.Tensor:
        if p.zero is not None:
            q = q - p.zero.unsqueeze(-1)
        return q * p.scale.unsqueeze(-1)

    def _round(self, w: torch.Tensor, p: UniformParams) -> torch.Tensor:
        return self._values(self._codes(w, p), p)

    # -- codec steps ------------------------------------------------------------------------
    def fit(self, w, importance=None):
        w = w.float()
        rows = w.shape[0]
        if self.clip == "minmax":
            return self._params(w, torch.ones(rows, device=w.device))
        imp = torch.ones(w.shape[1], device=w.device) if self.clip == "mse" or importance is None \
            else importance.float().to(w.device)
        grid = torch.linspace(1.0, 0.5, CLIP_STEPS, device=w.device)
        shrink = grid[:, None].expand(len(grid), rows)                   # [k, rows]
        p = self._params(w.unsqueeze(0).expand(len(grid), *w.shape), shrink)
        err = ((self._round(w.unsqueeze(0), p) - w) ** 2 * imp).sum(-1)  # [k, rows]
        best = err.argmin(0)
        idx = torch.arange(rows, device=w.device)
        return UniformParams(p.scale[best, idx], None if p.zero is None else p.zero[best, idx])

    def quantize(self, w, params, col=0):
        q = self._codes(w.float(), params)
        return Quantized(self._values(q, params), (q - self._levels()[0]).to(torch.int64))

    def column_quantizer(self, params):
        """quantize for one column, fused in place: 5 operations, bit for bit quantize's result.

        clamp(round(w/s) + z, lo, hi) - z = clamp(round(w/s), lo - z, hi - z) exactly (small integers
        in float), so the values are that times s and the codes that plus z - lo.
        """
        lo, hi = self._levels()
        scale, zero = params.scale, params.zero
        if zero is None:
            low, high, shift = lo, hi, -lo
        else:
            low, high, shift = lo - zero, hi - zero, zero - lo

        def one_column(w, col, values, codes):
            torch.div(w.float(), scale, out=codes).round_().clamp_(low, high)
            torch.mul(codes, scale, out=values)
            codes.add_(shift)
        return one_column

    def pack(self, codes, params):
        rows, cols = codes.shape
        self.group_of(cols)
        data = {"scale": torch.stack([p.scale for p in params], 1).half()}   # [rows, groups]
        if not self.symmetric:
            data["zero"] = torch.stack([p.zero for p in params], 1).half()
        data["codes"] = pack_bits(codes, self.bits)
        return Packed(self.name, self.config(), (rows, cols), data)

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        lo, _ = self._levels()
        q = unpack_bits(packed.data["codes"], self.bits, rows * cols).reshape(rows, cols).float() + lo
        s = packed.data["scale"].float().repeat_interleave(g, 1)
        if "zero" in packed.data:
            q = q - packed.data["zero"].float().repeat_interleave(g, 1)
        return q * s
