"""Q5_1: blocks of 32 weights: fp16 d, fp16 m, qh (4 bytes), 16 bytes of nibbles (24 bytes, 6 bpw).

Value of code q (0..31): q * d + m; layout of the code bits as Q5_0. Quantization is Q4_1's with
nmax = 31 (ref: d = (max - min)/31, q = (uint8)((x - min)/d + 0.5); imatrix: make_qkx3_quants).
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import bytes_fp16, fp16_bytes, nibbles
from quantatlas.quant.codecs.ggml.q4_1 import Q4_1
from quantatlas.quant.codecs.ggml.q5_0 import high_bits, unpack_high_bits


class Q5_1(Q4_1):
    name = "q5_1"
    type_size = 24
    nmax = 31

    def to_bytes(self, codes, fields):
        return torch.cat([fp16_bytes(fields["d"]), fp16_bytes(fields["m"]), high_bits(codes),
                          nibbles(codes[:, :16], codes[:, 16:])], 1)

    def from_bytes(self, blocks):
        qs = blocks[:, 8:24].to(torch.int32)
        codes = torch.cat([qs & 0xF, qs >> 4], 1) | unpack_high_bits(blocks[:, 4:8])
        return codes, {"d": bytes_fp16(blocks[:, :2]), "m": bytes_fp16(blocks[:, 2:4])}
