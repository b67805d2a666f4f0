"""OCP microscaling (MX v1.0): blocks of `block` (32) consecutive weights of a row share one E8M0 scale
X = 2^e; each weight is stored as an element P = cast(w / X) of a narrow format (quant/codecs/minifloat.py),
w_hat = X · P.

    mx: {element: fp4_e2m1 | fp6_e2m3 | fp6_e3m2 | fp8_e4m3 | fp8_e5m2 | int8, block: 32,
         scale_rounding: floor | rceil | ceil | even}

    MXFP4 = {element: fp4_e2m1}   MXFP6 = fp6_e2m3 / fp6_e3m2   MXFP8 = fp8_e4m3 / fp8_e5m2   MXINT8 = int8

The shared exponent e of a block with largest magnitude m (emax: the element's largest normal exponent,
minifloat.ELEMENTS), clamped to E8M0's -127..127 (a zero block gets -127):

    floor   e = floor(log2 m) - emax            the OCP spec's rule (default); m/X lies in [2^emax, 2^(emax+1)),
                                                so the largest elements may saturate at the format's max
    ceil    e = ceil(log2 m) - emax             never saturates, coarser
    even    e = floor(log2 m') - emax           m' = m rounded to the element's mantissa bits (half up), i.e.
                                                floor unless m would round up to the next power of two anyway
                                                (torchao's EVEN; llm-compressor's MXFP4 weights follow it)
    rceil   e = ceil(log2(m / max_elem))        NVIDIA's rule (cuBLAS "round up the scale"): the smallest X with
                                                m / X <= max, so nothing saturates

The element cast rounds to nearest, ties to even, and saturates (minifloat.ElementFormat.round). The
default is the spec's `floor` (torchao's default too); `rceil` is what Blackwell's cvt.rp.ue8m0 computes.

Stored parts (Packed.data), exactly 8 + block·b bits per block (4.25 / 6.25 / 8.25 bits per weight):
    "scales"  uint8 [rows, cols / block]: E8M0 bytes e + 127 (the value 2^(byte - 127); view as
              torch.float8_e8m0fnu for the same number)
    "codes"   uint8 bit stream of the element codes in row-major order, `b` bits each, little-endian
              (base.pack_bits: fp4 element 2i in the low nibble of byte i, 2i+1 in the high one; fp8 / int8: one
              byte each). A code is the element's bit pattern s|E|f (MXINT8: the two's complement byte).

Edge beyond weights: torchao divides by max(X, 2^-126) where e = -127 (a block with m < 2^-125); here
w / X is exact for every e, so decode(encode(w)) is the quantized value in every case.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.codecs.minifloat import ELEMENTS, E8M0_BIAS, ElementFormat, ceil_log2, e8m0_value, floor_log2
from quantatlas.quant.config import CodecConfig

ScaleRounding = Literal["floor", "rceil", "ceil", "even"]


class MXConfig(CodecConfig):
    name = "mx"
    element: Literal[tuple(ELEMENTS)] = "fp4_e2m1"
    block: int = Field(32, gt=0)
    scale_rounding: ScaleRounding = "floor"

    @model_validator(mode="after")
    def _whole_bytes(self):
        bits = ELEMENTS[self.element].bits
        if self.block * bits % 8:
            raise ValueError(f"block: {self.block} {self.element} elements of {bits} bits are not whole bytes; "
                             f"use a multiple of {8 // math.gcd(bits, 8)}")
        return self

    def build(self):
        return MX(self)


def shared_exponent(amax: torch.Tensor, element: ElementFormat, rule: str) -> torch.Tensor:
    """The E8M0 exponent e (int64, -127..127) of blocks with largest magnitudes `amax` (module docstring)."""
    m = amax.float().contiguous()
    if rule == "rceil":
        e = ceil_log2(m / element.max)
    else:
        if rule == "even":   # add half a unit of the element's last mantissa bit, drop the mantissa
            half = 1 << (23 - element.mbits - 1)
            m = ((m.view(torch.int32) + half) & 0x7F800000).view(torch.float32)
        e = (ceil_log2(m) if rule == "ceil" else floor_log2(m)) - element.emax
    return torch.where(m > 0, e, torch.full_like(e, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)


@dataclass
class MXParams:
    exponent: torch.Tensor  # [rows] int64: X = 2^exponent


class MX(Codec):
    name = "mx"

    def __init__(self, cfg: MXConfig):
        super().__init__(cfg)
        self.element = ELEMENTS[cfg.element]
        self.group_size = cfg.block
        self.rule = cfg.scale_rounding

    def fit(self, w, importance=None):
        return MXParams(shared_exponent(w.detach().float().abs().amax(-1), self.element, self.rule))

    def quantize(self, w, params, col=0):
        e = params.exponent[:, None]
        q = self.element.round(torch.ldexp(w.float(), -e))   # w / X, exact (X a power of two)
        return Quantized(torch.ldexp(q, e), self.element.encode(q))

    def column_quantizer(self, params):
        """One GPTQ column with its block's X: quantize's values and codes, bit for bit."""
        inverse = torch.ldexp(torch.ones_like(params.exponent, dtype=torch.float32), -params.exponent)
        scale = torch.ldexp(torch.ones_like(params.exponent, dtype=torch.float32), params.exponent)
        fmt = self.element

        def one_column(w, col, values, codes):
            q = fmt.round(w.float() * inverse)
            torch.mul(q, scale, out=values)
            codes.copy_(fmt.encode(q))
        return one_column

    # every block of a matrix at once (the blocks are independent)
    def _blocks(self, w):
        w = w.detach().float()
        g = self.group_of(w.shape[1])
        blocks = w.reshape(-1, g)
        p = self.fit(blocks)
        return p, self.quantize(blocks, p)

    def encode(self, w, importance=None):
        rows, cols = w.shape
        p, q = self._blocks(w)
        return self._pack(q.codes.reshape(rows, cols), p.exponent.reshape(rows, -1))

    def fake_quantize(self, w, importance=None):
        return self._blocks(w)[1].values.reshape(w.shape)

    def pack(self, codes, params):
        rows, cols = codes.shape
        self.group_of(cols)
        return self._pack(codes, torch.stack([p.exponent for p in params], 1))

    def _pack(self, codes, exponents):
        rows, cols = codes.shape
        return Packed(self.name, self.config(), (rows, cols),
                      {"scales": (exponents + E8M0_BIAS).to(torch.uint8).contiguous(),
                       "codes": pack_bits(codes, self.element.bits)})

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        codes = unpack_bits(packed.data["codes"], self.element.bits, rows * cols).reshape(rows, cols)
        return self.element.decode(codes) * e8m0_value(packed.data["scales"]).repeat_interleave(g, 1)
