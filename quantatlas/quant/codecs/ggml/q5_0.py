"""Q5_0: blocks of 32 weights: fp16 d, qh (4 bytes), 16 bytes of nibbles (22 bytes, 5.5 bpw).

Value of code q (0..31): (q - 16) * d. The low 4 bits are packed as in Q4_0; bit 4 of the code of
weight k is bit k of qh read as a little-endian uint32. Quantization is Q4_0's with nmax = 16
(ref: d = max / -16, q = min(31, (int8)(x/d + 16.5)); imatrix: make_qx_quants(nmax = 16)).
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import bytes_fp16, fp16_bytes, nibbles
from quantatlas.quant.codecs.ggml.q4_0 import Q4_0



def high_bits(codes: torch.Tensor) -> torch.Tensor:
    """[B, 32] codes -> [B, 4] bytes: bit k of the uint32 is bit 4 of code k."""
    h = ((codes >> 4) & 1).reshape(-1, 4, 8)
    return (h << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[B, 4] bytes -> [B, 32] values 0 or 16."""
    return (((qh.to(torch.int32)[..., None] >> torch.arange(8, device=qh.device)) & 1) << 4).reshape(-1, 32)


class Q5_0(Q4_0):
    name = "q5_0"
    type_size = 22
    nmax = 16

    def to_bytes(self, codes, fields):
        return torch.cat([fp16_bytes(fields["d"]), high_bits(codes), nibbles(codes[:, :16], codes[:, 16:])], 1)

    def from_bytes(self, blocks):
        qs = blocks[:, 6:22].to(torch.int32)
        codes = torch.cat([qs & 0xF, qs >> 4], 1) | unpack_high_bits(blocks[:, 2:6])
        return codes, {"d": bytes_fp16(blocks[:, :2])}
