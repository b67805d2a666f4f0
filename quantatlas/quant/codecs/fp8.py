"""FP8 (OCP E4M3 "fn", as torch.float8_e4m3fn and vLLM/compressed-tensors use it, or E5M2) with fp32 scales.

    s = clip · max|w| / M,   w_hat = s · fp8(w / s)          M = 448 (e4m3) or 57344 (e5m2)

fp8(y) rounds to the nearest value, ties to even, saturating at ±M (quant/codecs/minifloat.py: E4M3 has
1 sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals below 2^-6 in steps of 2^-9, no infinities;
E5M2 has 5 exponent bits (bias 15) and 2 mantissa bits). Computed with plain float ops (so it runs wherever
torch runs); the tests check it against torch's float8 round trips and ml_dtypes.

Which weights share a scale (`granularity`):
    channel  (default) one scale per row, or per row and `group` columns (`group: null`, the default: per
             output channel for weights, per token for activations: compressed-tensors' FP8 / FP8_DYNAMIC)
    tensor   one scale for the whole matrix (compressed-tensors' per-tensor FP8; for activations the scale of
             each call, or of the calibration set with `act: {static: true}`)
    block    one scale per `block` × `block` tile (128 × 128: DeepSeek-V3's weights, compressed-tensors'
             FP8_BLOCK); a last partial tile of rows has its own scale

Stored: one byte per value (the element's bit pattern) and the fp32 scales: "scale" [rows, groups]
(channel), [1] (tensor) or [ceil(rows / block), cols / block] (block). An all-zero group stores s = 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed, Quantized
from quantatlas.quant.codecs.minifloat import ELEMENTS
from quantatlas.quant.codecs.tensor_scale import TensorScaled
from quantatlas.quant.config import ADDED_LATER, CodecConfig

E4M3 = ELEMENTS["fp8_e4m3"]
E4M3_MAX = E4M3.max


def round_e4m3(y: torch.Tensor) -> torch.Tensor:
    """y (float32) rounded to the nearest E4M3fn value, ties to even, saturated at ±448."""
    return E4M3.round(y)


def e4m3_bits(v: torch.Tensor) -> torch.Tensor:
    """The E4M3fn bit pattern (uint8) of values already on the grid."""
    return E4M3.encode(v).to(torch.uint8)


def e4m3_values(bits: torch.Tensor) -> torch.Tensor:
    """float32 values of E4M3fn bit patterns (the inverse of `e4m3_bits`)."""
    return E4M3.decode(bits)


class FP8Config(CodecConfig):
    name = "fp8"
    format: Literal["e4m3", "e5m2"] = "e4m3"
    group: int | None = Field(None, gt=0)     # null: one scale per row (channel granularity)
    clip: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    granularity: Literal["channel", "tensor", "block"] = Field("channel", json_schema_extra={ADDED_LATER: True})
    block: int = Field(128, gt=0, json_schema_extra={ADDED_LATER: True})

    @model_validator(mode="after")
    def _group_is_channels(self):
        if self.group is not None and self.granularity != "channel":
            raise ValueError(f"group is the channel granularity's column group; granularity {self.granularity} "
                             "has its own (tensor: the matrix, block: block × block tiles)")
        return self

    @property
    def per_tensor_scale(self) -> bool:
        """Whether one scale serves a whole matrix (what `act: {static: true}` calibrates)."""
        return self.granularity == "tensor"

    @property
    def tensor_scaled(self) -> bool:
        """Whether a scale spans whole rows (quant/codecs/tensor_scale.py): the codec is handed rows whole."""
        return self.granularity == "tensor"

    def build(self):
        return FP8(self)


@dataclass
class FP8Params:
    scale: torch.Tensor  # [rows] fp32


class FP8(TensorScaled, Codec):
    name = "fp8"

    def __init__(self, cfg: FP8Config):
        super().__init__(cfg)
        self.element = ELEMENTS["fp8_" + cfg.format]
        self.granularity, self.clip, self.tile = cfg.granularity, cfg.clip, cfg.block
        self.group_size = {"channel": cfg.group, "tensor": None, "block": cfg.block}[cfg.granularity]

    @property
    def has_tensor_scale(self) -> bool:
        return self.granularity == "tensor"

    def _scale(self, amax: torch.Tensor) -> torch.Tensor:
        s = self.clip * amax.float() / self.element.max
        return torch.where(s > 0, s, torch.ones_like(s))

    def fit(self, w, importance=None):
        w = w.float()
        rows = w.shape[0]
        if self.granularity == "tensor":
            return FP8Params(self._scale(self.bound_amax(rows, w.device)))
        if self.granularity == "block":   # each row takes its tile's amax: tiles of `block` rows
            tiles = -(-rows // self.tile)
            padded = torch.nn.functional.pad(w.abs(), (0, 0, 0, tiles * self.tile - rows))
            amax = padded.reshape(tiles, -1).amax(-1)
            return FP8Params(self._scale(amax).repeat_interleave(self.tile)[:rows])
        return FP8Params(self._scale(w.abs().amax(-1)))

    def quantize(self, w, params, col=0):
        v = self.element.round(w.float() / params.scale[:, None])
        return Quantized(v * params.scale[:, None], self.element.encode(v))

    def pack(self, codes, params):
        rows, cols = codes.shape
        self.group_of(cols)
        scale = torch.stack([p.scale for p in params], 1).float()        # [rows, groups]
        if self.granularity == "tensor":
            scale = scale[0, :1]
        elif self.granularity == "block":
            scale = scale[::self.tile]                                  # one row per tile
        return Packed(self.name, self.config(), (rows, cols),
                      {"codes": codes.to(torch.uint8).contiguous(), "scale": scale.contiguous()})

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        scale = packed.data["scale"]
        if self.granularity == "tensor":
            scale = scale.reshape(1, 1).expand(rows, cols)
        else:
            if self.granularity == "block":
                scale = scale.repeat_interleave(self.tile, 0)[:rows]
            scale = scale.repeat_interleave(g, 1)
        return self.element.decode(packed.data["codes"]) * scale
