"""Q8_0: blocks of 32 weights along a row, each stored as fp16 d + 32 int8 (34 bytes).

ggml's reference: d = max|x| / 127, q = roundf(x * (1/d)) (half away from zero), the
quantisation uses fp32 d and the stored d is fp16(d); decode is q * fp16(d).
"""
from __future__ import annotations

import torch

from quantatlas.quant.codecs import register
from quantatlas.quant.codecs.base import Codec, Packed

QK8_0 = 32


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds halves to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


@register
class Q8_0(Codec):
    name = "q8_0"
    group_size = QK8_0

    def fit(self, w, importance=None):
        d = w.float().abs().amax(-1) / 127.0
        return d  # fp32 d: ggml quantizes with it and stores fp16(d)

    def quantize(self, w, params, col=0):
        d = params
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = roundf(w.float() * inv[:, None])
        return q * d.half().float()[:, None]

    def pack(self, w_hat, params):
        rows, cols = w_hat.shape
        d = torch.stack(params, 1)                                       # [rows, blocks] fp32
        dh = d.half()
        q = torch.where(dh.float()[..., None] > 0,
                        torch.round(w_hat.float().reshape(rows, -1, QK8_0) / dh.float()[..., None].clamp_min(1e-30)),
                        torch.zeros(1, device=w_hat.device))
        blocks = torch.cat([dh.unsqueeze(-1).view(torch.uint8),          # 2 bytes, little-endian fp16
                            q.to(torch.int8).view(torch.uint8)], -1)     # 32 bytes
        return Packed(self.name, {}, (rows, cols), {"blocks": blocks.reshape(rows, -1)})

    def decode(self, packed):
        rows, cols = packed.shape
        b = packed.data["blocks"].reshape(rows, cols // QK8_0, 34)
        d = b[..., :2].contiguous().view(torch.float16).float()          # [rows, blocks, 1]
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(rows, cols)
