"""Narrow element formats of the hardware codecs (OCP 8-bit floats, OCP MX v1.0 elements) and their scale
bytes, computed with plain float ops so they run wherever torch runs (tests check them bit for bit against
ml_dtypes' float4_e2m1fn, float6_e2m3fn, float6_e3m2fn, float8_e4m3fn, float8_e5m2, float8_e8m0fnu).

A float element with e exponent bits (bias b) and m mantissa bits holds

    normal     (-1)^s · (1 + f/2^m) · 2^(E - b)       E = 1 .. 2^e - 1 (the top E only up to `max`)
    subnormal  (-1)^s · (f/2^m) · 2^(1 - b)           E = 0

    name       e  m  bias  max      emax   stored code (bits)
    fp4_e2m1   2  1  1     6        2      s E E f            (4)
    fp6_e2m3   2  3  1     7.5      2      s E E f f f        (6)
    fp6_e3m2   3  2  3     28       4      s E E E f f        (6)
    fp8_e4m3   4  3  7     448      8      OCP E4M3 "fn": no infinities, S.1111.111 is NaN
    fp8_e5m2   5  2  15    57344    15     OCP E5M2 (IEEE-like; ±inf and NaN are never produced here)
    int8       -  -  -     127/64   0      MXINT8: a two's complement byte k, value k · 2^-6, k in -127..127

`emax` is the exponent of the largest normal (the OCP spec's emax_elem). The cast (`round`) is the OCP
conversion with saturation: round to nearest, ties to even, magnitudes beyond `max` become ±max; the sign
of a value that rounds to zero is kept (-0 has its sign bit set, as ml_dtypes and the hardware casts do).
MXINT8 saturates symmetrically at ±127 (the code -128 is never produced), as the OCP spec's reference
library (microsoft/microxcaling) clamps it.

Scale bytes: E8M0 (`e8m0_*`), an unsigned biased exponent, byte b is 2^(b - 127) (255 is NaN and never
produced); E4M3 scales (NVFP4) are fp8_e4m3 codes of positive values.
"""
from __future__ import annotations

from dataclasses import dataclass

from quantatlas._lazy import torch

E8M0_BIAS = 127


@dataclass(frozen=True)
class ElementFormat:
    name: str
    bits: int      # stored bits per element
    ebits: int     # exponent bits (0: the MXINT8 fixed-point element)
    mbits: int     # mantissa bits (MXINT8: the 6 fraction bits of its top binade)
    bias: int
    max: float     # largest finite magnitude
    emax: int      # exponent of the largest normal

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (1 - bias): subnormals share its step."""
        return 1 - self.bias

    def round(self, y: torch.Tensor) -> torch.Tensor:
        """y (float32) cast to the element grid: nearest, ties to even, saturated at ±max, sign kept."""
        y = y.float()
        if self.ebits == 0:   # MXINT8: multiples of 2^-6
            q = torch.round(torch.ldexp(y, torch.tensor(6, device=y.device))).clamp(-127, 127)
            return torch.ldexp(q, torch.tensor(-6, device=y.device))
        a = y.abs()
        _, e = torch.frexp(a)                                   # a = f · 2^e, f in [0.5, 1)
        exp = torch.clamp(e - 1, min=self.emin)                 # floor(log2 a); subnormals share 2^emin's step
        step = torch.ldexp(torch.ones_like(a), exp - self.mbits)
        q = torch.round(a / step) * step                        # a / step is exact (a power of two)
        return torch.copysign(torch.clamp(q, max=self.max), y)

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        """Codes (int64, `bits` wide) of values already on the grid: s | E | f (MXINT8: k & 0xFF)."""
        if self.ebits == 0:
            return torch.ldexp(v.float(), torch.tensor(6, device=v.device)).round().to(torch.int64) & 0xFF
        a = v.float().abs()
        _, e = torch.frexp(a)
        exp = e - 1
        normal = (exp >= self.emin) & (a > 0)
        exp_field = torch.where(normal, exp + self.bias, torch.zeros_like(exp))
        unit = torch.where(normal, exp, torch.full_like(exp, self.emin))          # 2^unit is the leading bit
        frac = torch.ldexp(a, self.mbits - unit) - torch.where(normal, 2.0 ** self.mbits, 0.0)
        sign = torch.signbit(v).to(torch.int64)
        return (sign << (self.bits - 1)) | (exp_field.to(torch.int64) << self.mbits) | frac.round().to(torch.int64)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values of codes (the inverse of `encode`)."""
        c = codes.to(torch.int64)
        if self.ebits == 0:
            k = torch.where(c >= 128, c - 256, c).float()
            return torch.ldexp(k, torch.tensor(-6, device=c.device))
        sign = torch.where((c >> (self.bits - 1)) & 1 == 1, -1.0, 1.0)
        exp_field = (c >> self.mbits) & ((1 << self.ebits) - 1)
        frac = (c & ((1 << self.mbits) - 1)).float()
        normal = torch.ldexp(1 + frac / 2 ** self.mbits, exp_field - self.bias)
        sub = torch.ldexp(frac, torch.full_like(exp_field, self.emin - self.mbits))
        return sign * torch.where(exp_field == 0, sub, normal)


ELEMENTS: dict[str, ElementFormat] = {f.name: f for f in (
    ElementFormat("fp4_e2m1", 4, 2, 1, 1, 6.0, 2),
    ElementFormat("fp6_e2m3", 6, 2, 3, 1, 7.5, 2),
    ElementFormat("fp6_e3m2", 6, 3, 2, 3, 28.0, 4),
    ElementFormat("fp8_e4m3", 8, 4, 3, 7, 448.0, 8),
    ElementFormat("fp8_e5m2", 8, 5, 2, 15, 57344.0, 15),
    ElementFormat("int8", 8, 0, 6, 0, 127 / 64, 0),
)}
FP4 = ELEMENTS["fp4_e2m1"]
E4M3 = ELEMENTS["fp8_e4m3"]


def e8m0_value(byte: torch.Tensor) -> torch.Tensor:
    """float32 2^(b - 127) of E8M0 bytes b (0 .. 254)."""
    return torch.ldexp(torch.ones(byte.shape, device=byte.device), byte.to(torch.int64) - E8M0_BIAS)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2 a) of positive float32 values, exactly (from the binary exponent; int64)."""
    _, e = torch.frexp(a.float())
    return (e - 1).to(torch.int64)


def ceil_log2(a: torch.Tensor) -> torch.Tensor:
    """ceil(log2 a) of positive float32 values, exactly: the exponent of the smallest power of two >= a."""
    f, e = torch.frexp(a.float())
    return (e - (f == 0.5).to(e.dtype)).to(torch.int64)
