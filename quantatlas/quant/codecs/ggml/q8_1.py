"""Q8_1: llama.cpp's activation type for the Q4_1 / Q5_1 dot products: blocks of 32, fp16 d, fp16
s = fp16(d·Σq) with the fp32 d, then 32 int8 codes (36 bytes, 9 bits per value).

quantize_row_q8_1_ref: the codes and d are Q8_0's (d = max|x|/127, q = roundf(x/d)); s lets the
dot product add the weights' min times the block sum. Values: fp16(d)·q. Not a weight format, so
it is not in the ggml formats table.
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import bytes_fp16, fp16_bytes
from quantatlas.quant.codecs.ggml.cfloat import fdiv, to_fp16
from quantatlas.quant.codecs.ggml.q8_0 import Q8_0
from quantatlas.quant.config import CodecConfig


class Q8_1(Q8_0):
    type_size = 36

    def fit_blocks(self, x, qw, sigma2):
        fit = super().fit_blocks(x, qw, sigma2)
        d32 = fdiv(x.abs().amax(-1), 127.0)
        fit.fields["s"] = to_fp16(fit.codes.sum(-1).float() * d32)
        return fit

    def to_bytes(self, codes, fields):
        s = fields.get("s")
        if s is None:   # codes from `quantize` on new values: s is the sum of these codes
            s = to_fp16(codes.sum(-1).float() * fields["d"].float())
        return torch.cat([fp16_bytes(fields["d"]), fp16_bytes(s), codes.to(torch.int8).view(torch.uint8)], 1)

    def from_bytes(self, blocks):
        return blocks[:, 4:].contiguous().view(torch.int8).to(torch.int32), \
            {"d": bytes_fp16(blocks[:, :2]), "s": bytes_fp16(blocks[:, 2:4])}


Q8_1.name, Q8_1.ggml_type = "q8_1", "Q8_1"   # set after the class: no entry in the weight formats


class Q81Config(CodecConfig):
    name = "q8_1"

    def build(self):
        return Q8_1(self)
