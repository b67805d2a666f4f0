"""Round-to-nearest uniform integer grid with fp16 scales (and fp16 zero points when asymmetric).

symmetric:  w_hat = s * q,        q in [-2^(b-1), 2^(b-1) - 1]
asymmetric: w_hat = s * (q - z),  q in [0, 2^b - 1],            s = clip * (max - min) / (2^b - 1),
            z = round(-clip * min / s)

A symmetric group's scale s comes from its weights by `scale` (m = clip * max|w|, n = 2^(b-1)):

    absmax      s = m / (n - 1)        the largest |w| lands on ±(n - 1): 2^b - 1 levels used, the code
                                       -n only under a clip < 1 (this codec's first rule and first default)
    half_step   s = m / (n - ½)        all 2^b levels: ±m lands on ±(n - ½), half a step past the top
                                       code n - 1 (clamped to it) and rounding to the bottom one -n
                                       (compressed-tensors' symmetric int: absmax / (bit_range / 2))
    signed_max  s = -clip * w_max / n  w_max the group's weight of largest magnitude with its sign (the
                                       positive one on a tie): it lands exactly on -n, so the sign of s
                                       says which side gets the extra level (AutoRound's int_sym; the
                                       default since issue 25's GPTQ sweep)

Stored per group: s rounded to fp16 (signed for `signed_max`; every grid rounds and codes with that
fp16 value), one fp16 per row and group, the codes q + n in `bits` bits; `scale` is a symmetric
grid's option (asymmetric grids have their own min/max rule). An all-zero group stores s = 1.
compressed-tensors keeps s in the weights' dtype: for fp16 weights the same fp16 number as here.

`clip` is 1 for `clip: minmax`; `mse` and `hessian` search a grid of shrink factors per row
of each group, minimising sum_j imp_j (w_j - w_hat_j)^2 with imp = 1 (mse) or imp = diag(H)
(hessian, passed in as `importance`); the shrink multiplies m (or w_max) before the rule above.

Public grid (for recovery's code steps, activations' clip ratio, sparse24): `levels()`, the code
range; `row_params(w, shrink)`, each row's scale (and zero point); `codes(w, params)`, the grid
index of each weight; `values(codes, params)`, the weights they stand for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.config import ADDED_LATER, FIRST_DEFAULT, CodecConfig

#: shrink factors 1.0, 0.98, ..., 0.5 searched by clip: mse / hessian
CLIP_STEPS = 26

#: how a symmetric grid's scale comes from a group's weights (module docstring)
SymmetricScale = Literal["absmax", "half_step", "signed_max"]


def symmetric_scale_field():
    """The `scale` option of a symmetric integer grid; it came after results were stored, so at its
    first default (absmax, the rule before it existed) stored configs leave it out."""
    return Field("absmax", json_schema_extra={ADDED_LATER: True})


class UniformConfig(CodecConfig):
    name = "uniform"
    bits: int = Field(ge=2, le=8)
    group: int | None = Field(128, gt=0)   # null: one group per row
    symmetric: bool = True
    clip: Literal["minmax", "mse", "hessian"] = "minmax"
    #: signed_max by default since the GPTQ defaults sweep (experiments/gptq/defaults_*.yaml: the lowest
    #: KLD at 4, 3 and 2 bits); first released as absmax (before the option existed), so stored configs
    #: and ids of absmax read as before and the bare spelling gets a new id. Asymmetric grids: absmax.
    scale: SymmetricScale = Field("signed_max", json_schema_extra={ADDED_LATER: True, FIRST_DEFAULT: "absmax"})

    @model_validator(mode="before")
    @classmethod
    def _asymmetric_scale(cls, data):
        """An asymmetric grid fits min and max and ignores `scale`: it keeps absmax, its config and id as before."""
        if isinstance(data, dict) and data.get("symmetric") is False and "scale" not in data:
            return {**data, "scale": "absmax"}
        return data

    @field_validator("scale")
    @classmethod
    def _symmetric_only(cls, v, info):
        if v != "absmax" and info.data.get("symmetric") is False:
            raise ValueError(f"{v} is a scale rule of the symmetric grid (symmetric: false fits min and max)")
        return v

    def build(self):
        return Uniform(self)


@dataclass
class UniformParams:
    scale: torch.Tensor  # [rows], already rounded to fp16 (negative rows possible under signed_max)
    zero: torch.Tensor | None  # [rows] integer-valued, asymmetric only


class Uniform(Codec):
    name = "uniform"

    def __init__(self, cfg: UniformConfig):
        super().__init__(cfg)
        self.bits, self.group_size, self.symmetric, self.clip = cfg.bits, cfg.group, cfg.symmetric, cfg.clip
        self.scale_rule = cfg.scale

    # -- grid -----------------------------------------------------------------------------
    def levels(self) -> tuple[int, int]:
        """The lowest and highest code q (the stored code is q - lowest)."""
        if self.symmetric:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def row_params(self, w: torch.Tensor, shrink: torch.Tensor | None = None) -> UniformParams:
        """Parameters for each row of w [rows, g] at shrink factors [rows] (or [k, rows]; None: 1)."""
        if shrink is None:
            shrink = torch.ones(w.shape[:-1], device=w.device)
        lo, hi = self.levels()
        if self.symmetric and self.scale_rule == "signed_max":
            wmax, wmin = w.amax(-1).clamp_min(0), w.amin(-1).clamp_max(0)
            largest = torch.where(wmax >= -wmin, wmax, wmin)
            scale = (-(largest * shrink) / -lo).half().float()
            return UniformParams(torch.where(scale != 0, scale, torch.ones_like(scale)), None)
        if self.symmetric:
            amax = w.abs().amax(-1) * shrink
            scale = (amax / (hi + 0.5 if self.scale_rule == "half_step" else hi)).half().float()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            return UniformParams(scale, None)
        wmin = torch.minimum(w.amin(-1), torch.zeros_like(w[..., 0])) * shrink
        wmax = torch.maximum(w.amax(-1), torch.zeros_like(w[..., 0])) * shrink
        scale = ((wmax - wmin) / hi).half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-wmin / scale).clamp(lo, hi)
        return UniformParams(scale, zero)

    def codes(self, w: torch.Tensor, p: UniformParams) -> torch.Tensor:
        """Grid indices q in [lo, hi] (q - z is the multiple of the scale), as float."""
        lo, hi = self.levels()
        q = torch.round(w / p.scale.unsqueeze(-1))
        if p.zero is not None:
            q = q + p.zero.unsqueeze(-1)
        return torch.clamp(q, lo, hi)

    def values(self, q: torch.Tensor, p: UniformParams) -> torch.Tensor:
        """The weights that grid indices q stand for."""
        if p.zero is not None:
            q = q - p.zero.unsqueeze(-1)
        return q * p.scale.unsqueeze(-1)

    def _round(self, w: torch.Tensor, p: UniformParams) -> torch.Tensor:
        return self.values(self.codes(w, p), p)

    # -- codec steps ------------------------------------------------------------------------
    def fit(self, w, importance=None):
        w = w.float()
        rows = w.shape[0]
        if self.clip == "minmax":
            return self.row_params(w, torch.ones(rows, device=w.device))
        imp = torch.ones(w.shape[1], device=w.device) if self.clip == "mse" or importance is None \
            else importance.float().to(w.device)
        grid = torch.linspace(1.0, 0.5, CLIP_STEPS, device=w.device)
        shrink = grid[:, None].expand(len(grid), rows)                   # [k, rows]
        p = self.row_params(w.unsqueeze(0).expand(len(grid), *w.shape), shrink)
        err = ((self._round(w.unsqueeze(0), p) - w) ** 2 * imp).sum(-1)  # [k, rows]
        best = err.argmin(0)
        idx = torch.arange(rows, device=w.device)
        return UniformParams(p.scale[best, idx], None if p.zero is None else p.zero[best, idx])

    def quantize(self, w, params, col=0):
        q = self.codes(w.float(), params)
        return Quantized(self.values(q, params), (q - self.levels()[0]).to(torch.int64))

    def column_quantizer(self, params):
        """quantize for one column, fused in place: 5 operations, bit for bit quantize's result.

        clamp(round(w/s) + z, lo, hi) - z = clamp(round(w/s), lo - z, hi - z) exactly (small integers
        in float), so the values are that times s and the codes that plus z - lo. The same for every
        symmetric scale rule (a negative s included): only the fitted s differs.
        """
        lo, hi = self.levels()
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
        lo, _ = self.levels()
        q = unpack_bits(packed.data["codes"], self.bits, rows * cols).reshape(rows, cols).float() + lo
        s = packed.data["scale"].float().repeat_interleave(g, 1)
        if "zero" in packed.data:
            q = q - packed.data["zero"].float().repeat_interleave(g, 1)
        return q * s
