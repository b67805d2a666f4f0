"""16-bit floats as a codec: each value rounded to IEEE fp16 (`f16`) or bfloat16 (`bf16`),
round to nearest even, no scales. What a plain llama.cpp cache stores (`-ctk f16 -ctv f16`, its
default), what ggml rounds activations to before a dot product with f16 weights, and the
baseline a 16-bit checkpoint is.

    kv: {k: f16, v: f16}        llama.cpp's default cache: K and V stored as fp16

Stored: the 16-bit patterns, 16 bits per value exactly. fp16 overflows to ±inf beyond 65504,
as the hardware conversion does.
"""
from __future__ import annotations

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed, Quantized
from quantatlas.quant.config import CodecConfig


class F16Config(CodecConfig):
    name = "f16"

    def build(self):
        return Half(self, torch.float16)


class BF16Config(CodecConfig):
    name = "bf16"

    def build(self):
        return Half(self, torch.bfloat16)


class Half(Codec):
    def __init__(self, cfg, dtype):
        super().__init__(cfg)
        self.name, self.dtype = cfg.name, dtype

    def fit(self, w, importance=None):
        return None

    def quantize(self, w, params, col=0):
        h = w.to(self.dtype)
        return Quantized(h.float(), h.view(torch.int16))

    def fake_quantize(self, w, importance=None):
        return w.to(self.dtype).float()

    def pack(self, codes, params):
        return Packed(self.name, self.config(), tuple(codes.shape), {"values": codes.to(torch.int16).contiguous()})

    def decode(self, packed):
        return packed.data["values"].view(self.dtype).float()
