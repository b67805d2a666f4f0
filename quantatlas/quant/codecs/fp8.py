"""FP8 E4M3 (OCP "fn" variant, as torch.float8_e4m3fn and vLLM/compressed-tensors use it) with a
per-group fp32 scale.

    s = clip · max|w| / 448,   w_hat = s · fp8(w / s)

fp8(y) rounds to the nearest E4M3 value, ties to even: 1 sign, 4 exponent bits (bias 7), 3
mantissa bits, subnormals below 2^-6 in steps of 2^-9, largest finite 448 (no infinities; the
all-ones pattern is NaN and never produced). The rounding is computed here with plain float ops
(so it runs wherever torch runs); the tests check it against torch's float8_e4m3fn round trip.

Stored: one byte per value (the E4M3 bit pattern) and one fp32 scale per group; `group: null`
is one scale per row (per-token for activations, per-channel for weights: compressed-tensors'
FP8 / FP8_DYNAMIC schemes).
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Literal

from pydantic import Field

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed, Quantized
from quantatlas.quant.config import CodecConfig

E4M3_MAX = 448.0
E4M3_MIN_NORMAL_EXP = -6   # 2^-6 is the smallest normal
MANTISSA_BITS = 3


def round_e4m3(y: torch.Tensor) -> torch.Tensor:
    """y (float32) rounded to the nearest E4M3fn value, ties to even, saturated at ±448."""
    y = y.float()
    a = y.abs()
    _, e = torch.frexp(a)                                   # a = m · 2^e, m in [0.5, 1)
    exp = torch.clamp(e - 1, min=E4M3_MIN_NORMAL_EXP)       # floor(log2 a), subnormals share 2^-6's step
    step = torch.ldexp(torch.ones_like(a), exp - MANTISSA_BITS)
    q = torch.round(a / step) * step                         # a / step is exact (a power of two)
    return torch.sign(y) * torch.clamp(q, max=E4M3_MAX)


def e4m3_bits(v: torch.Tensor) -> torch.Tensor:
    """The E4M3fn bit pattern (uint8) of values already on the grid."""
    a = v.abs()
    _, e = torch.frexp(a)
    exp = e - 1
    normal = exp >= E4M3_MIN_NORMAL_EXP
    exp_field = torch.where(normal, exp + 7, torch.zeros_like(exp))
    mant = torch.where(normal, torch.ldexp(a, -exp) * 8 - 8,
                       torch.ldexp(a, torch.full_like(exp, 9)))            # subnormal: a / 2^-9
    mant = torch.where(a == 0, torch.zeros_like(mant), mant)
    exp_field = torch.where(a == 0, torch.zeros_like(exp_field), exp_field)
    sign = torch.signbit(v).to(torch.int64)
    return ((sign << 7) | (exp_field.to(torch.int64) << 3) | mant.round().to(torch.int64)).to(torch.uint8)


def e4m3_values(bits: torch.Tensor) -> torch.Tensor:
    """float32 values of E4M3fn bit patterns (the inverse of `e4m3_bits`)."""
    b = bits.to(torch.int64)
    sign = torch.where(b >> 7 == 1, -1.0, 1.0)
    exp_field, mant = (b >> 3) & 0xF, (b & 0x7).float()
    normal = torch.ldexp(1 + mant / 8, exp_field - 7)
    sub = torch.ldexp(mant, torch.full_like(exp_field, -9))
    return sign * torch.where(exp_field == 0, sub, normal)


class FP8Config(CodecConfig):
    name = "fp8"
    format: Literal["e4m3"] = "e4m3"
    group: int | None = Field(None, gt=0)     # null: one scale per row
    clip: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)

    def build(self):
        return FP8(self)


@dataclass
class FP8Params:
    scale: torch.Tensor  # [rows] fp32


class FP8(Codec):
    name = "fp8"

    def __init__(self, cfg: FP8Config):
        super().__init__(cfg)
        self.group_size, self.clip = cfg.group, cfg.clip

    def fit(self, w, importance=None):
        s = self.clip * w.float().abs().amax(-1) / E4M3_MAX
        return FP8Params(torch.where(s > 0, s, torch.ones_like(s)))

    def quantize(self, w, params, col=0):
        v = round_e4m3(w.float() / params.scale[:, None])
        return Quantized(v * params.scale[:, None], e4m3_bits(v))

    def pack(self, codes, params):
        rows, cols = codes.shape
        self.group_of(cols)
        return Packed(self.name, self.config(), (rows, cols),
                      {"codes": codes.to(torch.uint8).contiguous(),
                       "scale": torch.stack([p.scale for p in params], 1).float()})

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        return e4m3_values(packed.data["codes"]) * packed.data["scale"].repeat_interleave(g, 1)
